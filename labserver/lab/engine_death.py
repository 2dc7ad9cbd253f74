"""What clients see when the engine dies, for notebook 7: streams running when the engine thread's loop
fails or the engine process is killed (``kill -9``), one request sent just after, and what ``/health``
said every few ms before and after (``HealthWatch``). ``kill_engine`` returns a ``Death``; ``plot_death``
draws it. Everything is watched from the outside, as a client would: raw SSE lines, status codes.

Left out: how the backends notice a death and restart (``engine.core``, ``serve.process.client``,
``serve.process.supervisor``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import httpx

from ..measure.plotting import LabFigure
from .display import PROMPT


def engine_pid(url: str) -> int | None:
    """The pid of the process that runs the engine, as ``/health`` reports it."""
    return (httpx.get(url.rstrip("/") + "/health", timeout=10).json().get("engine") or {}).get("pid")


@dataclass
class HealthWatch:
    """GET /health every ``interval_ms`` on its own thread: ``samples`` are (ms since ``start_s``, status
    code, engine pid, reason). Unlike ``HealthProbe`` it keeps what each answer said."""
    url: str
    interval_ms: float = 50.0
    samples: list[tuple[float, int, int | None, str | None]] = field(default_factory=list)
    start_s: float = 0.0

    def __post_init__(self):
        self._stop = threading.Event()
        self.start_s = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="labserver-health-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                t_ms = (time.perf_counter() - self.start_s) * 1000
                try:
                    response = http.get(self.url.rstrip("/") + "/health")
                    body = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    self.samples.append((t_ms, 0, None, type(exc).__name__))
                else:
                    engine = body.get("engine") or {}
                    reason = body.get("reason") or engine.get("reason") or body.get("detail")
                    self.samples.append((t_ms, response.status_code, engine.get("pid"), reason))
                self._stop.wait(self.interval_ms / 1000)

    def wait_for(self, predicate, timeout_s: float) -> bool:
        """Wait until the newest sample satisfies ``predicate(status, pid)``; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        seen = len(self.samples)
        while time.monotonic() < deadline:
            if len(self.samples) > seen and predicate(*self.samples[-1][1:3]):
                return True
            time.sleep(self.interval_ms / 4000)
        return False

    def stop(self) -> "HealthWatch":
        self._stop.set()
        self._thread.join()
        return self


@dataclass
class StreamLog:
    """One stream's ``data:`` payloads as they arrived (``time.perf_counter`` seconds), read raw so that
    an error event and the ``[DONE]`` after it both show; ``failure``: the client's own exception."""
    events: list[tuple[float, str]] = field(default_factory=list)
    failure: str | None = None

    @property
    def tokens(self) -> int:
        return sum(data.startswith('{"token"') for _, data in self.events)

    @property
    def error(self) -> str | None:
        errors = [json.loads(data)["error"]["message"] for _, data in self.events if data.startswith('{"error"')]
        return errors[0] if errors else self.failure

    @property
    def error_then_done(self) -> bool:
        data = [d for _, d in self.events]
        return len(data) >= 2 and data[-1] == "[DONE]" and data[-2].startswith('{"error"')

    @property
    def end_s(self) -> float | None:
        return self.events[-1][0] if self.events else None


def read_stream(url: str, body: dict, started: threading.Event, after_tokens: int, timeout_s: float) -> StreamLog:
    """POST a streaming ``body`` to ``/generate`` and log every ``data:`` line; set ``started`` once
    ``after_tokens`` tokens came (or the stream ended). A read timeout ends the log instead of hanging."""
    log = StreamLog()
    try:
        with httpx.stream("POST", url.rstrip("/") + "/generate", json={**body, "stream": True},
                          timeout=httpx.Timeout(timeout_s, connect=10.0)) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    log.events.append((time.perf_counter(), line[5:].strip()))
                    if log.tokens >= after_tokens:
                        started.set()
    except httpx.HTTPError as exc:
        log.failure = f"{type(exc).__name__}: {exc}"
    started.set()
    return log


@dataclass
class Death:
    """What clients saw when the engine died: times in ms from the kill."""
    backend: str
    how: str
    pid_before: int | None
    streams: list[StreamLog]
    watch: HealthWatch
    kill_s: float
    during_status: int  # a new request sent once the streams had ended: its HTTP status
    back_ms: float | None  # /health answered 200 again (a restarted engine), after the kill

    @property
    def kill_ms(self) -> float:
        return (self.kill_s - self.watch.start_s) * 1000

    @property
    def ended_ms(self) -> list[float | None]:
        return [None if s.end_s is None else (s.end_s - self.kill_s) * 1000 for s in self.streams]

    @property
    def last_end_ms(self) -> float:
        """When the last stream ended, after the kill (inf if one never said anything)."""
        ended = self.ended_ms
        return max(ended) if ended and None not in ended else float("inf")

    @property
    def pid_after(self) -> int | None:
        """The engine's pid in /health's last answer, if that answer was 200 (an engine that serves)."""
        last = self.watch.samples[-1] if self.watch.samples else None
        return last[2] if last is not None and last[1] == 200 else None

    def statuses_after(self) -> list[int]:
        return [status for t, status, _, _ in self.watch.samples if t > self.kill_ms]

    def row(self) -> dict:
        return {"backend": self.backend, "killed by": self.how, "streams": len(self.streams),
                "error, then [DONE]": sum(s.error_then_done for s in self.streams),
                "last ended ms after": self.last_end_ms, "new request got": self.during_status,
                "/health 503 seen": 503 in self.statuses_after(), "pid before": self.pid_before,
                "pid after": self.pid_after, "healthy again ms after": self.back_ms}


def _inject_loop_fault(server) -> None:
    """Make the engine thread's loop itself fail (not one request's forward): its policy's next
    ``schedule`` raises, outside the try that turns a failed forward into that request's error."""
    backend = server.app.state.backend

    def schedule(*args, **kwargs):
        raise RuntimeError("injected fault: the engine loop failed")

    backend.core.policy.schedule = schedule


@contextmanager
def _quiet(name: str = "labserver.serve"):
    """The server logs an engine's death with a traceback; here it is the experiment, not news."""
    logger = logging.getLogger(name)
    level, logger.level = logger.level, logging.CRITICAL
    try:
        yield
    finally:
        logger.setLevel(level)


def kill_engine(server, backend: str, step_ms: float, streams: int = 2, after_tokens: int = 4,
                wait_back_s: float = 120.0) -> Death:
    """Start ``streams`` long greedy streams, and once each has ``after_tokens`` tokens kill the engine:
    ``kill -9`` of the engine process (backend ``"process"``) or a fault in the engine thread's loop.
    When the streams have ended, send one more request, and watch ``/health`` until it answers 200 with
    another pid (a restarted engine), for up to ``wait_back_s`` (a thread is not restarted: 2 s).

    The streams ask for ``ignore_eos`` and enough tokens to run ~20 s at ``step_ms``, so they are
    mid-way when the engine dies; a read timeout of 20 s turns a stream that never ends into a failure.
    """
    body = {"prompt": PROMPT, "max_tokens": int(min(2000, max(64, 20_000 / step_ms))), "temperature": 0.0,
            "ignore_eos": True}
    started = [threading.Event() for _ in range(streams)]
    logs: list[StreamLog] = [StreamLog() for _ in range(streams)]

    def one(i: int) -> None:
        logs[i] = read_stream(server.url, body, started[i], after_tokens, 20.0)

    pid = engine_pid(server.url)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
    with _quiet():
        for t in threads:
            t.start()
        for event in started:
            event.wait(60)
        watch = HealthWatch(server.url, interval_ms=20)
        watch.wait_for(lambda status, _pid: status == 200, 10)
        kill_s = time.perf_counter()
        if backend == "process":
            os.kill(pid, signal.SIGKILL)
        else:
            _inject_loop_fault(server)
        for t in threads:
            t.join(30)
        during = httpx.post(server.url + "/generate", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
        back = watch.wait_for(lambda status, p: status == 200 and p != pid,
                              wait_back_s if backend == "process" else 2.0)
        watch.stop()
    death = Death(backend, "kill -9" if backend == "process" else "loop fault", pid, logs, watch, kill_s,
                  during.status_code, None)
    if back:
        death.back_ms = next(t for t, status, p, _ in watch.samples
                             if t > death.kill_ms and status == 200 and p != pid) - death.kill_ms
    return death


def plot_death(deaths: Sequence[Death]) -> LabFigure:
    """Per backend: /health's status code around the kill, and when each stream ended."""
    fig = LabFigure(figsize=(6 * len(deaths), 3.4), layout="constrained")
    for ax, death in zip(fig.subplots(1, len(deaths), squeeze=False)[0], deaths):
        t_s = [(t - death.kill_ms) / 1000 for t, *_ in death.watch.samples]
        statuses = [status for _, status, _, _ in death.watch.samples]
        ax.scatter(t_s, statuses, s=8, c=["tab:green" if s == 200 else "tab:red" for s in statuses],
                   label="/health status (200 green, else red)")
        for i, end in enumerate(death.ended_ms):
            if end is not None:
                ax.axvline(end / 1000, color="tab:blue", linestyle=":", label="a stream ended" if i == 0 else None)
        ax.axvline(0, color="black", linestyle="--", label=death.how)
        ax.set(title=f"{death.backend}: the engine dies", xlabel="s after the kill", ylabel="HTTP status",
               ylim=(0, 600))
        ax.legend(fontsize=7, loc="lower right")
    return fig
