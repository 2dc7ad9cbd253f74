"""Demos that size themselves: the engine's prefill and decode step, measured at the top of a notebook,
decide how long its generations are and how often its probes ask, so that each lesson shows on a
5 ms/step machine and on an 80 ms/step one alike.

    >>> tokens_for(1000, prefill_ms=50, step_ms=5)      # a fast CPU: capped
    64
    >>> tokens_for(1000, prefill_ms=2800, step_ms=81)   # a slow one: the floor, a lesson still needs tokens
    16
    >>> tokens_for(1000, prefill_ms=100, step_ms=30)
    31

Left out: statistics beyond a median (a few steps are enough to choose a size).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import SamplingParams
from .display import PROMPT, median


@dataclass
class Speed:
    """What one short greedy generation on this machine took, measured by the engine itself."""
    prefill_ms: float       # the prompt's forward pass and the first token
    step_ms: float          # median decode step
    prompt_tokens: int

    def __str__(self) -> str:
        return (f"prefill {self.prefill_ms:.1f} ms for {self.prompt_tokens} prompt tokens, "
                f"decode step {self.step_ms:.1f} ms (median)")


def measure_speed(engine, prompt: str = PROMPT, tokens: int = 8) -> Speed:
    """Generate ``tokens`` greedy tokens twice (the first run warms up) and return the second's speed."""
    params = SamplingParams(max_tokens=tokens, temperature=0)
    engine.generate(prompt, params)
    done = engine.generate(prompt, params)
    steps = [e.step_ms for e in done.events]
    return Speed(steps[0], median(steps[1:]) or steps[0], int(done.finish.usage.get("prompt_tokens", 0)))


def tokens_for(target_ms: float, prefill_ms: float, step_ms: float, lo: int = 16, hi: int = 64) -> int:
    """How many tokens make a generation last about ``target_ms`` here, kept within ``[lo, hi]``."""
    n = 1 + int((target_ms - prefill_ms) / step_ms) if step_ms > 0 else hi
    return max(lo, min(hi, n))


def probe_interval_ms(step_ms: float, lo: float = 5.0, hi: float = 50.0) -> float:
    """A /health probe every step or so: several probes land inside any generation, at any speed.

    >>> probe_interval_ms(5.3), probe_interval_ms(81.0)
    (5.3, 50.0)
    """
    return max(lo, min(hi, step_ms))
