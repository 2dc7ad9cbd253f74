"""A sweep over request rates: latency against load, the knee, and a stop once the server is over-saturated.

Below its capacity a server completes requests as fast as they arrive and its latencies stay flat;
past it, a queue grows for as long as the run lasts and the latencies with it. The sweep runs `run_load`
at rising rates and stops after the first rate the server could not keep up with. It calls a run
over-saturated on either of two signs:

- the time in the system grew along the run: the last quarter of the requests took `GROWTH` (2) times
  as long as the first quarter (medians). A stable server gives early and late requests the same time;
  one that falls behind by (1/capacity - 1/rate) per request makes the last ones wait the most. This is
  the sign a batching server shows: its completions come in bunches, but its requests wait ever longer.
- the completion rate (completions per second from the first to the last one) is below the offered rate
  by more than the arrivals' own noise: the sum of N - 1 gamma gaps has a relative standard deviation of
  cv / sqrt(N - 1) (cv = 1 for Poisson), so a stable server falls `SIGMAS = 2` of those below by chance
  about 2.5% of the time; `MIN_SHORTFALL` covers evenly spaced arrivals (cv = 0), whose completions still
  jitter by a step or two. This is the sign of a server that serves one request at a time.

    >>> over_saturated({"completion_rate": 4.0, "request_rate": 10.0, "completed": 50}, burstiness=1.0)
    True
    >>> over_saturated({"completion_rate": 9.0, "request_rate": 10.0, "completed": 50, "latency_growth": 2.5})
    True
    >>> over_saturated({"completion_rate": 9.0, "request_rate": 10.0, "completed": 50, "latency_growth": 1.1})
    False

The knee is the highest rate that did not over-saturate the server. Left out: searching between two rates
(the caller can sweep again between the knee and the next rate), and rates that change within a run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .arrivals import gap_cv
from .datasets import RequestSpec
from .load import LoadResult, run_load

SIGMAS = 2.0
MIN_SHORTFALL = 0.1
GROWTH = 2.0


def over_saturated(summary: dict, burstiness: float = 1.0) -> bool:
    """Whether the completions fell behind the arrivals by more than chance explains (see the module doc)."""
    rate, achieved, n = summary["request_rate"], summary["completion_rate"], summary["completed"]
    if rate == "inf" or n < 3:
        return False
    if (summary.get("latency_growth") or 0.0) >= GROWTH:
        return True
    if achieved is None:
        return False
    shortfall = max(MIN_SHORTFALL, SIGMAS * gap_cv(burstiness) / math.sqrt(n - 1))
    return achieved < rate * (1 - shortfall)


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
        keys = ("request_throughput", "completion_rate", "latency_growth", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
                "median_itl_ms", "p99_itl_ms", "request_goodput", "failed")
        return [{"rate": rate, **{k: s.get(k) for k in keys}, "over_saturated": sat}
                for rate, s, sat in zip(self.rates, self.summaries, self.saturated)]


def rates_around(one_request_ms: float, factors: Sequence[float] = (0.5, 1, 2, 4, 8, 16)) -> list[float]:
    """Rates sized from one request's measured latency: 1 / E2E is what a server that serves one request
    at a time sustains; a batching server goes some factor beyond it.

    >>> rates_around(500.0, (0.5, 1, 2))
    [1.0, 2.0, 4.0]
    """
    return [round(f * 1000.0 / one_request_ms, 6) for f in factors]


def sweep(url: str, requests: Sequence[RequestSpec] | Callable[[float], Sequence[RequestSpec]],
          rates: Sequence[float], *, stop_when_saturated: bool = True, burstiness: float = 1.0,
          on_result: Callable[[float, LoadResult], None] | None = None, **load_kwargs) -> SweepResult:
    """`run_load` at each rate in rising order; stop after the first over-saturated one. `requests` is a
    list sent at every rate or a function of the rate (to size the run to the rate). Only the first run
    warms up."""
    out = SweepResult()
    warmup = load_kwargs.pop("warmup", 1)
    for i, rate in enumerate(sorted(rates)):
        batch = requests(rate) if callable(requests) else requests
        result = run_load(url, batch, rate=rate, burstiness=burstiness, warmup=warmup if i == 0 else 0,
                          **load_kwargs)
        out.rates.append(rate)
        out.results.append(result)
        out.saturated.append(over_saturated(result.summary, burstiness))
        if on_result is not None:
            on_result(rate, result)
        if stop_when_saturated and out.saturated[-1]:
            break
    return out
