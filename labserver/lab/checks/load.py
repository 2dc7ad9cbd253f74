"""Checkers for notebook 06 load; see ``checks/__init__.py`` for how checkers report.

``check_poisson_arrivals`` judges a generator by statistics whose tolerance follows from the Poisson
variance (4 standard deviations: a correct generator fails with a probability under 1e-4).
``check_queue_prediction`` runs the fake engine (sleeps of a known length), so its verdict does not
depend on how busy the machine is: the sleeps are a floor, and the overhead on top is measured.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np

from ...engine.fake import fake_engine
from ...measure import arrivals
from ...measure.datasets import random_requests
from ...measure.load import run_load
from ...serve.app import create_app
from ...serve.background import UvicornServer
from ..checking import attempt, checker, near, say

N_ARRIVALS = 4000


@checker
def check_poisson_arrivals(poisson_arrivals: Callable) -> bool:
    """``poisson_arrivals(n, rate, seed)``: n send times in seconds, the first at 0, exponential gaps of
    mean 1 / rate. Checked: shape, the mean gap, and the spread (std / mean = 1 for exponential gaps;
    evenly spaced arrivals have 0)."""
    name = "poisson_arrivals"
    with _tripwire(poisson_arrivals) as calls:
        ok = _check_arrivals(name, poisson_arrivals)
    return ok & say(not calls, name, "written without labserver's arrival_times/gaps" if not calls else
                    f"it called labserver's {', '.join(sorted(set(calls)))}: the exercise is to write it yourself")


@contextlib.contextmanager
def _tripwire(fn: Callable):
    """Record calls to ``measure.arrivals``' generators, by the module or by a name in ``fn``'s globals."""
    calls: list[str] = []
    originals = {name: getattr(arrivals, name) for name in ("arrival_times", "gaps")}

    def wrap(name, real):
        def spy(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return spy

    scope = getattr(fn, "__globals__", {})
    swapped = {k: v for k, v in scope.items() if any(v is real for real in originals.values())}
    try:
        for name, real in originals.items():
            setattr(arrivals, name, wrap(name, real))
        for k, v in swapped.items():
            scope[k] = wrap(k, v)
        yield calls
    finally:
        for name, real in originals.items():
            setattr(arrivals, name, real)
        scope.update(swapped)


def _check_arrivals(name: str, poisson_arrivals: Callable) -> bool:
    ok = True
    for rate in (0.5, 25.0):
        times = np.asarray(attempt(name, poisson_arrivals, N_ARRIVALS, rate, 1), dtype=float)
        shape = len(times) == N_ARRIVALS and times[0] == 0.0 and bool(np.all(np.diff(times) >= 0))
        ok &= say(shape, name, f"rate {rate}: {len(times)} times, first {times[0] if len(times) else None}, "
                               "never decreasing (expected all three)")
        if not shape:
            continue
        g = np.diff(times)
        # The mean of n exponential gaps has std (1/rate)/sqrt(n); their sample std has relative std
        # about sqrt(2 + 6) / (2 sqrt(n)) (excess kurtosis 6), so the CV's tolerance is 4 of those.
        tol_mean = 4 * (1 / rate) / math.sqrt(len(g))
        ok &= say(abs(g.mean() - 1 / rate) < tol_mean, name,
                  f"rate {rate}: mean gap {g.mean():.4f} s (expected {1 / rate:.4f} +- {tol_mean:.4f})")
        cv, tol_cv = g.std() / g.mean(), 4 * math.sqrt(8) / (2 * math.sqrt(len(g)))
        ok &= say(abs(cv - 1) < tol_cv, name,
                  f"rate {rate}: std/mean of the gaps {cv:.3f} (expected 1 +- {tol_cv:.3f})")
    again = attempt(name, poisson_arrivals, 5, 2.0, 7)
    ok &= say(list(again) == list(attempt(name, poisson_arrivals, 5, 2.0, 7)), name, "the same seed, the same times")
    return ok


PREFILL_MS, STEP_MS = 40, 20  # unequal: a prediction that counts the prefill as a step is off by k * 20 ms
TOKENS, INTERVAL_MS, N = 5, 60, 10


@checker
def check_queue_prediction(predict_queue_ms: Callable) -> bool:
    """``predict_queue_ms(k, prefill_ms, step_ms, tokens, interval_ms)``: how long request k (from 0) waits
    on the client when one request runs at a time, requests arrive every interval_ms and each takes
    prefill_ms + (tokens - 1) * step_ms. Checked by hand and against a fake engine measured now."""
    name = "predict_queue_ms"
    ok = say(near(attempt(name, predict_queue_ms, 3, 20, 10, 5, 40), 60.0), name,
             f"k=3, service 20 + 4*10 = 60 ms, every 40 ms -> {attempt(name, predict_queue_ms, 3, 20, 10, 5, 40)} "
             "(expected 60)")
    ok &= say(near(attempt(name, predict_queue_ms, 5, 20, 10, 5, 100), 0.0), name,
              "arrivals slower than the service: nobody waits (expected 0)")
    with UvicornServer(create_app(fake_engine(prefill_ms=PREFILL_MS, step_ms=STEP_MS), "thread")) as server:
        result = run_load(server.url, random_requests(N, 4, TOKENS), rate=1000 / INTERVAL_MS,
                          burstiness=math.inf, max_concurrency=1)
    # Once the queue has formed, a request is sent when the one before it has been read to its end: the
    # time between two sends is one service as the client sees it, the sleeps plus an overhead per request
    # (HTTP, [DONE], the machine's load), measured here from the sends. Given that service, request k's
    # wait is exact but for the first request's own wait and the arrivals' timer and clock reads (15 ms).
    sent = [r["arrival_ms"] + r["queue_ms"] for r in result.records]
    service, first = PREFILL_MS + (TOKENS - 1) * STEP_MS, result.records[0]["queue_ms"]
    for k in (N // 2, N - 1):
        overhead = max(0.0, (sent[k] - sent[0]) / k - service)  # the prefill's share of each service
        predicted = attempt(name, predict_queue_ms, k, PREFILL_MS + overhead, STEP_MS, TOKENS, INTERVAL_MS)
        if predicted is None:  # a stub or an error, said above
            return False
        measured = result.records[k]["queue_ms"]
        ok &= say(abs(measured - first - predicted) <= 15, name,
                  f"fake engine, request {k}: predicted {predicted:.0f} ms, measured {measured - first:.0f} ms "
                  f"(each request's prefill taken as {PREFILL_MS} + {overhead:.1f} ms of overhead)")
    return ok
