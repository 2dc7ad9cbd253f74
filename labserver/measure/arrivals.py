"""When requests arrive: the open-loop schedule of `vllm bench serve` (Poisson, or gamma with a burstiness).

Inter-arrival gaps are drawn from a gamma distribution with shape `burstiness` and mean `1 / rate`, as
`vllm bench serve --request-rate R --burstiness B` draws them. Burstiness 1 is a Poisson process
(exponential gaps, coefficient of variation 1); below 1 the arrivals come in bursts, above 1 they are
more even; `burstiness=inf` gives evenly spaced arrivals (the gamma's limit). `rate=inf` sends every
request at once (a closed burst, as `run_concurrent` does).

    >>> arrival_times(4, rate=2.0, burstiness=float("inf"))
    [0.0, 0.5, 1.0, 1.5]
    >>> arrival_times(3, rate=float("inf"))
    [0.0, 0.0, 0.0]

Left out: time-varying rates (ramps, traces replayed from logs); the sending itself (`load.py`).
"""
from __future__ import annotations

import math

import numpy as np


def gaps(n: int, rate: float, burstiness: float = 1.0, seed: int | None = 0) -> list[float]:
    """`n` inter-arrival gaps in seconds, mean `1 / rate`, coefficient of variation `1 / sqrt(burstiness)`."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf: all at once), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson), got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    if math.isinf(burstiness):
        return [1.0 / rate] * n
    # Gamma(shape=k, scale=theta) has mean k*theta: theta = 1 / (rate * k) keeps the mean at 1 / rate.
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n).tolist()


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int | None = 0) -> list[float]:
    """Send times of `n` requests in seconds after the start; the first request goes at 0."""
    times, t = [], 0.0
    for gap in gaps(n - 1, rate, burstiness, seed) if n > 0 else []:
        times.append(t)
        t += gap
    return times + [t] if n > 0 else []


def gap_cv(burstiness: float) -> float:
    """The coefficient of variation (std / mean) of the gaps: 1 for Poisson, 0 for evenly spaced."""
    return 0.0 if math.isinf(burstiness) else 1.0 / math.sqrt(burstiness)
