"""Checkers for notebook 04 cancellation; see ``checks/__init__.py`` for how checkers report."""
from __future__ import annotations

import time
from typing import Callable

from ...measure.client import stream_generate
from ..cancellation import wait_idle
from ..checking import attempt, checker, say


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
