"""Demos that size themselves: the engine's prefill and decode step, measured at the top of a notebook,
decide how long its generations are and how often its probes ask, so that each lesson shows on a
5 ms/step machine and on an 80 ms/step one alike.

    >>> tokens_for(1000, prefill_ms=50, step_ms=5)      # a fast CPU: capped
    64
    >>> tokens_for(1000, prefill_ms=2800, step_ms=81)   # a slow one: the floor, a lesson still needs tokens
    16
    >>> tokens_for(1000, prefill_ms=100, step_ms=30)
    31

Left out: statistics beyond medians and a p10-p90 spread (enough to choose a size and to say what is noise).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import SamplingParams
from .display import PROMPT, median


@dataclass
class Speed:
    """What short greedy generations on this machine took, measured by the engine itself: medians, and
    the spread (10th to 90th percentile) that says how much of a difference is noise on this machine."""
    prefill_ms: float       # the prompt's forward pass and the first token (median over the repeats)
    step_ms: float          # median decode step
    prompt_tokens: int
    prefill_spread_ms: tuple[float, float] = (0.0, 0.0)
    step_spread_ms: tuple[float, float] = (0.0, 0.0)
    repeats: int = 1

    @property
    def step_noise(self) -> float:
        """The steps' p10-p90 spread over their median: a comparison of steps needs a bigger difference."""
        return (self.step_spread_ms[1] - self.step_spread_ms[0]) / self.step_ms if self.step_ms else 0.0

    def __str__(self) -> str:
        (p_lo, p_hi), (s_lo, s_hi) = self.prefill_spread_ms, self.step_spread_ms
        return (f"prefill {self.prefill_ms:.1f} ms for {self.prompt_tokens} prompt tokens "
                f"(p10-p90 {p_lo:.1f}-{p_hi:.1f} over {self.repeats} runs), decode step {self.step_ms:.1f} ms "
                f"(median; p10-p90 {s_lo:.1f}-{s_hi:.1f})")


def _spread(values: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.percentile(values, 10)), float(np.percentile(values, 90))


def measure_speed(engine, prompt: str = PROMPT, tokens: int = 8, repeats: int = 4) -> Speed:
    """Generate ``tokens`` greedy tokens ``repeats`` times after a warm-up: each run's prefill and every
    decode step, summarised by their medians and spreads."""
    params = SamplingParams(max_tokens=tokens, temperature=0)
    engine.generate(prompt, params)
    prefills, steps, done = [], [], None
    for _ in range(max(1, repeats)):
        done = engine.generate(prompt, params)
        prefills.append(done.events[0].step_ms)
        steps += [e.step_ms for e in done.events[1:]]
    steps = steps or prefills
    return Speed(median(prefills), median(steps), int(done.finish.usage.get("prompt_tokens", 0)),
                 _spread(prefills), _spread(steps), max(1, repeats))


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
