"""Checkers for notebook 03 event loop; see ``checks/__init__.py`` for how checkers report."""
from __future__ import annotations

from typing import Callable

from ...config import SamplingParams
from ...engine.engine import Finish, TokenEvent
from ...engine.fake import fake_engine
from ..checking import checker, say
from ..event_loop import try_stream, two_streams_with_heartbeat
from ..runs import ThreadRecorder


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
