"""Notebook 7's experiments (the engine in its own process): the same server with its engine on a thread
of the API process (backend ``"batched"``) and in a process of its own (backend ``"process"``), compared
while the API process works hard, per token, and when the engine dies. The notebook reaches these names
as ``lab.NAME``.

- ``ApiLoad``: many clients posting large prompts that the API process tokenizes and refuses (400: too
  many tokens), so only the API process works; ``measure`` (from ``runs``) times one stream meanwhile.
- ``kill_engine``: a fault that ends the engine thread's loop, or ``kill -9`` of the engine process,
  while streams run; ``HealthWatch`` records what ``/health`` said every few ms before and after.

Left out: several API processes (``--api-servers``), and how the backends detect death and restart
(``serve``); this module only watches from the outside, as a client would.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import httpx

from ..measure.client import stream_generate
from ..measure.plotting import LabFigure
from ..measure.stats import percentiles
from ..measure.trace import Trace
from .display import PROMPT, median, print_table
from .runs import Run, measure

__all__ = ["PROMPT", "print_table", "measure", "big_prompt", "ApiLoad", "loaded_row", "HealthWatch",
           "engine_pid", "Death", "kill_engine", "plot_isolation", "plot_death"]

SENTENCE = "The quick brown fox jumps over the lazy dog. "


def big_prompt(engine) -> str:
    """The longest prompt the server reads (``max_prompt_chars``): English text of ~4.5 characters a token,
    so it tokenizes to more than ``max_prompt_tokens`` and is refused after the API process has done the
    work of reading, parsing and tokenizing it. ``ApiLoad`` checks that every answer is that 400."""
    n = engine.config.max_prompt_chars
    return (SENTENCE * (n // len(SENTENCE) + 1))[:n]


class ApiLoad:
    """``clients`` HTTP clients, each posting ``prompt`` to ``/generate`` again as soon as its last answer
    came, on their own thread and event loop, until the ``with`` block ends; ``statuses`` counts answers."""

    def __init__(self, url: str, prompt: str, clients: int = 8):
        self.url, self.prompt, self.clients = url.rstrip("/") + "/generate", prompt, clients
        self.statuses: Counter = Counter()
        self.elapsed_s = 0.0
        self._stop = threading.Event()
        self._started = threading.Event()

    async def _client(self, http: httpx.AsyncClient) -> None:
        body = {"prompt": self.prompt, "max_tokens": 1}
        while not self._stop.is_set():
            response = await http.post(self.url, json=body)
            self.statuses[response.status_code] += 1

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=self.clients)) as http:
            self._started.set()
            await asyncio.gather(*(self._client(http) for _ in range(self.clients)))

    def __enter__(self) -> "ApiLoad":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="labserver-api-load",
                                        daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
        self.elapsed_s = time.perf_counter() - self._t0
        if set(self.statuses) - {400}:
            raise RuntimeError(f"the load was meant to be refused (400) before reaching the engine: {self.statuses}")

    @property
    def per_s(self) -> float:
        return sum(self.statuses.values()) / self.elapsed_s if self.elapsed_s else 0.0


def loaded_row(backend: str, load: str, run: Run, api: ApiLoad | None = None) -> dict:
    """One line of the isolation table: the server's steps, the client's gaps, ``/health``."""
    steps, gaps = percentiles(run.trace.decode_step_ms), percentiles(run.trace.itl_ms)
    health = run.probe.summary()
    return {"backend": backend, "API load": load, "step p50 ms": steps[50], "step p99 ms": steps[99],
            "ITL p50 ms": gaps[50], "ITL p99 ms": gaps[99], "/health p50 ms": health["p50_ms"],
            "/health p99 ms": health["p99_ms"], "refused/s": api.per_s if api else None}


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
class Death:
    """What clients saw when the engine died: times in ms from the kill."""
    backend: str
    how: str
    pid_before: int | None
    streams: list[Trace]
    ended_ms: list[float | None]  # each stream: its end ([DONE] or the connection closed) after the kill
    watch: HealthWatch
    kill_ms: float  # on the watch's clock
    during_status: int | None  # a new request sent right after the kill: its HTTP status
    back_ms: float | None  # /health answered 200 again (a restarted engine), after the kill

    @property
    def pid_after(self) -> int | None:
        ok = [pid for t, status, pid, _ in self.watch.samples if status == 200 and t > self.kill_ms]
        return ok[-1] if ok else None

    def statuses_after(self) -> list[int]:
        return [status for t, status, _, _ in self.watch.samples if t > self.kill_ms]

    def row(self) -> dict:
        errors = [t.error.get("type") if t.error else None for t in self.streams]
        return {"backend": self.backend, "killed by": self.how, "streams": len(self.streams),
                "ended with an error": sum(e is not None for e in errors),
                "saw [DONE]": sum(t.done_ms is not None and t.error is not None for t in self.streams),
                "last stream ended ms": max((e for e in self.ended_ms if e is not None), default=None),
                "new request got": self.during_status, "/health 503 seen": 503 in self.statuses_after(),
                "pid before": self.pid_before, "pid after": self.pid_after, "healthy again ms": self.back_ms}


def _inject_loop_fault(server) -> None:
    """Make the engine thread's loop itself fail (not one request's forward): its policy's next
    ``schedule`` raises, outside the try that turns a failed forward into that request's error."""
    backend = server.app.state.backend

    def schedule(*args, **kwargs):
        raise RuntimeError("injected fault: the engine loop failed")

    backend.policy.schedule = schedule


def kill_engine(server, backend: str, step_ms: float, streams: int = 2, after_tokens: int = 4,
                wait_back_s: float = 60.0) -> Death:
    """Start ``streams`` long greedy streams, and once each has ``after_tokens`` tokens kill the engine:
    ``kill -9`` of the engine process (backend ``"process"``) or a fault in the engine thread's loop.
    Then send one more request, and watch ``/health`` until it answers 200 again (or ``wait_back_s``).

    The streams ask for ``ignore_eos`` and enough tokens to run ~20 s at ``step_ms``, so they are
    mid-way when the engine dies; a client read timeout of 20 s makes a stream that never ends show as
    an error instead of a hang.
    """
    url = server.url
    max_tokens = int(min(2000, max(64, 20_000 / step_ms)))
    started = [threading.Event() for _ in range(streams)]
    traces: list[Trace | None] = [None] * streams
    ended_s: list[float | None] = [None] * streams

    def one(i: int) -> None:
        count = [0]

        def on_token(_text):
            count[0] += 1
            if count[0] >= after_tokens:
                started[i].set()
        try:
            traces[i] = stream_generate(url, PROMPT, max_tokens, 0.0, on_token=on_token, ignore_eos=True,
                                        timeout=httpx.Timeout(20.0, connect=10.0))
        except httpx.HTTPError as exc:
            traces[i] = Trace(prompt=PROMPT, error={"type": type(exc).__name__, "message": str(exc)})
        ended_s[i] = time.perf_counter()
        started[i].set()

    pid = engine_pid(url)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for event in started:
        event.wait(60)
    watch = HealthWatch(url, interval_ms=20)
    watch.wait_for(lambda status, _pid: status == 200, 10)
    kill_s = time.perf_counter()
    if backend == "process":
        os.kill(pid, signal.SIGKILL)
        how = "kill -9"
    else:
        _inject_loop_fault(server)
        how = "loop fault"
    for t in threads:
        t.join(30)
    during = httpx.post(url + "/generate", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30).status_code
    came_back = watch.wait_for(lambda status, p: status == 200 and p != pid, wait_back_s if backend == "process" else 2)
    watch.stop()
    kill_ms = (kill_s - watch.start_s) * 1000
    back = [t for t, status, p, _ in watch.samples if t > kill_ms and status == 200 and p != pid]
    return Death(backend, how, pid, [t for t in traces if t is not None],
                 [None if e is None else (e - kill_s) * 1000 for e in ended_s], watch, kill_ms, during,
                 back[0] - kill_ms if came_back and back else None)


COLORS = {"batched": "tab:blue", "process": "tab:green"}


def plot_isolation(runs: Mapping[tuple[str, str], Run]) -> LabFigure:
    """Left: server step_ms per token; middle: client ITL per token; right: /health latency, for each
    (backend, load) run: quiet dotted, loaded solid."""
    fig = LabFigure(figsize=(13, 3.8), layout="constrained")
    steps, gaps, health = fig.subplots(1, 3)
    for (backend, load), run in runs.items():
        style = dict(color=COLORS.get(backend), linestyle="-" if load != "quiet" else ":", marker=".")
        label = f"{backend}, {load}"
        steps.plot(range(1, run.trace.n_tokens), run.trace.decode_step_ms, label=label, **style)
        gaps.plot(range(1, run.trace.n_tokens), run.trace.itl_ms, label=label, **style)
        if run.probe.samples:
            health.plot([t / 1000 for t, _ in run.probe.samples], [lat for _, lat in run.probe.samples],
                        label=label, **style)
    steps.set(title="Server step_ms (in the engine's process)", xlabel="token index", ylabel="ms", ylim=(0, None))
    gaps.set(title="Client gap between tokens (ITL)", xlabel="token index", ylabel="ms", ylim=(0, None))
    health.set(title="/health latency", xlabel="s since the stream was sent", ylabel="ms", yscale="log")
    for ax in (steps, gaps, health):
        ax.legend(fontsize=7)
    return fig


def plot_death(deaths: Sequence[Death]) -> LabFigure:
    """Per backend: /health's status code around the kill, and when each stream ended."""
    fig = LabFigure(figsize=(6 * len(deaths), 3.4), layout="constrained")
    for ax, death in zip(fig.subplots(1, len(deaths), squeeze=False)[0], deaths):
        t_s = [(t - death.kill_ms) / 1000 for t, *_ in death.watch.samples]
        ax.plot(t_s, [status for _, status, _, _ in death.watch.samples], ".", color="tab:gray",
                label="/health status")
        for i, end in enumerate(death.ended_ms):
            if end is not None:
                ax.axvline(end / 1000, color=f"C{i + 2}", linestyle=":", label=f"stream {i + 1} ended")
        ax.axvline(0, color="tab:red", linestyle="--", label=death.how)
        ax.set(title=f"{death.backend}: the engine dies", xlabel="s after the kill", ylabel="HTTP status",
               ylim=(0, 600))
        ax.legend(fontsize=7, loc="lower right")
    return fig


def median_ratio(run: Run) -> float | None:
    """Client ITL p50 / server step_ms p50 of one run (P1 of ``make bench``)."""
    itl, step = median(run.trace.itl_ms), median(run.trace.decode_step_ms)
    return itl / step if itl and step else None
