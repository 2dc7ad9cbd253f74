"""A client that leaves stops its generation also when it asked for one JSON body, or was still waiting.

Non-streaming: nothing is sent before the end, so the server listens for ``http.disconnect`` while it
waits (as vLLM's ``with_cancellation``). Waiting: a request whose client left before it had a cache slot
is dropped without its prompt ever being prefilled. Real HTTP over raw sockets; then count tokens.
"""

import json
import socket
import time

import httpx
import pytest

from labserver import EngineConfig, fake_engine
from labserver.serve.app import create_app
from labserver.serve.background import UvicornServer
from labserver.serve.limits import ServerLimits
from tests.waiting import seconds_until

pytestmark = pytest.mark.timeout(120)

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story."}]}
ROUTES = {"/generate": {"prompt": "Tell me a long story."}, "/v1/completions": {"prompt": "Tell me a long story."},
          "/v1/chat/completions": CHAT}


def post_raw(port: int, path: str, body: dict) -> socket.socket:
    """Send a POST and return the open socket, unread."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(data), data))
    return sock


def check_leaving_stops_a_non_streaming_generation(engine, backend: str, path: str, max_tokens: int) -> None:
    app = create_app(engine, backend)
    with UvicornServer(app) as server:
        before = engine.tokens_generated
        sock = post_raw(server.port, path, {**ROUTES[path], "max_tokens": max_tokens, "temperature": 0})
        assert seconds_until(lambda: engine.tokens_generated - before >= 2, 60) < 60  # it is generating
        time.sleep(0.5)
        made_at_close = engine.tokens_generated - before
        sock.close()
        waited_s = seconds_until(lambda: engine.running == 0 and app.state.admission.active == 0, 5)
        stopped = engine.tokens_generated - before
        time.sleep(0.3)  # a generation that had kept going would show up here
        after = engine.tokens_generated - before
        ok = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    print(f"\n[failure] {path} on {backend} ({engine.runner.name}): generation stopped {waited_s * 1000:.0f} ms "
          f"after the client left; {stopped - made_at_close} tokens made after that", flush=True)
    assert waited_s < 1.0, f"still generating {waited_s:.2f} s after the client left"
    assert stopped == after, "tokens kept coming for a client that had left"
    assert stopped - made_at_close <= 2, f"{stopped - made_at_close} tokens made after the client left"
    assert ok.status_code == 200


@pytest.mark.parametrize("backend", ["batched", "thread", "executor"])
@pytest.mark.parametrize("path", list(ROUTES))
def test_leaving_a_non_streaming_request_cancels_it_with_the_fake_engine(backend, path):
    engine = fake_engine(prefill_ms=20, step_ms=20, config=EngineConfig(model="fake", threads=1,
                                                                        max_tokens_limit=2000))
    check_leaving_stops_a_non_streaming_generation(engine, backend, path, max_tokens=1000)


@pytest.mark.model
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_leaving_a_non_streaming_request_cancels_it_with_the_real_model(default_engine, path):
    # 2000 tokens would run for a minute or more for nobody if the disconnect went unnoticed.
    check_leaving_stops_a_non_streaming_generation(default_engine, "batched", path, max_tokens=2000)


@pytest.mark.parametrize("backend", ["batched", "thread", "process"])
def test_a_request_whose_client_leaves_while_it_waits_is_never_prefilled(backend):
    # One cache slot: a long stream holds it; a stream and a JSON request wait behind it and their
    # clients leave. Only the first prompt is ever prefilled; the two others leave the queue at once.
    # In this process the runner shows which prompts it prefilled; across the process boundary, the
    # engine's own count in /health (the abort must reach the engine process before its slot frees).
    engine = fake_engine(prefill_ms=5, step_ms=10, config=EngineConfig(model="fake", threads=1, max_batch=1))
    prefilled, real = [], engine.runner.forward
    engine.runner.forward = lambda entries: prefilled.extend(e[0] for e in entries if e[1] == 0) or real(entries)
    app = create_app(engine, backend, limits=ServerLimits(keepalive_s=0.05))
    with UvicornServer(app) as server:
        holder = post_raw(server.port, "/generate", {"prompt": "one", "max_tokens": 1000, "stream": True})
        backend_ = app.state.backend
        assert seconds_until(lambda: backend_.health().running == 1, 30) < 30
        leaving = [post_raw(server.port, "/generate", {"prompt": "two", "max_tokens": 5, "stream": True}),
                   post_raw(server.port, "/v1/completions", {"prompt": "three", "max_tokens": 5})]
        assert seconds_until(lambda: backend_.health().waiting == 2, 30) < 30
        time.sleep(0.1)  # the waiting stream has had keep-alive comments meanwhile: it is well under way
        for sock in leaving:
            sock.close()
        gone_s = seconds_until(lambda: backend_.health().waiting == 0 and app.state.admission.active == 1, 5)
        holder.close()
        assert seconds_until(lambda: backend_.health().running == 0 and app.state.admission.active == 0, 5) < 5
        ok = httpx.post(server.url + "/generate", json={"prompt": "four", "max_tokens": 2}, timeout=30)
        assert seconds_until(lambda: backend_.health().running == 0, 5) < 5  # the engine's counts have come back
        health = httpx.get(server.url + "/health", timeout=30).json()["engine"]
    assert gone_s < 1.0, f"the requests whose clients left still waited {gone_s:.2f} s later"
    assert ok.status_code == 200
    assert health["prefilled"] == 2, health  # "one" and "four"
    if backend != "process":
        assert [seq.ids for seq in prefilled] == [[0], [3]]  # one word, one id each
