"""When the whole service stops: SIGTERM to a serving process drains it. Open streams may finish for the
drain timeout, then each ends with an error event and [DONE]; a new request meanwhile gets a 503; the
process exits 0. With --api-servers the launcher drains every API process, then stops the engine; an engine
process gone for good stops the service the same way (exit 1).

Each server runs in a subprocess of its own (a real signal, a real exit code) on the fake engine, whose
generations run for as long as max_tokens asks. Deadlines are generous: the machine may be busy.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from labserver.serve.api_servers import API_SERVER_HEADER
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(240)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
ROUTES = {"/generate": {"prompt": "hi"}, "/v1/completions": {"prompt": "hi"}, "/v1/chat/completions": CHAT}
FOREVER = 2000  # tokens (the limit, 2048): 40 s at 20 ms a step, longer than any stream here may last
DRAIN_S = 4.0
EXIT_MARGIN_S = 30.0  # beyond the drain timeout: the last writes, the lifespan, a busy machine

# One server in the foreground, as `python -m labserver serve` runs it, on the fake engine.
THREAD_SERVER = """
import json, sys
from labserver import fake_engine
from labserver.serve.app import create_app
from labserver.serve.background import bind_socket
from labserver.serve.drain import serve_app
from labserver.serve.limits import ServerLimits

limits = ServerLimits(drain_timeout_s=float(sys.argv[1]))
app = create_app(fake_engine(prefill_ms=1, step_ms=20), "batched", limits=limits)
sock = bind_socket("127.0.0.1", 0)
print(json.dumps({"url": f"http://127.0.0.1:{sock.getsockname()[1]}"}), flush=True)
sys.exit(serve_app(app, limits, sockets=[sock], log_level="warning"))
"""

# The launcher of `serve --backend process --api-servers 2`, on the fake engine.
LAUNCHER = """
import json, sys
from labserver import fake_engine
from labserver.serve.api_servers import ApiServers
from labserver.serve.limits import ServerLimits
from labserver.serve.process.core_proc import EngineSpec

spec = EngineSpec.of(fake_engine(prefill_ms=1, step_ms=20))
servers = ApiServers(spec, 2, limits=ServerLimits(drain_timeout_s=float(sys.argv[1])),
                     engine_restarts=int(sys.argv[2])).start()
print(json.dumps({"url": servers.url, "api_pids": servers.api_pids, "engine_pid": servers.engine_pid}), flush=True)
sys.exit(servers.run_foreground())
"""


def start(script: str, *args) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the server is up (or the script failed: then the line is empty)
    assert line, f"the server did not start (exit code {proc.wait(60)})"
    return proc, json.loads(line)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Stream(threading.Thread):
    """Reads one SSE stream to its end, on a connection of its own."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.events, self.status, self.server, self.ended_at, self.error = [], None, None, None, None

    def run(self):
        try:
            with httpx.Client(timeout=60) as client, connect_sse(client, "POST", self.url + self.path,
                                                                  json=self.body) as source:
                self.status, self.server = source.response.status_code, source.response.headers.get(API_SERVER_HEADER)
                for event in source.iter_sse():
                    self.events.append(event.data if event.data == "[DONE]" else json.loads(event.data))
        except Exception as exc:  # a stream cut without [DONE]: the assertions below say so
            self.error = exc
        self.ended_at = time.monotonic()


def open_streams(url: str, bodies: list[tuple[str, dict]]) -> list[Stream]:
    streams = [Stream(url, path, body) for path, body in bodies]
    for stream in streams:
        stream.start()
    assert wait_for(lambda: all(s.events or s.ended_at for s in streams), 60), "the streams did not start"
    return streams


def assert_ended_by_the_drain(stream: Stream, message: str) -> None:
    assert stream.error is None and stream.status == 200, (stream.error, stream.status)
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    error = stream.events[-2]["error"]
    assert message in error["message"], error


def test_sigterm_drains_open_streams_then_exits_0():
    proc, info = start(THREAD_SERVER, DRAIN_S)
    url = info["url"]
    try:
        streams = open_streams(url, [(path, {**body, "max_tokens": FOREVER, "stream": True})
                                     for path, body in ROUTES.items()])
        short = open_streams(url, [("/generate", {"prompt": "hi", "max_tokens": 10, "stream": True})])[0]
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # During the drain: /health and new requests get a 503 that says why; open streams go on.
        assert wait_for(lambda: httpx.get(url + "/health", timeout=10).status_code == 503, 10)
        health = httpx.get(url + "/health", timeout=10).json()
        new = {path: httpx.post(url + path, json={**body, "max_tokens": 2}, timeout=10) for path, body in ROUTES.items()}
        new_stream = httpx.post(url + "/generate", json={"prompt": "hi", "stream": True}, timeout=10)
        during = time.monotonic() - signalled
        code = proc.wait(DRAIN_S + EXIT_MARGIN_S)
        exited = time.monotonic() - signalled
        for stream in [*streams, short]:
            stream.join(10)
    finally:
        proc.kill()
        proc.wait()

    assert during < DRAIN_S, f"the checks during the drain took {during:.1f} s: the machine is too busy to tell"
    assert health["status"] == "unavailable" and health["stopping"] is True and "SIGTERM" in health["reason"]
    for path, response in {**new, "stream": new_stream}.items():
        assert response.status_code == 503, (path, response.text)
        assert "the server is stopping (SIGTERM)" in response.text, response.text
    assert code == 0 and exited < DRAIN_S + EXIT_MARGIN_S
    # A stream that could finish within the drain finished as usual; the others ended at its deadline.
    assert short.events[-1] == "[DONE]" and short.events[-2]["finish_reason"] == "length"
    for stream in streams:
        assert_ended_by_the_drain(stream, "the server is stopping (SIGTERM)")
        assert stream.ended_at - signalled > DRAIN_S - 0.5, "ended before the drain timeout"
    assert streams[0].events[-2]["error"]["type"] == "ServerStopping"


def test_a_drain_timeout_of_0_ends_open_streams_at_once():
    proc, info = start(THREAD_SERVER, 0)
    try:
        streams = open_streams(info["url"], [("/generate", {"prompt": "hi", "max_tokens": FOREVER, "stream": True})])
        proc.send_signal(signal.SIGINT)
        code = proc.wait(EXIT_MARGIN_S)
        streams[0].join(10)
    finally:
        proc.kill()
        proc.wait()
    assert code == 0
    assert_ended_by_the_drain(streams[0], "the server is stopping (SIGINT)")


def test_sigterm_to_the_launcher_drains_every_api_process_then_stops_the_engine():
    proc, info = start(LAUNCHER, DRAIN_S, 3)
    url = info["url"]
    try:
        # New connections go to whichever API process accepts first: open streams until both serve some.
        streams = []
        for _ in range(12):
            streams += open_streams(url, [("/v1/completions", {"prompt": "hi", "max_tokens": FOREVER, "stream": True})])
            if {s.server for s in streams} == {str(pid) for pid in info["api_pids"]}:
                break
        assert {s.server for s in streams} == {str(pid) for pid in info["api_pids"]}, "one API process got no stream"
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The launcher passes the signal on: a request may still be served until an API process has it.
        answers = []
        assert wait_for(lambda: answers.append(httpx.post(url + "/generate", json={"prompt": "hi", "max_tokens": 2},
                                                          timeout=10)) or answers[-1].status_code == 503, DRAIN_S)
        refused = answers[-1]
        code = proc.wait(DRAIN_S + 2 * EXIT_MARGIN_S)
        for stream in streams:
            stream.join(10)
    finally:
        proc.kill()
        proc.wait()
    assert refused.status_code == 503 and "the server is stopping (SIGTERM)" in refused.text, refused.text
    assert code == 0
    for stream in streams:
        assert_ended_by_the_drain(stream, "the server is stopping (SIGTERM)")
        assert stream.ended_at - signalled > DRAIN_S - 0.5, "ended before the drain timeout"
    assert all(gone(pid) for pid in [*info["api_pids"], info["engine_pid"]])


def test_an_engine_process_gone_for_good_stops_the_service_with_exit_1():
    proc, info = start(LAUNCHER, DRAIN_S, 0)  # no restart: the first death is the last
    try:
        streams = open_streams(info["url"], [("/generate", {"prompt": "hi", "max_tokens": FOREVER, "stream": True})])
        os.kill(info["engine_pid"], signal.SIGKILL)
        code = proc.wait(DRAIN_S + 2 * EXIT_MARGIN_S)
        streams[0].join(10)
    finally:
        proc.kill()
        proc.wait()
    assert code == 1
    assert_ended_by_the_drain(streams[0], f"the engine process (pid {info['engine_pid']})")
    assert streams[0].events[-2]["error"]["type"] == "EngineDeadError"
    assert all(gone(pid) for pid in info["api_pids"])
