"""The process backend over HTTP on the fake runner: the same SSE as the engine thread on /generate and
/v1, stop strings applied in the API process, a killed engine process, several API processes."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import fake_engine
from labserver.serve.api_servers import API_SERVER_HEADER, start_api_servers
from labserver.serve.background import start_fastapi, stop
from tests.waiting import seconds_until

TIMED = ("step_ms", "prefill_time_ms", "timings", "id", "created")


def untimed(data: str):
    """An SSE payload without what differs from run to run (times, ids)."""
    if data == "[DONE]":
        return data
    d = json.loads(data)
    return {k: v for k, v in d.items() if k not in TIMED}


def events(url: str, path: str, body: dict, client: httpx.Client | None = None) -> list[str]:
    with httpx.Client(timeout=60) as own:
        with connect_sse(client or own, "POST", url + path, json=body) as source:
            assert source.response.status_code == 200
            return [event.data for event in source.iter_sse()]


def check_disconnect_aborts(server, body: dict) -> None:
    """Read three token events, leave; the engine process's running count is 0 a step or two later."""
    backend = server.app.state.backend
    with httpx.Client(timeout=60) as client, connect_sse(client, "POST", server.url + "/generate", json=body) as src:
        received = []
        for event in src.iter_sse():
            received.append(event.json())
            if len(received) == 3:
                break
    assert backend.running == 1 or backend.running == 0  # nothing else runs on this server
    slowest_step_s = max(e["step_ms"] for e in received[1:]) / 1000
    # One second, or two decode steps on a machine so busy that a step takes longer than that.
    waited = seconds_until(lambda: backend.running == 0, timeout_s=max(1.0, 2 * slowest_step_s))
    assert backend.running == 0, f"the engine process still runs it {waited:.2f} s after the client left"


def check_kill_mid_stream(server, body: dict, ok_body: dict) -> None:
    """kill -9 the engine process mid-stream: an error event then [DONE] within 2 s; a request meanwhile
    is refused; the supervisor restarts the engine and a request succeeds."""
    backend = server.app.state.backend
    first_pid = backend.health().pid
    with httpx.Client(timeout=60) as client, connect_sse(client, "POST", server.url + "/generate", json=body) as src:
        stream = src.iter_sse()
        for _ in range(3):
            next(stream)
        os.kill(first_pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        rest = [event.data for event in stream]
        ended_s = time.perf_counter() - killed_at
    assert ended_s < 2.0, f"the stream ended {ended_s:.2f} s after the engine died"
    assert json.loads(rest[-2])["error"]["type"] == "EngineDeadError" and rest[-1] == "[DONE]"
    # A restart needs a fresh interpreter to import torch (seconds): these requests come before it.
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 503 and str(first_pid) in health.json()["reason"]
    meanwhile = httpx.post(server.url + "/generate", json=ok_body, timeout=60)
    assert meanwhile.status_code == 503 and str(first_pid) in meanwhile.text, meanwhile.text
    seconds_until(lambda: backend.health().ok, timeout_s=180)
    health = backend.health()
    assert health.ok and health.restarts == 1 and health.pid != first_pid
    again = httpx.post(server.url + "/generate", json=ok_body, timeout=60)
    assert again.status_code == 200 and again.json()["text"]
    engine = httpx.get(server.url + "/health", timeout=10).json()["engine"]
    assert engine["pid"] == health.pid and engine["restarts"] == 1 and engine["backend"] == "process"


@pytest.fixture(scope="module")
def servers():
    """The same fake engine behind the engine thread and behind an engine process."""
    thread = start_fastapi(fake_engine(prefill_ms=10, step_ms=10), backend="batched", name="proc-test-thread")
    process = start_fastapi(fake_engine(prefill_ms=10, step_ms=10), backend="process", name="proc-test-process")
    yield thread, process
    stop("proc-test-thread"), stop("proc-test-process")


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "hi", "max_tokens": 5, "stream": True}),
    ("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 5, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                              "stop": ["four five"], "stream": True}),
])
def test_sse_equals_the_engine_thread(servers, path, body):
    thread, process = servers
    expected = events(thread.url, path, body)
    got = events(process.url, path, body)
    assert [untimed(d) for d in got] == [untimed(d) for d in expected]
    assert got[-1] == "[DONE]" and len(got) > 3


def test_stop_strings_are_cut_in_the_api_process(servers):
    _, process = servers
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stop": ["four"]}
    response = httpx.post(process.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert response["choices"][0]["message"]["content"] == " one two three "
    assert response["choices"][0]["finish_reason"] == "stop"


def test_disconnect_aborts_across_the_boundary(servers):
    _, process = servers
    check_disconnect_aborts(process, {"prompt": "hi", "max_tokens": 1000, "stream": True})


def test_a_killed_engine_process_over_http():
    server = start_fastapi(fake_engine(prefill_ms=5, step_ms=20), backend="process", name="proc-test-kill")
    try:
        check_kill_mid_stream(server, {"prompt": "hi", "max_tokens": 2000, "stream": True},
                              {"prompt": "hi", "max_tokens": 2})
    finally:
        stop("proc-test-kill")


def test_two_api_processes_share_one_engine_process():
    servers = start_api_servers(fake_engine(prefill_ms=20, step_ms=50), 2, name="proc-test-api")
    try:
        assert len(set(servers.api_pids)) == 2 and servers.engine_pid not in servers.api_pids

        def one(_):
            with httpx.Client(timeout=60) as client:  # a connection of its own: the kernel picks a process
                with connect_sse(client, "POST", servers.url + "/generate",
                                 json={"prompt": "hi", "max_tokens": 8, "stream": True}) as source:
                    pid = int(source.response.headers[API_SERVER_HEADER])
                    return pid, [event.data for event in source.iter_sse()]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(16)))
        assert {pid for pid, _ in answers} == set(servers.api_pids)  # both API processes answered
        for _, data in answers:
            assert "".join(json.loads(d)["token"] for d in data[:8]) == " one two three four five six seven eight"
            assert data[-1] == "[DONE]"
        # One engine: streams from both API processes shared its forwards, and each API process's
        # /health names the same engine process.
        assert max(json.loads(d).get("batch") or 0 for _, data in answers for d in data[:8]) > 1
        engines = {}
        for _ in range(100):
            with httpx.Client(timeout=10) as client:  # a new connection each time
                health = client.get(servers.url + "/health")
            engines[int(health.headers[API_SERVER_HEADER])] = health.json()["engine"]["pid"]
            if len(engines) == 2:
                break
        assert engines == {pid: servers.engine_pid for pid in servers.api_pids}
    finally:
        stop("proc-test-api")


def test_health_reports_a_wedged_engine_process():
    # A prefill of 3 s stands for a forward that does not return: the engine process's loop does not come
    # round, its beats say so, and /health answers 503 "wedged" past the limit, then 200 again.
    from labserver.serve.limits import ServerLimits

    server = start_fastapi(fake_engine(prefill_ms=3000, step_ms=1), backend="process", name="proc-test-wedge",
                           limits=ServerLimits(wedged_after_s=1.0))
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, server.url + "/generate", json={"prompt": "hi", "max_tokens": 2},
                                 timeout=60)
            time.sleep(2.0)
            wedged = httpx.get(server.url + "/health", timeout=10)
            done = answer.result()
        after = httpx.get(server.url + "/health", timeout=10)
        assert wedged.status_code == 503 and "wedged" in wedged.json()["reason"]
        assert wedged.json()["engine"]["alive"] is True and wedged.json()["engine"]["pid"] != os.getpid()
        assert done.status_code == 200 and done.json()["text"] == " one two"
        assert after.status_code == 200 and after.json()["engine"]["no_progress_s"] < 1.0
    finally:
        stop("proc-test-wedge")


@pytest.mark.parametrize("path,body", [("/generate", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_a_non_streaming_client_that_leaves_aborts_across_the_boundary(servers, path, body):
    _, process = servers
    backend = process.app.state.backend
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes its connection
        httpx.post(process.url + path, json={**body, "max_tokens": 2000}, timeout=httpx.Timeout(10, read=0.5))
    # 2000 steps of 10 ms: unnoticed, the generation would go on for ~20 s.
    waited = seconds_until(lambda: backend.running == 0, timeout_s=1.0)
    assert backend.running == 0, f"the engine process still runs it {waited:.2f} s after the client left"


def test_two_api_processes_survive_a_killed_engine_process():
    # Neither API process is the engine's parent: each notices the death by its pid, fails its streams,
    # refuses new work with a 503, and says Hello until the restarted engine (same address) answers.
    servers = start_api_servers(fake_engine(prefill_ms=5, step_ms=20), 2, name="proc-test-api-kill")
    try:
        first_pid = servers.engine_pid

        def stream_until_the_end(_):
            with httpx.Client(timeout=60) as client:
                with connect_sse(client, "POST", servers.url + "/generate",
                                 json={"prompt": "hi", "max_tokens": 2000, "stream": True}) as source:
                    api = int(source.response.headers[API_SERVER_HEADER])
                    data = [event.data for event in source.iter_sse()]
                    return api, data, time.perf_counter()

        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream_until_the_end, i) for i in range(8)]
            time.sleep(1.0)  # every stream is running now
            os.kill(first_pid, signal.SIGKILL)
            killed_at = time.perf_counter()
            answers = [s.result() for s in streams]
        assert {api for api, _, _ in answers} == set(servers.api_pids)  # streams through both processes
        for _, data, ended_at in answers:
            assert ended_at - killed_at < 2.0
            assert json.loads(data[-2])["error"]["type"] == "EngineDeadError" and data[-1] == "[DONE]"
        refused = httpx.post(servers.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503
        during = httpx.get(servers.url + "/health", timeout=10).json()
        assert (during["state"], during["attempt"], during["max_restarts"]) == ("restarting", 1, 3), during
        # The supervisor restarts the engine; each API process serves again against the new pid.
        def healthy():
            health = httpx.get(servers.url + "/health", timeout=10)
            return (health.status_code == 200 and health.json()["engine"]["pid"] != first_pid
                    and health.json()["state"] == "ok")
        assert seconds_until(healthy, timeout_s=120) < 120
        seen = set()
        for _ in range(40):
            response = httpx.post(servers.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
            if response.status_code == 200:  # the other process may still wait for its Ready
                assert response.json()["text"] == " one two"
                seen.add(int(response.headers[API_SERVER_HEADER]))
            if seen == set(servers.api_pids):
                break
            time.sleep(0.05)
        assert seen == set(servers.api_pids) and servers.engine_pid != first_pid
    finally:
        stop("proc-test-api-kill")


def test_the_openai_client_streams_from_the_engine_process(servers):
    from openai import OpenAI

    thread, process = servers
    answers = []
    for server in (thread, process):
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        stream = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        answers.append(("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                        chunks[-1].usage.completion_tokens))
    assert answers[1] == answers[0] == (" one two three four five six", 6)


def test_a_killed_api_process_is_replaced_and_the_other_streams_go_on():
    # gunicorn-style: the other API process keeps its streams and the port, the engine keeps running,
    # and a new API process takes the dead one's place; once the replacements are used up, none comes.
    servers = start_api_servers(fake_engine(prefill_ms=5, step_ms=10), 2, name="proc-test-api-replace")
    servers.max_restarts = 1
    try:
        engine_pid, first_pids = servers.engine_pid, list(servers.api_pids)

        def stream(_):
            with httpx.Client(timeout=60) as client:
                with connect_sse(client, "POST", servers.url + "/generate",
                                 json={"prompt": "hi", "max_tokens": 150, "stream": True}) as source:
                    api = int(source.response.headers[API_SERVER_HEADER])
                    try:
                        return api, [event.data for event in source.iter_sse()]
                    except (httpx.TransportError, httpx.RemoteProtocolError):
                        return api, None  # the killed process's own streams are lost with its sockets

        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream, i) for i in range(8)]
            time.sleep(0.5)
            os.kill(first_pids[0], signal.SIGKILL)
            answers = [s.result() for s in streams]
        survivors = [data for api, data in answers if api == first_pids[1]]
        assert survivors and all(data[-1] == "[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == 150
                                 for data in survivors)
        assert seconds_until(lambda: servers.api_restarts == 1 and servers.api_alive == 2, 60) < 60
        assert servers.engine_pid == engine_pid and servers.running
        new_pid = (set(servers.api_pids) - set(first_pids)).pop()
        assert "replaced (1 of 1)" in servers.api_reason
        ok = httpx.post(servers.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200

        os.kill(new_pid, signal.SIGKILL)  # no replacement left: the other one serves on alone
        assert seconds_until(lambda: "not replaced" in (servers.api_reason or ""), 10) < 10
        assert servers.api_alive == 1 and servers.running
        for _ in range(5):
            assert httpx.post(servers.url + "/generate", json={"prompt": "hi", "max_tokens": 2},
                              timeout=30).status_code == 200
    finally:
        stop("proc-test-api-replace")
