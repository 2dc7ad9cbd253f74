"""Checkers for the notebooks' exercises: call one with your function, read PASS or FAIL with the numbers.

Each ``check_*`` prints one line per thing it compared and returns ``True`` only if all passed, as ``cmp``
does in nn-zero-to-hero (makemore part 4); ``checking.py`` holds that machinery (PASS, FAIL, TODO).

Where a check needs a timing it can trust on a busy machine, it uses ``fake_engine`` (sleeps of a known
length) instead of the model and says so. Reference solutions: ``notebooks/solutions/``.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Sequence

from ..measure.client import stream_generate
from ..measure.trace import Trace
from ..config import SamplingParams
from ..engine.engine import Finish, TokenEvent
from ..engine.fake import fake_engine
from .cancellation import wait_idle
from .checking import attempt, checker, near, say
from .concurrency import Load
from .event_loop import try_stream, two_streams_with_heartbeat
from .runs import ThreadRecorder
from .streaming import raw_sse


# -- 01 blocking baseline --------------------------------------------------------------------------------
@checker
def check_blocking_prediction(predict_blocking_ttft_ms: Callable, trace: Trace) -> bool:
    """``predict_blocking_ttft_ms(prefill_ms, step_ms, n_tokens)``: when does a blocking client see token one?"""
    name = "predict_blocking_ttft_ms"
    hand = attempt(name, predict_blocking_ttft_ms, 60.0, 30.0, 5)
    ok = say(near(hand, 180.0), name, f"prefill 60 ms, steps of 30 ms, 5 tokens -> {hand} (expected 180)")
    steps = trace.decode_step_ms
    step = sum(steps) / len(steps)
    pred = attempt(name, predict_blocking_ttft_ms, trace.prefill_time_ms, step, trace.n_tokens)
    ref = trace.prefill_time_ms + (trace.n_tokens - 1) * step
    ok &= say(near(pred, ref), name, f"from your trace -> {pred:.0f} ms (expected {ref:.0f}); the client "
                                        f"measured TTFT {trace.ttft_ms:.0f} ms, {trace.ttft_ms - ref:+.0f} ms "
                                        "more for HTTP and JSON")
    return ok


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


# -- 02 streaming SSE ------------------------------------------------------------------------------------
SSE_CASES = [
    ('data: {"token": " Paris", "index": 0}', {"token": " Paris", "index": 0}),
    ('data:{"token":"x"}', {"token": "x"}),        # the space after "data:" is optional
    ("", None),                                    # the blank line that ends an event
    ("data: [DONE]", None),                        # the end marker is not JSON
    (": keep-alive", None),                        # a comment line
]


@checker
def check_parse_sse_line(parse_sse_line: Callable, url: str | None = None) -> bool:
    """``parse_sse_line(line)``: the JSON payload of a ``data:`` line as a dict, else ``None``."""
    name = "parse_sse_line"
    ok = True
    for line, expected in SSE_CASES:
        got = attempt(name, parse_sse_line, line)
        ok &= say(got == expected, name, f"{line!r} -> {got!r} (expected {expected!r})")
    if url is not None:
        lines = [line for _, line in raw_sse(url, max_tokens=8, show=False)]
        events = [attempt(name, parse_sse_line, line) for line in lines]
        text = "".join(e["token"] for e in events if e and "token" in e)
        expected = "".join(json.loads(line[5:])["token"] for line in lines if line.startswith("data: {\"token"))
        ok &= say(text == expected and text != "", name, f"a live stream of {len(lines)} lines -> {text!r}")
    return ok


@checker
def check_itl_tpot(itl_and_tpot: Callable, trace: Trace) -> bool:
    """``itl_and_tpot(arrival_ms)``: (list of gaps, TPOT) as vllm bench serve defines them."""
    name = "itl_and_tpot"
    itl, tpot = attempt(name, itl_and_tpot, [100.0, 130.0, 170.0])
    ok = say(list(itl) == [30.0, 40.0] and near(tpot, 35.0), name,
              f"[100, 130, 170] -> ({list(itl)}, {tpot}) (expected ([30.0, 40.0], 35.0))")
    itl, tpot = attempt(name, itl_and_tpot, list(trace.arrival_ms))
    same = len(itl) == len(trace.itl_ms) and all(near(a, b) for a, b in zip(itl, trace.itl_ms))
    return ok & say(same and near(tpot, trace.tpot_ms), name,
                     f"your trace -> TPOT {tpot:.1f} ms (Trace says {trace.tpot_ms:.1f} ms), {len(itl)} gaps")


@checker
def check_my_stream(my_stream: Callable, url: str, prompt: str = "What is the capital of France?") -> bool:
    """``my_stream(url, prompt, max_tokens)``: [(ms after sending, token text), ...] with plain httpx, greedy."""
    name = "my_stream"
    got = attempt(name, my_stream, url, prompt, 16)
    ref = stream_generate(url, prompt, 16, 0.0)
    text = "".join(token for _, token in got)
    ok = say(text == ref.text, name, f"{len(got)} tokens, text {text!r} (expected {ref.text!r})")
    times = [t for t, _ in got]
    ok &= say(times == sorted(times) and len(times) > 1, name, "arrival times increase")
    if ok:
        # A decode step takes well over 5 ms on any CPU; a buffered answer arrives all in one instant.
        spread = times[-1] - times[0]
        ok &= say(spread >= 5 * (len(times) - 1), name, f"first token at {times[0]:.0f} ms, last at "
                                                        f"{times[-1]:.0f} ms: they arrived one by one")
    return ok


# -- 03 event loop ---------------------------------------------------------------------------------------
@checker
def check_stream_tokens(stream_tokens: Callable) -> bool:
    """``async def stream_tokens(gen)``: yield every item of ``gen``, each ``next`` in a thread, and finish."""
    name = "stream_tokens"
    ok = True
    cases = [("a list iterator", lambda: iter(range(5)), list(range(5))),
             ("an engine stream (fake_engine)", lambda: fake_engine(5, 5).generate_stream("a b", SamplingParams(3)),
              None)]
    for label, make_gen, expected in cases:
        result = try_stream(stream_tokens, make_gen, timeout_s=3.0)
        if result.error and "NotImplementedError" in result.error:
            print(f"TODO  {name}: not written yet (it raises NotImplementedError)")
            return False
        good = result.outcome == "completed" and (result.items == expected if expected is not None else
                                                  isinstance(result.items[-1], Finish))
        ok &= say(good, name, f"{label}: {result}")
    return ok


@checker
def check_one_thread(stream_on_one_thread: Callable) -> bool:
    """``async def stream_on_one_thread(gen)``: every step of every stream on one thread, the loop free.

    Uses ``fake_engine`` (80 ms sleeps per step) so the verdict does not depend on how busy the machine is:
    a step run on the loop shows as a heartbeat gap of >= 80 ms.
    """
    name = "stream_on_one_thread"
    engine = ThreadRecorder(fake_engine(prefill_ms=80, step_ms=80))
    out = two_streams_with_heartbeat(stream_on_one_thread, engine, max_tokens=6, timeout_s=10.0)
    if isinstance(out["error"], NotImplementedError):
        print(f"TODO  {name}: not written yet (it raises NotImplementedError)")
        return False
    counts = [len([i for i in items if isinstance(i, TokenEvent)]) for items in out["items"]]
    ok = say(out["outcome"] == "completed" and counts == [6, 6], name,
              f"two streams at once: {out['outcome']}, tokens {counts} (expected [6, 6])"
              + (f", error {out['error']!r}" if out["error"] else ""))
    threads = sorted({t for gen in engine.generations for t in gen})
    ok &= say(len(threads) == 1 and threads[0] != out["loop_thread"], name,
               f"steps ran on {threads} (one thread, not the event loop's {out['loop_thread']!r})")
    return ok & say(out["max_gap_ms"] < 60, name, f"longest heartbeat gap {out['max_gap_ms']:.0f} ms "
                                                  "(< 60: the loop never waited for an 80 ms step)")


# -- 04 cancellation -------------------------------------------------------------------------------------
def _generated_by(engine, fn: Callable, name: str, *args) -> tuple:
    """Run ``fn``; return (its result, tokens the engine generated, whether it went idle within 5 s)."""
    wait_idle(engine)
    before = engine.tokens_generated
    result = attempt(name, fn, *args)
    wait_idle(engine, timeout_s=5.0)
    idle = engine.running == 0
    time.sleep(0.3)  # a generation that kept going would add tokens now
    return result, engine.tokens_generated - before, idle


@checker
def check_hang_up(hang_up_after: Callable, engine, url: str) -> bool:
    """``hang_up_after(url, n)``: read n token events of a long stream, close it, return how many were read."""
    name = "hang_up_after"
    got, generated, idle = _generated_by(engine, hang_up_after, name, url, 4)
    ok = say(got == 4, name, f"read {got} token events (expected 4)")
    return ok & say(idle and generated <= 4 + 2, name,
                     f"the engine generated {generated} tokens and {'stopped' if idle else 'is STILL RUNNING'} "
                     "(at most 2 more than were read)")


@checker
def check_stop_string(stream_until: Callable, engine, url: str, prompt: str = "What is the capital of France?",
                      stop: str = ".") -> bool:
    """``stream_until(url, prompt, stop)``: greedy stream, hang up at the first ``stop``; the text up to it."""
    name = "stream_until"
    full = stream_generate(url, prompt, 64, 0.0)
    cut = full.text.find(stop)
    if cut < 0:
        print(f"SKIP  {name}: the model's answer has no {stop!r} in 64 tokens: {full.text!r}")
        return True
    expected = full.text[:cut + len(stop)]
    needed = next(i + 1 for i in range(full.n_tokens) if stop in "".join(full.tokens[:i + 1]))
    got, generated, idle = _generated_by(engine, stream_until, name, url, prompt, stop)
    ok = say(got == expected, name, f"{got!r} (expected {expected!r})")
    return ok & say(idle and generated <= needed + 2, name,
                     f"the engine generated {generated} tokens for {needed} needed, of up to 64 "
                     f"({'stopped' if idle else 'STILL RUNNING'})")


# -- 05 concurrency --------------------------------------------------------------------------------------
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
