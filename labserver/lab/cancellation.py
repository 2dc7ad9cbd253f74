"""Notebook 4's experiments (cancellation): a client that leaves early, what the engine did meanwhile, and a
minimal non-streaming endpoint whose way of waiting for the answer the notebook swaps.

``measure_timing`` reads this machine's prefill and step times, so the demos size themselves from them
(``blocking_plan``: a blocking client gives up after a third of the generation it asked for). ``hang_up``
sends one request, leaves, and samples the engine's counters meanwhile; its ``CancelRun`` records what the
client got and whether its timeout fired. ``start_json_app(engine, wait)`` serves a non-streaming
``/generate`` whose handler awaits the answer through ``wait(request, work)``: ``just_wait`` listens for
nobody (what a handler does unless it watches ``http.disconnect``); the notebook's exercise writes one that
does. The notebook reaches these names as ``lab.NAME``, with ``measure`` from ``runs``.

Left out: how the real server notices a disconnect (``serve``); the JSON app has no limits, validation
beyond its fields, or OpenAI routes.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..config import SamplingParams
from ..measure.client import stream_generate
from ..measure.plotting import LabFigure
from .display import PROMPT, print_table
from .runs import measure

__all__ = ["PROMPT", "print_table", "measure", "Timing", "measure_timing", "blocking_plan", "CancelRun",
           "wait_idle", "hang_up", "plot_cancel", "just_wait", "json_app", "start_json_app"]


@dataclass
class Timing:
    """This machine's prefill of the prompt and one decode step, in ms (from the server's own events), and
    the step its route calibration measured when the engine first started here (``quiet_step_ms``)."""
    prefill_ms: float
    step_ms: float
    quiet_step_ms: float | None = None

    def generation_ms(self, max_tokens: int) -> float:
        return self.prefill_ms + (max_tokens - 1) * self.step_ms

    def fastest(self) -> "Timing":
        """The same machine at its fastest: if the calibration's step was quicker than now (other work
        shares the cores now), prefill and step scaled down by that factor."""
        if not self.quiet_step_ms or self.quiet_step_ms >= self.step_ms:
            return self
        scale = self.quiet_step_ms / self.step_ms
        return Timing(self.prefill_ms * scale, self.quiet_step_ms, self.quiet_step_ms)


def measure_timing(url: str, engine=None, prompt: str = PROMPT, max_tokens: int = 16, runs: int = 2) -> Timing:
    """The fastest of ``runs`` short greedy streams: its prefill and its median step; with ``engine``, also
    the step its route calibration measured (``engine.route["measured_ms"]``, None if it has none)."""
    found = [measure(url, prompt, max_tokens) for _ in range(runs)]
    route = engine.route if engine is not None else {}
    quiet = (route.get("measured_ms") or {}).get(route.get("quant"))
    return Timing(min(r.trace.prefill_time_ms for r in found), min(r.step_p50_ms for r in found), quiet)


def blocking_plan(timing: Timing, min_tokens: int = 48, max_tokens: int = 400,
                  min_ms: float = 1500.0) -> tuple[int, float]:
    """(tokens to ask for, seconds after which the client gives up) for the blocking demo.

    Planned on ``timing.fastest()``: the generation takes at least ``min_ms`` there (so that a third of
    it is far above an HTTP round trip), and at least ``min_tokens`` tokens; the client leaves after a
    third of it. The machine can only be slower than its fastest, so the client surely leaves first;
    when other work slows the machine down, it leaves earlier in the generation, never after it.
    """
    fast = timing.fastest()
    n = math.ceil((min_ms - fast.prefill_ms) / fast.step_ms) + 1
    n = max(min_tokens, min(max_tokens, n))
    return n, fast.generation_ms(n) / 3 / 1000


@dataclass
class CancelRun:
    """One request whose client leaves early, and what the engine did meanwhile (times in ms from the send).

    ``received``: tokens the client got (streamed events read; for a non-streaming request the whole
    answer, or 0 if it gave up). ``timed_out``: whether the non-streaming client's timeout fired (None for
    a stream, which leaves by closing the connection).
    """
    label: str
    stream: bool
    max_tokens: int
    received: int
    generated: int                 # tokens the engine computed for this request
    hangup_ms: float               # when the client left
    idle_ms: float | None          # when the engine had no running generation any more
    samples: list[tuple[float, int, int]]  # (t_ms, tokens generated so far, running generations)
    arrival_ms: list[float] = field(default_factory=list)
    timed_out: bool | None = None

    @property
    def wasted(self) -> int:
        """Tokens computed that the client never got."""
        return self.generated - self.received

    @property
    def at_hangup(self) -> int:
        """Tokens the engine had computed when the client left: the last sample before, or what the client
        had read if more (the sampling runs every ``interval_ms``, the client read them all before leaving)."""
        before = [n for t, n, _ in self.samples if t <= self.hangup_ms]
        return max(before[-1] if before else 0, self.received if self.stream else 0)

    @property
    def after_left(self) -> int:
        return self.generated - self.at_hangup

    @property
    def client(self) -> str:
        if self.stream:
            return f"read {self.received} tokens, closed"
        if self.timed_out:
            return "gave up: its timeout fired"
        return f"got all {self.received} tokens"

    def row(self) -> dict:
        after = None if self.idle_ms is None else self.idle_ms - self.hangup_ms
        return {"request": self.label, "client": self.client, "left at ms": self.hangup_ms,
                "engine computed": self.generated, "after client left": self.after_left,
                "engine idle ms after": after}


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
            self.samples.append((self.now_ms(), self.engine.tokens_generated - self.base, self.engine.running))
            self._stop.wait(self.interval_s)

    def now_ms(self) -> float:
        return (time.perf_counter() - self.start_s) * 1000

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.samples.append((self.now_ms(), self.engine.tokens_generated - self.base, self.engine.running))


def wait_idle(engine, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.005)


def _give_up_after(url: str, body: dict, after_s: float) -> tuple[int, bool]:
    """POST a non-streaming request with a read timeout of ``after_s``: (tokens received, timeout fired)."""
    try:
        response = httpx.post(url.rstrip("/") + "/generate", json=body, timeout=httpx.Timeout(after_s, connect=10))
    except httpx.TimeoutException:
        return 0, True
    if response.status_code != 200:
        raise RuntimeError(f"the request failed: {response.status_code} {response.text[:200]}")
    return response.json()["usage"]["completion_tokens"], False


def hang_up(engine, url: str, *, stream: bool = True, after_tokens: int = 5, after_s: float = 0.5,
            max_tokens: int = 64, prompt: str = PROMPT, label: str = "", linger_s: float = 0.3,
            interval_ms: float = 5.0) -> CancelRun:
    """Send one greedy request (``ignore_eos``: it asks for exactly ``max_tokens``) and leave early; sample
    the engine's counters every ``interval_ms`` until it is idle again, then ``linger_s`` more, so a
    generation that kept going would show.

    Streaming: read ``after_tokens`` token events, then close the connection. Not streaming: give up after
    ``after_s`` seconds (a client read timeout); the run records whether it fired. The server runs on
    ``engine`` (the same object, so its counters are exact).
    """
    wait_idle(engine)
    watch = _Watcher(engine, interval_ms)
    arrival: list[float] = []
    timed_out = None
    if stream:
        trace = stream_generate(url, prompt, max_tokens, 0.0, stop_after=after_tokens, ignore_eos=True)
        offset = (trace.sent_s - watch.start_s) * 1000
        arrival = [offset + t for t in trace.arrival_ms]
        received = len(arrival)
    else:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        received, timed_out = _give_up_after(url, body, after_s)
    hangup_ms = watch.now_ms()
    wait_idle(engine)
    idle_ms = watch.now_ms() if engine.running == 0 else None
    time.sleep(linger_s)
    watch.stop()
    return CancelRun(label or ("stream" if stream else "blocking"), stream, max_tokens, received,
                     watch.samples[-1][1], hangup_ms, idle_ms, watch.samples, arrival, timed_out)


def plot_cancel(runs: Sequence[CancelRun]) -> LabFigure:
    """Per request: tokens the engine computed vs tokens the client received, and when the client left."""
    fig = LabFigure(figsize=(4 * len(runs), 3.4), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        t_s = [t / 1000 for t, _, _ in run.samples]
        ax.plot(t_s, [n for _, n, _ in run.samples], color="tab:gray", linewidth=2, label="computed by the engine")
        ax.step([0.0] + [t / 1000 for t in run.arrival_ms], range(len(run.arrival_ms) + 1), where="post",
                color="tab:blue", label="received by the client")
        ax.axvline(run.hangup_ms / 1000, color="tab:red", linestyle="--", label=f"client left ({run.client})")
        ax.set(title=f"{run.label}: {run.after_left} tokens after it left", xlabel="s after the request was sent",
               ylabel="tokens")
        ax.legend(fontsize=7, loc="center right")
    return fig


# -- a non-streaming endpoint whose waiting the notebook swaps ---------------------------------------------
Wait = Callable[[object, Awaitable], Awaitable]


async def just_wait(request, work):
    """Await the answer; nobody listens for the client meanwhile (it can only be noticed when sending)."""
    return await work


def json_app(engine, wait: Wait = just_wait, backend: str = "batched"):
    """A FastAPI app with one non-streaming ``POST /generate`` (``prompt``, ``max_tokens``, greedy,
    ``ignore_eos``) and ``GET /health``, on its own engine thread. The handler returns
    ``await wait(request, backend.complete(...))`` as JSON; ``None`` (the client left) becomes a 499."""
    from ..serve.backends import make_backend

    @asynccontextmanager
    async def lifespan(app):
        app.state.backend = make_backend(engine, backend).start()
        try:
            yield
        finally:
            app.state.backend.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        params = SamplingParams(max_tokens=int(body.get("max_tokens", 16)), temperature=0.0, ignore_eos=True)
        result = await wait(request, app.state.backend.complete(str(body["prompt"]), params))
        return Response(status_code=499) if result is None else JSONResponse(result.to_dict())

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running}

    return app


def start_json_app(engine, wait: Wait = just_wait, name: str = "json-app"):
    """Serve ``json_app(engine, wait)`` in the background under ``name`` (re-running replaces it)."""
    from ..serve.background import UvicornServer, start_server, stop

    stop(name)
    return start_server(name, UvicornServer(json_app(engine, wait)))
