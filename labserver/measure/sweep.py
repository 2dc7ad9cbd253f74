"""A sweep over request rates: latency against load, the knee, and a stop once the server is over-saturated.

Below its capacity a server completes requests about as fast as they arrive; past it, a backlog grows
for as long as the run lasts (in the client's queue, the server's, or a batch whose steps slow down as
it fills). The sweep runs `run_load` at rising rates and stops after the first rate the server could not
keep up with. It calls a run over-saturated when it lasted more than `SLOWDOWN` (2) times what it would
have if no request had waited: the last arrival plus one request's E2E at the lowest rate (the baseline).
A server that keeps up finishes about one request time after the last arrival, that time growing only
modestly with the load; a backlog adds its whole drain on top, more the longer the run.

    >>> run = {"request_rate": 10.0, "duration": 5.0, "last_arrival_s": 1.5}
    >>> over_saturated(run, baseline_e2el_ms=1000.0), over_saturated({**run, "duration": 5.1}, 1000.0)
    (False, True)

The knee is the highest rate that did not over-saturate the server. Left out: searching between two rates
(the caller can sweep again between the knee and the next rate), and rates that change within a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .datasets import RequestSpec
from .load import LoadResult, run_load

SLOWDOWN = 2.0


def over_saturated(summary: dict, baseline_e2el_ms: float | None) -> bool:
    """Whether the run lasted over SLOWDOWN times (last arrival + baseline E2E): see the module doc."""
    if summary["request_rate"] == "inf" or baseline_e2el_ms is None:
        return False
    return summary["duration"] > SLOWDOWN * (summary["last_arrival_s"] + baseline_e2el_ms / 1000)


@dataclass
class SweepResult:
    rates: list[float] = field(default_factory=list)
    results: list[LoadResult] = field(default_factory=list)
    saturated: list[bool] = field(default_factory=list)

    @property
    def summaries(self) -> list[dict]:
        return [r.summary for r in self.results]

    @property
    def knee(self) -> float | None:
        """The highest rate that did not over-saturate the server (None if the first one did)."""
        ok = [rate for rate, sat in zip(self.rates, self.saturated) if not sat]
        return max(ok) if ok else None

    @property
    def best_goodput_rate(self) -> float | None:
        """The rate with the most requests per second within the SLO (None without an SLO)."""
        scored = [(s["request_goodput"], rate) for rate, s in zip(self.rates, self.summaries)
                  if s.get("request_goodput") is not None]
        return max(scored)[1] if scored else None

    def table(self) -> list[dict]:
        keys = ("request_throughput", "duration", "last_arrival_s", "output_throughput", "median_ttft_ms",
                "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "request_goodput", "failed")
        return [{"rate": rate, **{k: s.get(k) for k in keys}, "over_saturated": sat}
                for rate, s, sat in zip(self.rates, self.summaries, self.saturated)]


def rates_around(one_request_ms: float, factors: Sequence[float] = (0.5, 1, 2, 4, 8, 16)) -> list[float]:
    """Rates sized from one request's measured latency: 1 / E2E is what a server that serves one request
    at a time sustains; a batching server goes some factor beyond it.

    >>> rates_around(500.0, (0.5, 1, 2))
    [1.0, 2.0, 4.0]
    """
    return [round(f * 1000.0 / one_request_ms, 3) for f in factors]


def sweep(url: str, requests: Sequence[RequestSpec] | Callable[[float], Sequence[RequestSpec]],
          rates: Sequence[float], *, stop_when_saturated: bool = True, burstiness: float = 1.0,
          baseline_e2el_ms: float | None = None, on_result: Callable[[float, LoadResult], None] | None = None,
          **load_kwargs) -> SweepResult:
    """`run_load` at each rate in rising order; stop after the first over-saturated one. `requests` is a
    list sent at every rate or a function of the rate (to size the run to the rate). Only the first run
    warms up. The baseline E2E is the lowest rate's median unless given (one request alone, measured)."""
    out = SweepResult()
    warmup = load_kwargs.pop("warmup", 1)
    for i, rate in enumerate(sorted(rates)):
        batch = requests(rate) if callable(requests) else requests
        result = run_load(url, batch, rate=rate, burstiness=burstiness, warmup=warmup if i == 0 else 0,
                          **load_kwargs)
        out.rates.append(rate)
        out.results.append(result)
        if baseline_e2el_ms is None:
            baseline_e2el_ms = result.summary["median_e2el_ms"]
        out.saturated.append(over_saturated(result.summary, baseline_e2el_ms))
        if on_result is not None:
            on_result(rate, result)
        if stop_when_saturated and out.saturated[-1]:
            break
    return out
