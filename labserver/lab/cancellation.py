"""Notebook 4's experiments (cancellation): a client that leaves early, and what the engine did meanwhile.
The notebook reaches these names as ``lab.NAME``, with ``measure`` from ``runs`` and the display helpers.

Left out: how the server notices a disconnect (``serve``); this module only watches the engine's counters.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx

from ..measure.client import stream_generate
from ..measure.plotting import LabFigure
from .display import PROMPT, print_table
from .runs import measure

__all__ = ["PROMPT", "print_table", "measure", "CancelRun", "wait_idle", "hang_up", "plot_cancel"]


@dataclass
class CancelRun:
    """One request whose client leaves early, and what the engine did meanwhile (times in ms from the send)."""
    label: str
    received: int                  # token events the client read before leaving
    generated: int                 # tokens the engine computed for this request
    hangup_ms: float               # when the client left
    idle_ms: float | None          # when the engine had no running generation any more
    samples: list[tuple[float, int, int]]  # (t_ms, tokens generated so far, running generations)
    arrival_ms: list[float] = field(default_factory=list)

    @property
    def wasted(self) -> int:
        return self.generated - self.received

    def row(self) -> dict:
        after = None if self.idle_ms is None else self.idle_ms - self.hangup_ms
        return {"request": self.label, "received": self.received, "generated": self.generated,
                "wasted": self.wasted, "left at ms": self.hangup_ms, "engine idle ms after": after}


class _Watcher:
    """Samples the engine's counters every ``interval_ms`` on its own thread."""

    def __init__(self, engine, interval_ms: float = 5.0):
        self.engine, self.interval_s = engine, interval_ms / 1000
        self.start_s = time.perf_counter()
        self.base = engine.tokens_generated
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labserver-watch", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(((time.perf_counter() - self.start_s) * 1000,
                                 self.engine.tokens_generated - self.base, self.engine.running))
            self._stop.wait(self.interval_s)

    def now_ms(self) -> float:
        return (time.perf_counter() - self.start_s) * 1000

    def stop(self):
        self._stop.set()
        self._thread.join()


def wait_idle(engine, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.005)


def hang_up(engine, url: str, *, stream: bool = True, after_tokens: int = 5, after_s: float = 0.5,
            max_tokens: int = 64, prompt: str = PROMPT, label: str = "", linger_s: float = 0.3) -> CancelRun:
    """Send one greedy request and leave early; watch the engine's counters until it is idle again.

    Streaming: read ``after_tokens`` token events, then close the connection. Not streaming: give up after
    ``after_s`` seconds (a client timeout). The server runs on ``engine`` (the same object, so its counters
    are exact). Waits for the engine to be idle, then ``linger_s`` more, so a generation that kept going
    would show.
    """
    wait_idle(engine)
    watch = _Watcher(engine)
    arrival: list[float] = []
    if stream:
        trace = stream_generate(url, prompt, max_tokens, 0.0, stop_after=after_tokens)
        offset = (trace.sent_s - watch.start_s) * 1000
        arrival = [offset + t for t in trace.arrival_ms]
    else:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        try:
            httpx.post(url.rstrip("/") + "/generate", json=body, timeout=httpx.Timeout(after_s, connect=10))
        except httpx.TimeoutException:
            pass
    hangup_ms = watch.now_ms()
    wait_idle(engine)
    idle_ms = watch.now_ms() if engine.running == 0 else None
    time.sleep(linger_s)
    watch.stop()
    return CancelRun(label or ("stream" if stream else "blocking"), len(arrival),
                     watch.samples[-1][1] if watch.samples else 0, hangup_ms, idle_ms, watch.samples, arrival)


def plot_cancel(runs: Sequence[CancelRun]) -> LabFigure:
    """Per request: tokens the engine computed vs tokens the client received, and when the client left."""
    fig = LabFigure(figsize=(4 * len(runs), 3.4), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        t_s = [t / 1000 for t, _, _ in run.samples]
        ax.plot(t_s, [n for _, n, _ in run.samples], color="tab:gray", linewidth=2, label="computed by the engine")
        ax.step([0.0] + [t / 1000 for t in run.arrival_ms], range(run.received + 1), where="post",
                color="tab:blue", label="received by the client")
        ax.axvline(run.hangup_ms / 1000, color="tab:red", linestyle="--", label="client left")
        ax.set(title=f"{run.label}: {run.wasted} tokens for nobody", xlabel="s after the request was sent",
               ylabel="tokens")
        ax.legend(fontsize=7, loc="center right")
    return fig
