"""Scheduling policies of the engine thread: which sequences run the next forward.

Before every forward the loop in ``core.py`` asks ``policy.schedule(free_slots)`` and gets a
``Step``: prefill these requests' prompts, or run one decode step for those, or ``None`` (nothing can run
now). A policy keeps its requests in arrival order; a request whose sequence holds a cache slot
(``seq.running``, from its prefill until ``Engine.end``) is *running*, the others *wait*.

- ``TurnTaking`` (backend "thread"): one sequence per forward, in turn; a newcomer takes its turn at the
  back of the line. Concurrent streams interleave token by token, and each waits for everyone's steps.
- ``Batched`` (backend "batched", the server's default): continuous batching, after nano-vllm's
  ``scheduler.py``. A prefill takes the waiting requests that fit a budget of prompt tokens
  (``prefill_tokens``; the first always fits), a free cache slot and ``max_batch``, in one forward; a
  decode step runs every running sequence in one forward. After a prefill comes a decode step, so the
  running streams wait for at most one prefill between two of their tokens. Prompts prefilled together
  keep the weights busier than one prompt does (8 prompts of 43 tokens here: ~290 ms together, ~350 ms
  one by one; 8 streams started at once also decode in step from the first token). Requests join and
  leave between steps: the loop retires a finished or cancelled sequence, freeing its slot, before
  asking again.

Left out: chunked prefill of long prompts (one longer than the budget prefills alone), prefill mixed
into decode steps, preemption, priorities (first come, first served) and prefix caching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass
class Step:
    prefill: bool  # True: ``Engine.prefill_steps`` for these prompts; False: one ``Engine.decode_step``
    requests: list  # ``core.Request``s, each with its ``seq``


class Policy:
    """The requests a policy schedules, in arrival order; subclasses say how in ``schedule``."""

    kind = ""
    batched = False  # whether decode events say how many sequences shared the step

    def __init__(self):
        self.requests: list = []

    def add(self, req) -> None:
        self.requests.append(req)

    def remove(self, req) -> None:
        self.requests.remove(req)

    def __iter__(self) -> Iterator:
        return iter(list(self.requests))

    def __len__(self) -> int:
        return len(self.requests)

    def schedule(self, free_slots: int | float) -> Step | None:
        raise NotImplementedError


class TurnTaking(Policy):
    """One sequence per forward: the first in line that can run, which then goes to the back of the line.

    >>> from types import SimpleNamespace as NS
    >>> a, b = NS(seq=NS(running=True)), NS(seq=NS(running=False))
    >>> policy = TurnTaking(); policy.add(a); policy.add(b)
    >>> [policy.schedule(1).prefill, policy.requests == [b, a]]  # a decodes and goes to the back
    [False, True]
    >>> policy.schedule(0).requests == [a]  # no free slot: b waits, a steps again
    True
    """

    kind = "thread"

    def schedule(self, free_slots: int | float) -> Step | None:
        for i, req in enumerate(self.requests):
            if req.seq.running or free_slots >= 1:
                self.requests.append(self.requests.pop(i))
                return Step(prefill=not req.seq.running, requests=[req])
        return None


class Batched(Policy):
    """Prefill the waiting requests that fit, then decode everyone running in one forward; repeat."""

    kind = "batched"
    batched = True

    def __init__(self, prefill_tokens: int = 256, max_batch: int = 16):
        super().__init__()
        self.prefill_tokens, self.max_batch = prefill_tokens, max_batch
        self._prefilled_last = False

    def schedule(self, free_slots: int | float) -> Step | None:
        running = [r for r in self.requests if r.seq.running]
        joining = [] if running and self._prefilled_last else self.joining(free_slots, len(running))
        self._prefilled_last = bool(joining)
        if joining:
            return Step(prefill=True, requests=joining)
        return Step(prefill=False, requests=running) if running else None

    def joining(self, free_slots: int | float, n_running: int) -> list:
        """The waiting requests to prefill now: in order, while a cache slot is free, the batch has room
        and their prompts fit ``prefill_tokens`` (the first always fits)."""
        room = min(free_slots, self.max_batch - n_running)
        joining, tokens = [], 0
        for req in self.requests:
            if req.seq.running:
                continue
            tokens += len(req.seq.ids)
            if len(joining) >= room or (joining and tokens > self.prefill_tokens):
                break
            joining.append(req)
        return joining
