"""How many threads run the model fastest here: each candidate count timed on a prefill and a few decode
steps, in turns, and the choice among them (``calibrate.choose_threads`` caches it and explains it).

The candidates are all the physical cores, all but one (room for the event loop), and half: a prefill is
compute-bound and wants every core, a decode step is bound by memory and often runs as fast on fewer.
Left out: the counts' cache and the route they are measured on (``calibrate.py``), hybrid cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

THREAD_PROMPT, THREAD_STEPS, THREAD_ROUNDS = 64, 4, 2  # per thread count and round: cheap on 2 cores too
DECODE_TIE = 1.05  # decode steps this close to the fastest are a tie, which the prefill then breaks


@dataclass(frozen=True)
class ThreadTrial:
    decode_ms: float  # best decode step of one sequence
    prefill_ms: float  # best prefill of the fixed prompt


def thread_candidates(cores: int) -> list[int]:
    """The counts timed: all ``cores``, all but one, half; distinct, most first.

    >>> thread_candidates(8), thread_candidates(10), thread_candidates(2), thread_candidates(1)
    ([8, 7, 4], [10, 9, 5], [2, 1], [1])
    """
    return sorted({cores, max(1, cores - 1), max(1, cores // 2)}, reverse=True)


def pick_threads(trials: dict[int, ThreadTrial]) -> int:
    """The fastest decode; among decodes within ``DECODE_TIE`` of it, the fastest prefill; then fewer threads."""
    fastest = min(t.decode_ms for t in trials.values())
    tied = [n for n, t in trials.items() if t.decode_ms <= fastest * DECODE_TIE]
    return min(tied, key=lambda n: (trials[n].prefill_ms, n))


def thread_trial(lean, threads: int) -> ThreadTrial:
    """A prefill of a fixed prompt and ``THREAD_STEPS`` decode steps on ``lean`` at ``threads`` threads
    (``torch.set_num_threads`` is per calling thread, and the C kernels run on its OpenMP team)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    length = max(1, min(THREAD_PROMPT, lean.max_len - THREAD_STEPS - 1))
    prompt = torch.randint(0, lean.vocab, (length,), generator=g).tolist()
    table = list(range(lean.cache.blocks_for(length + THREAD_STEPS)))  # the pool's first blocks
    start = time.perf_counter()
    token = int(lean.prefill(prompt, table).argmax())
    prefill_ms, best = (time.perf_counter() - start) * 1000, float("inf")
    for position in range(length, length + THREAD_STEPS):
        start = time.perf_counter()
        token = int(lean.decode([token], [position], [table])[0].argmax())
        best = min(best, time.perf_counter() - start)
    return ThreadTrial(best * 1000, prefill_ms)


def measure_threads(lean, candidates: list[int], timing=None) -> dict[int, ThreadTrial]:
    """Each count's best decode step and prefill over ``THREAD_ROUNDS`` rounds, taken in turns so that a
    passing load weighs on every count alike. ``timing(lean, threads)``: ``thread_trial`` unless given."""
    timing = timing or thread_trial  # looked up now: tests replace the module's thread_trial
    trials: dict[int, ThreadTrial] = {}
    for _ in range(THREAD_ROUNDS):
        for n in candidates:
            t, old = timing(lean, n), trials.get(n)
            trials[n] = t if old is None else ThreadTrial(min(t.decode_ms, old.decode_ms),
                                                          min(t.prefill_ms, old.prefill_ms))
    return trials


def threads_why(trials: dict[int, ThreadTrial], chosen: int, when: str) -> str:
    """"4 threads: fastest decode of 8/7/4 measured now (decode 5.3/5.2/5.0 ms, prefill 40/44/61 ms)"."""
    counts = "/".join(str(n) for n in trials)
    numbers = (f"decode {'/'.join(f'{t.decode_ms:.1f}' for t in trials.values())} ms, "
               f"prefill {'/'.join(f'{t.prefill_ms:.0f}' for t in trials.values())} ms")
    fastest = min(trials, key=lambda n: trials[n].decode_ms)
    rule = (f"fastest decode of {counts}" if chosen == fastest else
            f"decode within {round((DECODE_TIE - 1) * 100)}% of the fastest of {counts}, and the fastest prefill")
    return f"{chosen} thread{'s' * (chosen != 1)}: {rule} measured {when} ({numbers})"
