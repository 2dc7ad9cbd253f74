"""Checkers for notebook 01 blocking baseline; see ``checks/__init__.py`` for how checkers report."""
from __future__ import annotations

from typing import Callable

from ...measure.trace import Trace
from ..checking import attempt, checker, near, say


@checker
def check_blocking_prediction(predict_blocking_ttft_ms: Callable, trace: Trace) -> bool:
    """``predict_blocking_ttft_ms(prefill_ms, step_ms, n_tokens)``: when does a blocking client see token one?

    By hand first (a formula off by one step fails there), then against what the client measured: the
    prediction from the server's own numbers must not exceed the measured TTFT (the server cannot send
    before it has computed) and must account for most of it (the rest is HTTP, JSON and tokenizing).
    """
    name = "predict_blocking_ttft_ms"
    hand = attempt(name, predict_blocking_ttft_ms, 60.0, 30.0, 5)
    ok = say(near(hand, 180.0), name, f"prefill 60 ms, steps of 30 ms, 5 tokens -> {hand} (expected 180)")
    steps = trace.decode_step_ms
    step = sum(steps) / len(steps)
    pred = float(attempt(name, predict_blocking_ttft_ms, trace.prefill_time_ms, step, trace.n_tokens))
    # The client's clock spans the server's: TTFT >= the sum of step_ms, which the right formula gives
    # (1 % for float rounding of the mean). "Most of it": over half, since every step is in both.
    fits = pred <= 1.01 * trace.ttft_ms and pred >= 0.5 * trace.ttft_ms
    return ok & say(fits, name, f"from your trace -> {pred:.0f} ms; the client measured TTFT {trace.ttft_ms:.0f} "
                                f"ms (expected between half of it and all of it)")


@checker
def check_queued(queued: Callable, url: str) -> bool:
    """``queued(url, n, max_tokens)``: the Traces of n blocking requests sent at once, first served first.

    One request at a time means each answer arrives at least its own generation time (the server's
    ``timings["total_ms"]``) after the one before it. That holds however busy the machine is; answers
    computed side by side would arrive together instead.
    """
    name = "queued"
    traces = list(attempt(name, queued, url, 3, 12))
    ttfts = [t.ttft_ms for t in traces]
    if not say(len(traces) == 3 and all(t.ok and t.n_tokens == 12 for t in traces) and ttfts == sorted(ttfts),
                name, f"3 requests of 12 tokens, TTFTs {[round(t) for t in ttfts]} ms (ascending)"):
        return False
    ok = True
    for k in (1, 2):
        waited, own = ttfts[k] - ttfts[k - 1], traces[k].timings.get("total_ms", 0.0)
        ok &= say(waited >= 0.8 * own, name, f"answer {k + 1} came {waited:.0f} ms after answer {k}, and its own "
                                              f"generation took {own:.0f} ms: it waited for the one before")
    return ok
