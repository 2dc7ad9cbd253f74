"""When the engine cannot serve: /health says so (dead or wedged), every open request ends, new ones get a 503.

The engine thread dies of a fault injected outside any forward (its policy, or ``Engine.end``, raises);
it wedges on a forward that does not return until the test lets it. Requests run over real sockets.
"""

import json
import os
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import EngineConfig, SamplingParams, fake_engine
from labserver.serve.app import create_app
from labserver.serve.background import UvicornServer
from labserver.engine.protocols import EngineDeadError, EngineHealth
from labserver.serve.health import unavailable
from labserver.serve.limits import ServerLimits
from labserver.serve.backends import make_backend
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
ROUTES = {"/generate": {"prompt": "hi"}, "/v1/completions": {"prompt": "hi"}, "/v1/chat/completions": CHAT}


def read_events(source) -> list:
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in source.iter_sse()]


@pytest.mark.parametrize("kind", ["batched", "thread", "executor", "blocking"])
def test_health_reports_the_engine(kind):
    engine = fake_engine(prefill_ms=1, step_ms=1)
    with UvicornServer(create_app(engine, kind)) as server:
        response = httpx.get(server.url + "/health", timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    kv = body["engine"].pop("kv")
    assert body["engine"] == {"alive": True, "pid": os.getpid(), "backend": kind, "route": "fake", "reason": None,
                              "running": 0, "waiting": 0, "restarts": 0, "no_progress_s": 0.0,
                              "prefilled": 0}
    assert kv["blocks_used"] == 0 and kv["kv_cache_usage_perc"] == 0.0 and kv["prefix_caching"] is True
    assert body["running"] == 0 and body["backend"] == kind and body["model"] == "fake"  # the fields before


def test_health_counts_running_and_waiting():
    # One cache slot: the first request runs, the next two wait for it.
    engine = fake_engine(prefill_ms=1, step_ms=10, config=EngineConfig(model="fake", threads=1, max_batch=1))
    backend = make_backend(engine, "batched")
    seen = []
    try:
        for prompt in ("a", "b", "c"):
            backend.submit(prompt, SamplingParams(max_tokens=1000), seen.append)
        assert wait_for(lambda: engine.running == 1 and len(seen) >= 2, 10)
        health = backend.health()
        assert (health.alive, health.running, health.waiting, health.reason) == (True, 1, 2, None)
        assert 0 <= health.no_progress_s < 5  # the loop comes round after every 10 ms step
    finally:
        backend.close()
    closed = backend.health()
    assert not closed.alive and "stopped" in closed.reason


def test_unavailable_tells_dead_from_wedged_from_fine():
    fine = EngineHealth(True, 1, "batched", "fake", running=1, no_progress_s=0.2)
    assert unavailable(fine, wedged_after_s=1) is None
    assert "wedged" in unavailable(EngineHealth(True, 1, "batched", "fake", waiting=3, no_progress_s=2), 1)
    assert unavailable(EngineHealth(False, None, "process", "q4_1", reason="killed"), 1) == "killed"
    assert unavailable(EngineHealth(False, None, "process", "q4_1"), 1) == "the engine is not running"


# --------------------------------------------------------------------------------------------------------
# Engine death: a fault in the loop itself, outside any forward.
def break_the_policy(backend) -> None:
    def schedule(free_slots):
        raise RuntimeError("injected loop fault")
    backend.core.policy.schedule = schedule


def break_engine_end(backend) -> None:
    def end(seq):  # called by the loop when a sequence leaves, never inside a forward
        raise RuntimeError("injected loop fault")
    backend.engine.end = end


class Stream(threading.Thread):
    """Reads one SSE stream to its end."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.events, self.status, self.ended_at = [], None, None

    def run(self):
        with httpx.Client(timeout=30) as client, connect_sse(client, "POST", self.url + self.path,
                                                              json=self.body) as source:
            self.status = source.response.status_code
            for event in source.iter_sse():
                self.events.append(event.data if event.data == "[DONE]" else json.loads(event.data))
        self.ended_at = time.monotonic()


def error_message(path: str, response: httpx.Response) -> str:
    body = response.json()
    return body["error"]["message"] if path.startswith("/v1") else body["detail"]


@pytest.mark.parametrize("kind", ["batched", "thread"])
@pytest.mark.parametrize("breaking", [break_the_policy, break_engine_end], ids=["policy", "engine_end"])
def test_engine_death_ends_every_stream_and_later_requests_get_503(kind, breaking):
    # Two slots, three streams: two run, one waits; a non-streaming request waits too.
    engine = fake_engine(prefill_ms=1, step_ms=10, config=EngineConfig(model="fake", threads=1, max_batch=2))
    app = create_app(engine, kind)
    with UvicornServer(app) as server:
        backend = app.state.backend
        streams = [Stream(server.url, path, {**body, "max_tokens": 1000, "stream": True})
                   for path, body in ROUTES.items()]
        for stream in streams:
            stream.start()
        assert wait_for(lambda: engine.running == 2 and backend.health().waiting == 1, 10)
        blocking = {}
        waiter = threading.Thread(target=lambda: blocking.update(r=httpx.post(
            server.url + "/generate", json={"prompt": "hi", "max_tokens": 1000}, timeout=30)))
        waiter.start()
        assert wait_for(lambda: backend.health().waiting == 2, 10)

        breaking(backend)
        if breaking is break_engine_end:  # the loop breaks when a sequence next leaves: one more joins and leaves
            leaving = backend.submit("x", SamplingParams(max_tokens=1), lambda item: None)
            assert wait_for(lambda: leaving.seq is not None, 10)  # admitted: it waits for a slot
            leaving.cancel.set()
        broke_at = time.monotonic()
        for stream in streams:
            stream.join(5)
        waiter.join(5)

        health = httpx.get(server.url + "/health", timeout=5)
        later = {path: httpx.post(server.url + path, json={**body, "max_tokens": 2}, timeout=5)
                 for path, body in ROUTES.items()}
        later_stream = httpx.post(server.url + "/generate", json={"prompt": "hi", "stream": True}, timeout=5)

    for stream in streams:  # each ended with an error event, then [DONE], within 2 s
        assert stream.status == 200 and stream.events[-1] == "[DONE]", stream.events[-3:]
        error = stream.events[-2]["error"]
        assert "engine thread died" in error["message"] and "injected loop fault" in error["message"], error
        assert stream.ended_at - broke_at < 2.0
    assert blocking["r"].status_code == 503 and "engine thread died" in blocking["r"].json()["error"]["message"]
    if breaking is break_the_policy:  # the engine itself still works: the dead loop freed every slot
        assert engine.running == 0 and engine.runner.free_slots == 2
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert health.json()["state"] == "failed"  # an engine thread is never restarted
    assert "injected loop fault" in health.json()["reason"] and health.json()["engine"]["alive"] is False
    for path, response in {**later, "stream": later_stream}.items():
        assert response.status_code == 503, (path, response.text)
        assert "engine thread died" in error_message(path, response)
    assert later["/v1/completions"].json()["error"]["type"] == "service_unavailable_error"


def test_a_dead_engine_thread_refuses_new_work_with_engine_dead_error():
    engine = fake_engine(prefill_ms=1, step_ms=1)
    backend = make_backend(engine, "thread")
    try:
        assert backend.generate("a", SamplingParams(max_tokens=2)).text == " one two"
        break_the_policy(backend)
        with pytest.raises(EngineDeadError, match="injected loop fault"):
            backend.generate("a", SamplingParams(max_tokens=2))
        assert wait_for(lambda: not backend.alive, 5)
        with pytest.raises(EngineDeadError, match="injected loop fault"):
            backend.generate("a", SamplingParams(max_tokens=2))
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------------------
# A wedged engine: a forward that does not return. /health says so; it recovers when the forward ends.
def test_a_wedged_engine_is_reported_and_refused_until_it_moves_again():
    engine = fake_engine(prefill_ms=1, step_ms=1)
    release, real_forward, calls = threading.Event(), engine.runner.forward, []

    def forward(entries):
        calls.append(len(entries))
        if len(calls) == 3:
            release.wait(30)  # stuck inside the forward
        return real_forward(entries)

    engine.runner.forward = forward
    app = create_app(engine, limits=ServerLimits(wedged_after_s=0.3))
    with UvicornServer(app) as server:
        stream = Stream(server.url, "/generate", {"prompt": "hi", "max_tokens": 6, "stream": True})
        stream.start()
        assert wait_for(lambda: len(calls) == 3, 10)
        time.sleep(0.5)
        wedged = httpx.get(server.url + "/health", timeout=5)
        refused = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        release.set()
        stream.join(10)
        after = httpx.get(server.url + "/health", timeout=5)
    assert wedged.status_code == 503 and "wedged" in wedged.json()["reason"]
    assert wedged.json()["engine"]["alive"] is True and wedged.json()["engine"]["running"] == 1
    assert refused.status_code == 503 and "wedged" in refused.json()["detail"]
    assert after.status_code == 200 and after.json()["engine"]["no_progress_s"] == 0.0
    assert stream.events[-1] == "[DONE]" and stream.events[-2]["usage"]["completion_tokens"] == 6


@pytest.mark.model
@pytest.mark.timeout(300)
def test_engine_death_with_the_real_model(default_engine):
    # The policy belongs to this app's backend only: the shared engine is left as it was.
    app = create_app(default_engine, "batched")
    with UvicornServer(app) as server:
        streams = [Stream(server.url, path, {**body, "max_tokens": 500, "stream": True, "temperature": 0})
                   for path, body in ROUTES.items()]
        for stream in streams:
            stream.start()
        assert wait_for(lambda: default_engine.running == 3, 120)
        break_the_policy(app.state.backend)
        broke_at = time.monotonic()
        for stream in streams:
            stream.join(10)
        health = httpx.get(server.url + "/health", timeout=5)
        later = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=5)
    for stream in streams:
        assert stream.events[-1] == "[DONE]" and "injected loop fault" in stream.events[-2]["error"]["message"]
        assert stream.ended_at - broke_at < 2.0
    assert health.status_code == 503 and later.status_code == 503
    assert later.json()["error"]["type"] == "service_unavailable_error"
    assert default_engine.running == 0  # the dead loop freed its sequences' cache slots on the way out
