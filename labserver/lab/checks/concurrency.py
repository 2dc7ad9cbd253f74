"""Checkers for notebook 05 concurrency; see ``checks/__init__.py`` for how checkers report."""
from __future__ import annotations

from typing import Callable, Sequence

from ...measure.trace import Trace
from ..checking import attempt, checker, near, say
from ..concurrency import Load


@checker
def check_aggregate_tokens_per_s(aggregate_tokens_per_s: Callable, loads: Sequence[Load]) -> bool:
    """``aggregate_tokens_per_s(traces)``: all tokens / (last token of any stream - first request sent);
    compared with ``measure.stats.aggregate_tokens_per_s``, which ``Load.tokens_per_s`` returns."""
    name = "aggregate_tokens_per_s"
    a = Trace(sent_s=10.0, arrival_ms=[100.0, 200.0, 300.0])
    b = Trace(sent_s=10.1, arrival_ms=[300.0, 400.0])  # sent 100 ms later: its last token at 500 ms
    hand = attempt(name, aggregate_tokens_per_s, [a, b])
    ok = say(near(hand, 10.0), name, f"3 + 2 tokens in 500 ms -> {hand} (expected 10.0)")
    for load in loads:
        got = attempt(name, aggregate_tokens_per_s, load.traces)
        ok &= say(near(got, load.tokens_per_s, rel=0.02), name,
                   f"N={load.n}: {got:.1f} tokens/s (expected {load.tokens_per_s:.1f})")
    return ok


@checker
def check_itl_prediction(predict_itl_ms: Callable, loads: Sequence[Load]) -> bool:
    """``predict_itl_ms(step_ms, n)``: a stream's gap when n streams share one engine thread, one step each."""
    name = "predict_itl_ms"
    hand = attempt(name, predict_itl_ms, 30.0, 4)
    ok = say(near(hand, 120.0), name, f"steps of 30 ms, 4 streams -> {hand} (expected 120)")
    for load in loads:
        row = load.row()
        pred = attempt(name, predict_itl_ms, row["step p50 ms"], load.n)
        ok &= say(near(pred, row["step p50 ms"] * load.n), name,
                   f"N={load.n}: predicted {pred:.0f} ms, measured ITL p50 {row['ITL p50 ms']:.0f} ms")
    return ok


@checker
def check_batched_tokens_per_s(batched_tokens_per_s: Callable, batched_ms: dict) -> bool:
    """``batched_tokens_per_s(batch, step_ms)``: tokens/s of an engine that advances ``batch`` sequences a step."""
    name = "batched_tokens_per_s"
    hand = attempt(name, batched_tokens_per_s, 4, 40.0)
    ok = say(near(hand, 100.0), name, f"4 sequences per 40 ms step -> {hand} (expected 100)")
    for batch, step in sorted(batched_ms.items()):
        got = attempt(name, batched_tokens_per_s, batch, step)
        ok &= say(near(got, 1000 * batch / step), name, f"B={batch}: step {step:.0f} ms -> {got:.0f} tokens/s")
    return ok
