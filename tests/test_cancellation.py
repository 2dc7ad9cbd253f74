"""A client that leaves mid-stream stops its generation: real HTTP over a socket, then count tokens."""

import asyncio
import time

import httpx
import pytest
from httpx_sse import connect_sse
from starlette.responses import StreamingResponse

from labserver import fake_engine
from labserver.serve.app import create_app
from labserver.serve.sse import ClosingStreamingResponse
from labserver.serve.background import UvicornServer

PROMPT = "Write a long story about a lighthouse keeper."


def read_then_leave(url: str, n_tokens: int, max_tokens: int) -> list[dict]:
    """Stream, read ``n_tokens`` token events, close the connection; return the events received."""
    received = []
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as client, connect_sse(client, "POST", url + "/generate", json=body) as source:
        for event in source.iter_sse():
            received.append(event.json())
            if len(received) == n_tokens:
                break
    # Leaving both `with` blocks closed the half-read response, and with it the TCP connection.
    return received


def wait_until_idle(engine, backend, timeout_s: float) -> float:
    """Seconds until neither the engine nor the backend reports a running generation (or the timeout)."""
    start = time.perf_counter()
    while engine.running or backend.running:
        if time.perf_counter() - start > timeout_s:
            break
        time.sleep(0.005)
    return time.perf_counter() - start


def check_disconnect_stops_generation(engine, backend_kind: str, max_tokens: int) -> None:
    with UvicornServer(create_app(engine, backend_kind)) as server:
        backend = server.app.state.backend
        before = engine.tokens_generated
        events = read_then_leave(server.url, n_tokens=3, max_tokens=max_tokens)
        received = len(events)
        # One second, or two decode steps on a machine so busy that a step takes longer than that.
        slowest_step_s = max(e["step_ms"] for e in events[1:]) / 1000
        waited_s = wait_until_idle(engine, backend, timeout_s=max(1.0, 2 * slowest_step_s))
        assert (engine.running, backend.running) == (0, 0), f"still generating {waited_s:.2f} s after leaving"
        grown = engine.tokens_generated - before
        assert received == 3 and all("token" in e for e in events)
        assert grown <= received + 2, f"{grown} tokens generated for a client that read {received}"
        time.sleep(0.2)  # a generation that had kept going would show up here
        assert engine.tokens_generated - before == grown
        # The server is fine afterwards.
        response = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=120)
        assert response.status_code == 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["batched", "thread", "executor", "process"])
def test_disconnect_cancels_fake_generation(backend):
    check_disconnect_stops_generation(fake_engine(prefill_ms=20, step_ms=20), backend, max_tokens=1000)


@pytest.mark.model
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["batched", "thread", "executor"])
def test_disconnect_cancels_real_generation(default_engine, backend):
    # 200 tokens at ~30 ms would run ~6 s for nobody if the disconnect went unnoticed.
    check_disconnect_stops_generation(default_engine, backend, max_tokens=200)


async def leave_while_sending(response_class) -> list[str]:
    """Run a response whose client leaves while ``send`` is stuck; return what the body generator saw."""
    seen: list[str] = []
    first_sent, never = asyncio.Event(), asyncio.Event()

    async def body():
        try:
            for chunk in (b"a", b"b", b"c"):
                yield chunk
        finally:
            seen.append("closed")

    async def send(message):
        if message.get("body") == b"a":
            first_sent.set()
            await never.wait()  # a full socket buffer: the send is stuck when the client leaves

    async def receive():
        await first_sent.wait()
        return {"type": "http.disconnect"}

    response = response_class(body(), media_type="text/event-stream")
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    return list(seen)  # read now: at loop shutdown asyncio would finalize a leftover generator anyway


@pytest.mark.timeout(30)
def test_body_generator_is_closed_when_the_client_leaves_during_a_send():
    # Starlette cancels the send and leaves the body generator suspended at its `yield`; nothing runs its
    # `finally` (which cancels the generation) until garbage collection. Our response closes it at once.
    assert asyncio.run(leave_while_sending(StreamingResponse)) == []
    assert asyncio.run(leave_while_sending(ClosingStreamingResponse)) == ["closed"]
