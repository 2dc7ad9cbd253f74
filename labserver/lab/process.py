"""Notebook 7's experiments (the engine in its own process): the same server with its engine on a thread
of the API process (backend ``"batched"``) and in a process of its own (backend ``"process"``), compared
while the API process works hard, per token, and when the engine dies. The notebook reaches these names
as ``lab.NAME``.

- ``ApiLoad``: many clients posting large prompts that the API process tokenizes and refuses (400: too
  many tokens), so only the API process works; ``measure`` (from ``runs``) times one stream meanwhile.
- ``boundary_bytes``: what one token costs on each side of the boundary.
- ``kill_engine`` and ``plot_death`` (from ``engine_death``): what clients see when the engine dies.

Left out: several API processes (``--api-servers``), and how the backends detect death and restart
(``serve``); this module only watches from the outside, as a client would.
"""
from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from typing import Mapping

import httpx

from ..measure.plotting import LabFigure
from ..measure.stats import percentiles
from .display import PROMPT, median, print_table
from .engine_death import Death, HealthWatch, StreamLog, engine_pid, kill_engine, plot_death
from .runs import Run, measure

__all__ = ["PROMPT", "median", "print_table", "measure", "big_prompt", "ApiLoad", "api_cost_ms", "stream_tokens",
           "boundary_bytes", "loaded_row", "HealthWatch", "engine_pid", "StreamLog", "Death", "kill_engine",
           "plot_isolation", "plot_death"]

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


def api_cost_ms(url: str, prompt: str, n: int = 5) -> float:
    """Median ms the server takes to read, tokenize and refuse ``prompt``, one request at a time."""
    times = []
    with httpx.Client(timeout=60) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            status = http.post(url.rstrip("/") + "/generate", json={"prompt": prompt, "max_tokens": 1}).status_code
            times.append((time.perf_counter() - t0) * 1000)
            if status != 400:
                raise RuntimeError(f"expected the prompt to be refused (400), got {status}")
    return statistics.median(times)


def stream_tokens(step_ms: float, target_ms: float = 2000.0) -> int:
    """Tokens for a stream that lasts about ``target_ms`` at ``step_ms`` a step (24 to 64): long enough
    for the API load to overlap it on a fast machine, short enough on a slow one."""
    return int(min(64, max(24, round(target_ms / step_ms))))


def boundary_bytes(token_id: int = 28723, text: str = " Paris", step_ms: float = 6.25) -> dict:
    """Bytes of one token: in the engine process's output frame (msgpack, ids and times only) and in the
    SSE event the API process makes of it (JSON, with the text)."""
    from ..engine.sequence import TokenEvent
    from ..serve.process import messages as frames
    from ..serve.sse import sse_frame

    empty = len(frames.encode(frames.Outputs(running=1, waiting=0)))
    one = len(frames.encode(frames.Outputs(running=1, waiting=0, tokens=[frames.Token(1, token_id, 5, step_ms)])))
    return {"engine -> API (msgpack)": one - empty, "API -> client (SSE)": len(sse_frame(
        TokenEvent(text, token_id, 5, step_ms).to_dict()))}


def loaded_row(backend: str, load: str, run: Run, api: ApiLoad | None = None) -> dict:
    """One line of the isolation table: the server's steps, the client's gaps (and their ratio, P1 of
    ``make bench``), ``/health``."""
    steps, gaps = percentiles(run.trace.decode_step_ms), percentiles(run.trace.itl_ms)
    health = run.probe.summary()
    return {"backend": backend, "API load": load, "step p50 ms": steps[50], "step p99 ms": steps[99],
            "ITL p50 ms": gaps[50], "ITL p99 ms": gaps[99], "ITL/step p50": gaps[50] / steps[50],
            "/health p50 ms": health["p50_ms"],
            "/health p99 ms": health["p99_ms"], "refused/s": api.per_s if api else None}


COLORS = {"batched": "tab:blue", "process": "tab:green"}


def plot_isolation(runs: Mapping[tuple[str, str], Run]) -> LabFigure:
    """Left: server step_ms per token; middle: client ITL per token; right: the share of /health probes
    that waited longer than each latency; for each (backend, load) run: quiet dotted, loaded solid."""
    fig = LabFigure(figsize=(12, 3.4), layout="constrained")
    steps, gaps, health = fig.subplots(1, 3)
    for (backend, load), run in runs.items():
        style = {"color": COLORS.get(backend), "linestyle": "-" if load != "quiet" else ":", "linewidth": 1.2}
        label = f"{backend}, {load}"
        steps.plot(range(1, run.trace.n_tokens), run.trace.decode_step_ms, label=label, **style)
        gaps.plot(range(1, run.trace.n_tokens), run.trace.itl_ms, label=label, **style)
        waits = sorted(run.probe.latencies_ms)
        if waits:
            health.plot(waits, [1 - i / len(waits) for i in range(len(waits))], label=label, **style)
    steps.set(title="Server step_ms (where the engine runs)", xlabel="token index", ylabel="ms", ylim=(0, None))
    gaps.set(title="Client gap between tokens (ITL)", xlabel="token index", ylabel="ms", ylim=(0, None))
    health.set(title="/health: share of probes slower than x", xlabel="ms (log)", ylabel="share",
               xscale="log", ylim=(0, 1.02))
    for ax in (steps, gaps, health):
        ax.legend(fontsize=7)
    return fig
