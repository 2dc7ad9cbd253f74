"""Claims that check themselves: a notebook's machine-dependent sentence, printed with the numbers of this run.

The prose of a notebook states relations ("several times sooner", "within a step"); the numbers behind
them come from the run that the reader is looking at, through ``claim``, which prints one line:

    >>> claim("streaming shows the first token sooner than blocking: 52 ms against 1,240 ms", 52 < 1240)
    CLAIM holds: streaming shows the first token sooner than blocking: 52 ms against 1,240 ms
    True
    >>> claim("8 batched streams give more tokens/s than 1: 70 against 74", 70 > 74,
    ...       why="the batched step cost more than 8 single steps")
    CLAIM FAILS: 8 batched streams give more tokens/s than 1: 70 against 74 (the batched step cost more than 8 single steps)
    False

The notebook tests fail on any ``CLAIM FAILS`` line, so a claim is only for what holds on every machine
a student may bring (a busy shared hub included); what may honestly differ there is said in the prose
instead. ``ratio`` words a measured ratio the same way everywhere:

    >>> ratio(1240.0, 52.0)
    '23.8x'

Left out: statistics. A claim compares what the caller measured; repeating and taking medians is the
caller's choice (``measure.stats``).
"""

from __future__ import annotations

HOLDS, FAILS = "CLAIM holds:", "CLAIM FAILS:"


def claim(sentence: str, holds: bool, why: str = "") -> bool:
    """Print ``CLAIM holds: sentence`` or ``CLAIM FAILS: sentence (why)``; return ``holds``."""
    holds = bool(holds)
    if holds:
        print(f"{HOLDS} {sentence}")
    else:
        print(f"{FAILS} {sentence}" + (f" ({why})" if why else ""))
    return holds


def ratio(a: float, b: float) -> str:
    """``a / b`` as ``'3.1x'`` (``'inf'`` when ``b`` is 0)."""
    return f"{a / b:.1f}x" if b else "inf"
