"""A sweep over request rates that finds the knee: the highest rate a server keeps up with.

Capacity first. A closed loop at the server's concurrency limit (`capacity`: every request in flight is
replaced as soon as it ends) measures the most requests per second the server completes; an open loop
cannot complete more. The sweep's rates are then fractions of that capacity, from well below it to past
it (`rates_from_capacity`), and each rate runs long enough (`requests_for`: `seconds` of arrivals, at
least `min_requests`) for a backlog to show.

A run keeps up when the server completes requests about as fast as they arrive. It is over-saturated
(`over_saturated`) when either
- it completed fewer than `KEEP_UP` (0.9) times the rate they arrived at: completed requests over the
  run's duration less one request's latency alone (the last arrival's own service), against the requests
  sent over the time they took to arrive, or
- the queue grew: the last quarter of the requests waited (arrival to first token) more than `GROWTH`
  (2) times as long as the first quarter, and longer than one request alone takes in all, while the
  completions lagged (below `LAGGING`, 0.97, of the arrivals).

    >>> run = {"completed": 90, "failed": 0, "duration": 10.5, "last_arrival_s": 10.0, "request_rate": 10.0}
    >>> over_saturated(run, [100.0] * 90, one_request_ms=500.0)  # 90 arrived in 10 s, done in 10 s
    False
    >>> over_saturated({**run, "duration": 13.0}, [100.0] * 90, one_request_ms=500.0)  # done in 12.5 s
    True

A closed loop's capacity can still come out low (a busy client, requests of uneven lengths): a sweep
whose last fraction still kept up goes on at rising rates until one falls behind. The knee is the
highest rate that kept up, below the lowest one that did not. Left out: bisecting between
two rates (sweep again between the knee and the next rate), and rates that change within a run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .datasets import RequestSpec
from .load import LoadResult, run_load

KEEP_UP = 0.9  # completed / offered below this: the server fell behind
GROWTH = 2.0   # the last quarter's wait over the first quarter's above this: the queue grew
LAGGING = 0.97  # ...and completions below this fraction of the arrivals: a backlog, not a passing stall
FRACTIONS = (0.25, 0.5, 0.7, 0.85, 1.0, 1.25, 1.6)  # of the measured capacity
BEYOND, MAX_BEYOND = 1.5, 4  # still keeping up at the last fraction: rates rise by this factor, this often


def waits_ms(result: LoadResult) -> list[float]:
    """Each completed request's wait for its first token since it arrived (client queue + TTFT), in
    arrival order."""
    return [r["queue_ms"] + r["ttft_ms"] for r in result.records if not r["error"] and r["ttft_ms"] is not None]


def kept_up_ratio(summary: dict, one_request_ms: float) -> float:
    """Completed requests per second over the rate at which they arrived (1: the server kept up).

    Both over this run's own arrivals, not the nominal rate (16 Poisson arrivals stray from it by a
    quarter): the requests sent arrived within ``last_arrival_s``, and a server that keeps up completes
    them within that plus the last one's own latency."""
    sent = summary["completed"] + summary["failed"]
    arrived_s = summary["last_arrival_s"]
    window_s = max(summary["duration"] - one_request_ms / 1000, arrived_s, 1e-9)
    return (summary["completed"] / window_s) / (sent / arrived_s) if arrived_s > 0 else 1.0


def queue_grew(waits: Sequence[float], one_request_ms: float) -> bool:
    """Whether the last quarter of the requests waited over GROWTH times the first quarter, and longer
    than one request alone."""
    q = len(waits) // 4
    if q < 2:
        return False
    first, last = float(np.median(waits[:q])), float(np.median(waits[-q:]))
    return last > GROWTH * first and last - first > one_request_ms


def over_saturated(summary: dict, waits: Sequence[float], one_request_ms: float) -> bool:
    """Fell behind (completed < KEEP_UP x offered) or its queue grew: see the module doc."""
    if summary["request_rate"] == "inf":
        return False
    # A queue that grew while every request still completed in time was a passing stall (another process
    # on a shared machine), not a backlog: growth counts only with completions lagging too.
    kept_up = kept_up_ratio(summary, one_request_ms)
    return kept_up < KEEP_UP or (queue_grew(waits, one_request_ms) and kept_up < LAGGING)


@dataclass
class SweepResult:
    capacity: float | None = None          # req/s of the closed loop at the concurrency limit
    one_request_ms: float | None = None    # E2E of one request alone
    rates: list[float] = field(default_factory=list)
    results: list[LoadResult] = field(default_factory=list)
    saturated: list[bool] = field(default_factory=list)

    @property
    def summaries(self) -> list[dict]:
        return [r.summary for r in self.results]

    @property
    def knee(self) -> float | None:
        """The highest rate that kept up, below the lowest over-saturated one (None if the first fell behind)."""
        ok = []
        for rate, sat in zip(self.rates, self.saturated):
            if sat:
                break
            ok.append(rate)
        return max(ok) if ok else None

    @property
    def best_goodput_rate(self) -> float | None:
        """The rate with the most requests per second within the SLO (None without an SLO)."""
        scored = [(s["request_goodput"], rate) for rate, s in zip(self.rates, self.summaries)
                  if s.get("request_goodput") is not None]
        return max(scored)[1] if scored else None

    def table(self) -> list[dict]:
        keys = ("request_throughput", "duration", "last_arrival_s", "output_throughput", "median_ttft_ms",
                "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "request_goodput", "failed", "completed")
        return [{"rate": rate, **{k: s.get(k) for k in keys}, "kept_up": kept_up_ratio(s, self.one_request_ms or 0),
                 "over_saturated": sat} for rate, s, sat in zip(self.rates, self.summaries, self.saturated)]


def steady_rate(records: Sequence[dict], concurrency: int) -> float | None:
    """Completions per second while a closed loop was full: from the `concurrency`-th completion to the
    `concurrency`-th from the end. The ramp (every request starting at once, prefills together) and the
    tail (the last requests finishing with nobody to replace them) are left out: counted, they make the
    capacity look lower than it is. None when the run is too short to have a full middle.

    >>> rows = [{"error": None, "arrival_ms": 0.0, "queue_ms": 100.0 * (i // 2), "e2el_ms": 100.0} for i in range(8)]
    >>> steady_rate(rows, 2)  # two in flight, each 100 ms: 20 requests/s
    20.0
    """
    ends = sorted(r["arrival_ms"] + r["queue_ms"] + r["e2el_ms"] for r in records
                  if not r["error"] and r["e2el_ms"] is not None)
    n = len(ends)
    if n < 2 * concurrency + 1:
        return None
    span_ms = ends[n - concurrency - 1] - ends[concurrency - 1]
    return (n - 2 * concurrency) / span_ms * 1000 if span_ms > 0 else None


def capacity(url: str, requests: Sequence[RequestSpec], concurrency: int, **load_kwargs) -> tuple[float, LoadResult]:
    """Requests/s of a closed loop: `concurrency` requests in flight, each replaced when it ends (its
    `steady_rate`, or the whole run's rate where the run is too short for one)."""
    result = run_load(url, requests, rate=math.inf, max_concurrency=concurrency, **load_kwargs)
    steady = steady_rate(result.records, concurrency)
    return steady or result.summary["completed"] / result.summary["duration"], result


def rates_from_capacity(capacity_rps: float, fractions: Sequence[float] = FRACTIONS) -> list[float]:
    """
    >>> rates_from_capacity(10.0, (0.5, 1, 1.5))
    [5.0, 10.0, 15.0]
    """
    return [round(f * capacity_rps, 3) for f in fractions]


def requests_for(rate: float, seconds: float, min_requests: int = 16) -> int:
    """Enough requests that arrivals last `seconds` at `rate` (a backlog past the knee grows that long)."""
    return max(min_requests, math.ceil(rate * seconds))


def rates_around(one_request_ms: float, factors: Sequence[float] = (0.5, 1, 2, 4, 8, 16)) -> list[float]:
    """Rates sized from one request's measured latency (1 / E2E: a server serving one at a time).

    >>> rates_around(500.0, (0.5, 1, 2))
    [1.0, 2.0, 4.0]
    """
    return [round(f * 1000.0 / one_request_ms, 3) for f in factors]


def sweep(url: str, requests: Callable[[int], Sequence[RequestSpec]], rates: Sequence[float] | None = None, *,
          concurrency: int = 16, seconds: float = 8.0, min_requests: int = 16, one_request_ms: float | None = None,
          stop_when_saturated: bool = True, burstiness: float = 1.0,
          on_result: Callable[[float, LoadResult], None] | None = None, **load_kwargs) -> SweepResult:
    """Measure one request alone and the capacity (closed loop at `concurrency`), then `run_load` at each
    rate (default: `FRACTIONS` of the capacity) in rising order, `requests(n)` giving each run's requests;
    stop after the first over-saturated rate. Rates from the capacity go on rising past the last fraction
    (`BEYOND`, at most `MAX_BEYOND` times) until one is over-saturated. Only the first run warms up."""
    out, warmup = SweepResult(), load_kwargs.pop("warmup", 1)
    if one_request_ms is None:
        alone = run_load(url, requests(3), rate=math.inf, max_concurrency=1, warmup=warmup, **load_kwargs)
        one_request_ms, warmup = alone.summary["median_e2el_ms"], 0
    out.one_request_ms = one_request_ms
    from_capacity = rates is None
    if from_capacity:
        out.capacity, _ = capacity(url, requests(max(min_requests, 4 * concurrency)), concurrency, warmup=warmup,
                                   **load_kwargs)
        rates, warmup = rates_from_capacity(out.capacity), 0
    rates, beyond = sorted(rates), MAX_BEYOND if from_capacity else 0
    while rates:
        rate = rates.pop(0)
        result = run_load(url, requests(requests_for(rate, seconds, min_requests)), rate=rate, burstiness=burstiness,
                          warmup=warmup, **load_kwargs)
        warmup = 0
        out.rates.append(rate)
        out.results.append(result)
        out.saturated.append(over_saturated(result.summary, waits_ms(result), one_request_ms))
        if on_result is not None:
            on_result(rate, result)
        if stop_when_saturated and out.saturated[-1]:
            break
        if not rates and beyond and stop_when_saturated:  # a capacity measured low: go on past it
            rates, beyond = [round(rate * BEYOND, 3)], beyond - 1
    return out
