"""Notebook 6's experiments: open-loop load on this server, its knee, goodput under an SLO, backpressure.

Every size comes from a measurement made in the same run: one request alone gives the service time,
a closed loop at the batch limit gives the capacity, the sweep's rates are fractions of that capacity,
the SLO is a multiple of its TTFT and E2E. So the notebook asks the same questions on a 5 ms/step and
an 80 ms/step machine.

Left out: the load generator itself (``measure/load.py``, ``measure/sweep.py``), which measures any server.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..measure.datasets import random_requests
from ..measure.load import LoadResult, run_load
from ..measure.plotting import LabFigure, plot_sweep
from ..measure.sweep import SweepResult, sweep
from ..measure.tables import format_table
from ..serve.background import start_fastapi, stop
from ..serve.limits import ServerLimits
from .target import Target, as_target

INPUT_TOKENS, OUTPUT_TOKENS = 32, 16
SECONDS_PER_RATE = 5.0  # of arrivals at each rate: a backlog past the knee grows that long


@dataclass
class Alone:
    """One request with the server to itself: the service time every rate is sized from."""
    ttft_ms: float
    tpot_ms: float
    e2el_ms: float

    @property
    def rate(self) -> float:
        """Requests/s a server that serves one request at a time sustains: 1 / E2E."""
        return 1000.0 / self.e2el_ms


def requests(n: int, tokenizer=None, seed: int = 0):
    return random_requests(n, INPUT_TOKENS, OUTPUT_TOKENS, tokenizer=tokenizer, seed=seed)


def measure_alone(server: Target | str, tokenizer=None, n: int = 3) -> Alone:
    """`n` requests one after another (after a warm-up): medians of TTFT, TPOT, E2E. ``server``: a
    ``Target`` (ours or a shared one) or our server's URL."""
    s = as_target(server).load(requests(n, tokenizer, seed=99), rate=math.inf, max_concurrency=1).summary
    return Alone(s["median_ttft_ms"], s["median_tpot_ms"], s["median_e2el_ms"])


def slo_from(alone: Alone, factor: float = 4.0) -> dict:
    """An SLO a user would accept: TTFT and E2E at most `factor` times what one request alone gets."""
    return {"ttft": round(factor * alone.ttft_ms, 1), "e2el": round(factor * alone.e2el_ms, 1)}


def knee(server: Target | str, alone: Alone, slo: dict, tokenizer=None, concurrency: int = 16,
         seconds: float = SECONDS_PER_RATE) -> SweepResult:
    """The capacity (a closed loop of `concurrency`, the batch limit), then Poisson arrivals at fractions
    of it, rising, until the server falls behind (`measure.sweep`)."""
    server = as_target(server)
    return sweep(server.url, lambda n: requests(n, tokenizer), concurrency=concurrency, seconds=seconds,
                 min_requests=12, one_request_ms=alone.e2el_ms, slo=slo, warmup=1, protocol=server.protocol)


def sweep_table(result: SweepResult) -> str:
    rows = [[f"{r['rate']:.2f}", r["completed"], r["last_arrival_s"], r["duration"], r["request_throughput"],
             r["kept_up"], r["median_ttft_ms"], r["p99_ttft_ms"], r["median_itl_ms"], r["request_goodput"],
             "yes" if r["over_saturated"] else ""] for r in result.table()]
    return format_table(["rate req/s", "requests", "last arrival s", "run s", "done req/s", "kept up",
                         "TTFT p50", "TTFT p99", "ITL p50", "goodput req/s", "over-saturated"], rows)


def below_and_past(result: SweepResult) -> tuple[list[dict], dict]:
    """The summaries of the rates at or below the knee, and the first over-saturated rate's."""
    below = [s for rate, s in zip(result.rates, result.summaries) if result.knee is not None and rate <= result.knee]
    return below, result.summaries[-1]


def plot_knee(result: SweepResult) -> LabFigure:
    return plot_sweep(result.rates, result.summaries, result.knee)


def backpressure(engine, rate: float, limit: int, tokenizer=None, n: int = 24,
                 unbounded: int = 256) -> dict[str, LoadResult]:
    """The same burst at `rate` (past the knee) against two servers: one that refuses the request over
    `limit` at once (429 + Retry-After), one that admits up to `unbounded` and queues them."""
    out = {}
    for label, cap in ((f"limit {limit} (429)", limit), ("unbounded queue", unbounded)):
        server = start_fastapi(engine, backend="batched", name="fastapi-load-limit",
                               limits=ServerLimits(max_concurrent=cap))
        try:
            out[label] = run_load(server.url, requests(n, tokenizer, seed=5), rate=rate, warmup=1)
        finally:
            stop("fastapi-load-limit")
    return out


def backpressure_table(results: dict[str, LoadResult]) -> str:
    rows = []
    for label, r in results.items():
        s = r.summary
        retry = {e["error"].get("retry_after") for e in r.records if e["error"]} - {None}
        rows.append([label, s["completed"], s["failed_429"], ",".join(sorted(retry)) or "-", s["median_ttft_ms"],
                     s["p99_ttft_ms"], s["p99_e2el_ms"]])
    return format_table(["server", "completed", "429s", "Retry-After s", "TTFT p50 ms", "TTFT p99 ms",
                         "E2E p99 ms"], rows)


def plot_timelines(results: dict[str, LoadResult]) -> LabFigure:
    """One row per request: waiting (arrival to first token, grey) then streaming (first to last token);
    a refused request is a red tick at its arrival."""
    fig = LabFigure(figsize=(11, 3.6))
    axes = fig.subplots(1, len(results), sharex=True, squeeze=False)[0]
    for ax, (label, result) in zip(axes, results.items()):
        for r in result.records:
            start = (r["arrival_ms"]) / 1000
            if r["error"]:
                ax.plot([start], [r["index"]], "|", color="tab:red", markersize=8)
                continue
            first = start + (r["queue_ms"] + r["ttft_ms"]) / 1000
            ax.plot([start, first], [r["index"]] * 2, color="tab:gray", linewidth=3)
            ax.plot([first, start + (r["queue_ms"] + r["e2el_ms"]) / 1000], [r["index"]] * 2, color="tab:blue",
                    linewidth=3)
        ax.set(title=label, xlabel="s since the first arrival", ylabel="request")
        ax.invert_yaxis()
    fig.tight_layout()
    return fig
