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

    "At once": the first and the last request left within one generation of each other (sent one after
    another, the third would leave two generations after the first). One request at a time means each answer reaches
    the client at least its own generation time (the server's ``timings["total_ms"]``) after the one
    before it; the arrivals are compared on one clock (``sent_s`` + TTFT), so a request that left a few
    ms late does not blur it. That holds however busy the machine is; answers computed side by side would
    arrive together instead.
    """
    name = "queued"
    traces = list(attempt(name, queued, url, 3, 12))
    ttfts = [t.ttft_ms for t in traces]
    if not say(len(traces) == 3 and all(t.ok and t.n_tokens == 12 for t in traces) and ttfts == sorted(ttfts),
                name, f"3 requests of 12 tokens, TTFTs {[round(t) for t in ttfts]} ms (ascending)"):
        return False
    owns = [t.timings.get("total_ms", 0.0) for t in traces]
    spread = 1000 * (max(t.sent_s for t in traces) - min(t.sent_s for t in traces))
    ok = say(spread < min(owns), name, f"the 3 requests left within {spread:.0f} ms of each other (at once: "
                                       f"within one generation, {min(owns):.0f} ms)")
    arrived = [1000 * t.sent_s + t.ttft_ms for t in traces]  # one clock for all three
    for k in (1, 2):
        waited = arrived[k] - arrived[k - 1]
        ok &= say(waited >= 0.8 * owns[k], name, f"answer {k + 1} came {waited:.0f} ms after answer {k}, and its "
                                                 f"own generation took {owns[k]:.0f} ms: it waited for the one before")
    return ok
