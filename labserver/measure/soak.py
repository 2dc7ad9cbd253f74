"""A soak: minutes of mixed, hostile traffic against the engine process behind two API processes, with a
kill of each kind of process, then a report: requests by outcome, none lost, and whether any process keeps
growing.

Traffic, from a few client threads at once: streams and JSON bodies on ``/generate`` and ``/v1``, clients
that leave mid-stream, frozen readers (a raw socket that never calls ``recv``), slowloris headers, and
bad input (a lone UTF-16 surrogate). A third of the way in the engine process is killed, at two thirds an
API process. A stream is *lost* when it ends without ``[DONE]`` though its API process lived: that
fails the soak, as does any 5xx other than the 503 of a dead engine. Resources: RSS, threads and file
descriptors of every process (this one, the engine, each API process) at the start, the middle and the
end; a count that grew in both halves by more than a tolerance has not levelled off, and fails.

    python -m labserver.measure.soak --seconds 300          # the real default model
    python -m labserver.measure.soak --seconds 5 --fake     # the fake engine: a smoke run

Left out: HTTP/1.1 pipelining and TLS, several engine kills in a row (the restart bound is tested
elsewhere), and anything but Linux (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import threading
import time
from collections import Counter

import httpx

from ..serve.api_servers import API_SERVER_HEADER, ApiServers
from ..serve.limits import ServerLimits
from ..serve.process.core_proc import EngineSpec

TOLERANCE = {"rss_mb": 30.0, "threads": 4, "fds": 16}  # growth per half that still counts as flat


def resources(pid: int) -> dict | None:
    """RSS (MB), threads and open file descriptors of ``pid`` from /proc; None once it is gone."""
    try:
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
        return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, KeyError, ValueError):
        return None


class Soak:
    def __init__(self, servers: ApiServers, seconds: float, max_tokens: int, seed: int = 0):
        self.servers, self.seconds, self.max_tokens = servers, seconds, max_tokens
        self.random = random.Random(seed)
        self.outcomes: Counter = Counter()
        self.lost: list[str] = []
        self.killed_api: set[int] = set()
        self.killed_api_at: float | None = None  # monotonic time of the API process kill
        self._lock = threading.Lock()

    def record(self, outcome: str, detail: str = "") -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome == "lost":
                self.lost.append(detail)

    # -- the kinds of traffic ------------------------------------------------------------------------
    def stream(self, path: str, body: dict, leave_after: int | None = None) -> None:
        url = self.servers.url + path
        try:
            with httpx.Client(timeout=120) as client, client.stream("POST", url, json=body) as response:
                api = int(response.headers.get(API_SERVER_HEADER, 0))
                if response.status_code != 200:
                    return self.record(f"http {response.status_code}")
                data, events = [], 0
                try:
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            data.append(line[6:])
                            events += 1
                            if leave_after is not None and events >= leave_after:
                                return self.record("left early")
                except httpx.TransportError:
                    pass
            if data and data[-1] == "[DONE]":
                errored = len(data) > 1 and '"error"' in data[-2]
                return self.record("stream error + [DONE]" if errored else "stream [DONE]")
            self.record("cut with its API process" if api in self.killed_api else "lost", f"{path} api={api}")
        except httpx.TransportError as exc:
            self.record("connect failed", repr(exc))

    def body(self, path: str, body: dict) -> None:
        started = time.monotonic()
        try:
            response = httpx.post(self.servers.url + path, json=body, timeout=120)
            self.record(f"http {response.status_code}")
        except httpx.TransportError:  # no header says which process had it: the kill must have come meanwhile
            killed_meanwhile = self.killed_api_at is not None and self.killed_api_at >= started
            self.record("cut with its API process" if killed_meanwhile else "lost", path)

    def frozen_reader(self) -> None:
        payload = json.dumps({"prompt": "Count to a thousand.", "max_tokens": self.max_tokens,
                              "stream": True, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", self.servers.port)) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            time.sleep(self.random.uniform(1, 3))  # never a recv; then gone
        self.record("frozen reader")

    def slowloris(self) -> None:
        with socket.create_connection(("127.0.0.1", self.servers.port)) as sock:
            try:
                for byte in b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"x" * 40:
                    sock.send(bytes([byte]))
                    time.sleep(0.25)
                self.record("slowloris not cut")
            except OSError:
                self.record("slowloris cut")

    def bad_input(self) -> None:
        body = rb'{"messages": [{"role": "user", "content": "\udfffhi"}]}'
        response = httpx.post(self.servers.url + "/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"}, timeout=30)
        self.record(f"bad input {response.status_code}")

    def one(self) -> None:
        n = self.max_tokens
        kind = self.random.choice(["gen stream", "gen stream", "chat stream", "gen body", "cmpl body", "leave",
                                   "frozen", "slowloris", "bad"])
        if kind == "gen stream":
            self.stream("/generate", {"prompt": "Tell me a story.", "max_tokens": n, "stream": True})
        elif kind == "chat stream":
            self.stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi!"}],
                                                 "max_tokens": n, "stream": True})
        elif kind == "gen body":
            self.body("/generate", {"prompt": "Name a colour.", "max_tokens": n})
        elif kind == "cmpl body":
            self.body("/v1/completions", {"prompt": "The sky is", "max_tokens": n})
        elif kind == "leave":
            self.stream("/generate", {"prompt": "Go on.", "max_tokens": n, "stream": True},
                        leave_after=self.random.randint(1, 4))
        elif kind == "frozen":
            self.frozen_reader()
        elif kind == "slowloris":
            self.slowloris()
        else:
            self.bad_input()

    # -- the run ---------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        pids = {"launcher": os.getpid(), "engine": self.servers.engine_pid,
                **{f"api {i}": pid for i, pid in enumerate(self.servers.api_pids)}}
        return {role: {"pid": pid, **(resources(pid) or {})} for role, pid in pids.items() if pid}

    def run(self, clients: int = 4) -> dict:
        end = time.monotonic() + self.seconds
        snapshots = [self.snapshot()]

        def client():
            while time.monotonic() < end:
                self.one()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(self.seconds / 3)
        os.kill(self.servers.engine_pid, signal.SIGKILL)
        time.sleep(self.seconds / 6)
        snapshots.append(self.snapshot())
        time.sleep(self.seconds / 6)
        victim = self.servers.api_pids[0]
        self.killed_api.add(victim)
        self.killed_api_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join()
        time.sleep(1)  # the last replies' sockets close
        snapshots.append(self.snapshot())
        return {"outcomes": dict(self.outcomes), "lost": self.lost, "resources": snapshots,
                "growing": growing(snapshots), "api_restarts": self.servers.api_restarts}


def growing(snapshots: list[dict]) -> list[str]:
    """Counts of one process (same role, same pid) that grew by more than the tolerance in both halves."""
    start, middle, end = snapshots
    out = []
    for role, last in end.items():
        if start.get(role, {}).get("pid") != last["pid"] or middle.get(role, {}).get("pid") != last["pid"]:
            continue  # replaced meanwhile: its samples are not one process's
        for key, tolerance in TOLERANCE.items():
            first_half = middle[role].get(key, 0) - start[role].get(key, 0)
            second_half = last.get(key, 0) - middle[role].get(key, 0)
            if key in last and first_half > tolerance and second_half > tolerance:
                out.append(f"{role} {key}: {start[role][key]:g} -> {middle[role][key]:g} -> {last[key]:g}")
    return out


def soak(seconds: float, max_tokens: int = 64, fake: bool = False) -> dict:
    """Start the service, run the soak, stop it: the report, with ``"failed"`` saying why (or [])."""
    if fake:
        from ..engine.fake import fake_engine

        spec = EngineSpec.of(fake_engine(prefill_ms=5, step_ms=5))
    else:
        from ..config import EngineConfig

        spec = EngineSpec(EngineConfig.from_env())
    # Short deadlines, so frozen readers and slowloris clients are cut within the run.
    limits = ServerLimits(send_timeout_s=2, header_timeout_s=2, idle_timeout_s=2)
    servers = ApiServers(spec, 2, limits=limits).start()
    try:
        report = Soak(servers, seconds, max_tokens).run()
    finally:
        servers.stop()
    server_errors = [k for k in report["outcomes"] if k.startswith("http 5") and k != "http 503"]
    report["failed"] = ([f"lost: {len(report['lost'])}"] if report["lost"] else []) + report["growing"] + \
        [f"server errors: {k}" for k in server_errors]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labserver.measure.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300, help="how long the traffic runs (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default %(default)s)")
    p.add_argument("--fake", action="store_true", help="the fake engine instead of the default model")
    args = p.parse_args(argv)
    report = soak(args.seconds, args.max_tokens, args.fake)
    print(json.dumps(report, indent=1))
    print("soak:", "FAILED: " + "; ".join(report["failed"]) if report["failed"] else "passed")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
