"""Scheduling policies of the engine core: which sequences run the next forward, and how many tokens each.

Before every forward the loop in ``core.py`` asks ``policy.schedule(engine)`` and gets a ``Step``: a list
of (request, tokens to feed) pairs, or ``None`` (nothing can run now). A policy keeps its requests in
arrival order; a request whose sequence holds KV memory (``seq.running``, from ``Engine.admit`` until
``Engine.end`` or ``Engine.preempt``) is *running*, the others *wait*. What a sequence must feed before
its next token is ``seq.remaining``: 1 for a decoding sequence, its prompt (less what the prefix cache
held) for a new one.

- ``TurnTaking`` (backend "thread"): one sequence per forward, in turn, its whole prompt at once; a
  newcomer takes its turn at the back of the line. Streams interleave token by token.
- ``Batched`` (backend "batched", the server's default): continuous batching with a token budget per
  forward (``max_num_batched_tokens``, vLLM V1's scheduler): first one token for every decoding
  sequence, then chunks of the prompts being prefilled, then newcomers in arrival order while the budget,
  ``max_batch`` and the KV memory allow. A long prompt is prefilled in chunks *inside* the running
  streams' forwards, so their longest gap is one chunk's forward, not the whole prompt's.

Memory: a newcomer is admitted only when the free blocks hold its prompt; it waits otherwise (first come,
first served: nobody overtakes it). A running sequence that needs a new block when none is free makes
the latest arrival among the running give its blocks back (``Engine.preempt``): it waits again and is
computed again later, mostly from the prefix cache. Left out: priorities, swapping K/V to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass
class Step:
    work: list  # (``core.Request``, tokens of its sequence to feed) pairs

    @property
    def requests(self) -> list:
        return [req for req, _ in self.work]

    @property
    def prefill(self) -> bool:
        """Whether any sequence feeds more than the one token of a decode step (or its first)."""
        return any(not req.seq.decoding for req, _ in self.work)


class Policy:
    """The requests a policy schedules, in arrival order; subclasses say how in ``schedule``."""

    kind = ""
    batched = False  # whether outputs say how many sequences shared the step

    def __init__(self, max_batch: int = 16):
        self.requests: list = []
        self.max_batch = max_batch

    def add(self, req) -> None:
        self.requests.append(req)

    def remove(self, req) -> None:
        self.requests.remove(req)

    def __iter__(self) -> Iterator:
        return iter(list(self.requests))

    def __len__(self) -> int:
        return len(self.requests)

    @classmethod
    def of(cls, config) -> "Policy":
        """This policy with an ``EngineConfig``'s limits."""
        return cls(max_batch=config.max_batch)

    def schedule(self, engine) -> Step | None:
        raise NotImplementedError

    def reserve(self, engine, req, n: int, work: list) -> bool:
        """Room for ``n`` more tokens of running ``req``, preempting the latest arrival among the running
        while there is none (dropping it from ``work``); False when that is ``req`` itself."""
        while not engine.reserve(req.seq, n):
            victim = next(r for r in reversed(self.requests) if r.seq.running)
            engine.preempt(victim.seq)
            work[:] = [(r, k) for r, k in work if r is not victim]
            if victim is req:
                return False
        return True

    def admit(self, engine, req, n_running: int) -> bool:
        return n_running < self.max_batch and engine.admit(req.seq)


class TurnTaking(Policy):
    """One sequence per forward: the first in line that can run, which then goes to the back of the line."""

    kind = "thread"

    def schedule(self, engine) -> Step | None:
        n_running = sum(r.seq.running for r in self.requests)
        for i, req in enumerate(self.requests):
            if req.seq.running or self.admit(engine, req, n_running):
                work = [(req, req.seq.remaining)]
                if not self.reserve(engine, req, req.seq.remaining, work):
                    return None  # it gave its own blocks back: the others run before it comes again
                self.requests.append(self.requests.pop(i))
                return Step(work)
        return None


class Batched(Policy):
    """Every decoding sequence's token, then prompt chunks, within ``max_num_batched_tokens`` a forward."""

    kind = "batched"
    batched = True

    def __init__(self, max_batch: int = 16, max_num_batched_tokens: int = 128):
        super().__init__(max_batch)
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.max_num_batched_tokens = max_num_batched_tokens

    @classmethod
    def of(cls, config) -> "Batched":
        return cls(config.max_batch, config.max_num_batched_tokens)

    def schedule(self, engine) -> Step | None:
        budget, work = self.max_num_batched_tokens, []
        running = [r for r in self.requests if r.seq.running]
        # Decode tokens first (vLLM's order), so a long prompt never delays a stream by more than a chunk.
        for req in sorted(running, key=lambda r: not r.seq.decoding):
            if not req.seq.running:  # preempted for an earlier one's block
                continue
            n = min(req.seq.remaining, budget)
            if n < 1:
                break
            if self.reserve(engine, req, n, work):
                work.append((req, n))
            budget -= n
        n_running = sum(r.seq.running for r in self.requests)
        for req in self.requests:
            if budget < 1:
                break
            if req.seq.running:
                continue
            if not self.admit(engine, req, n_running):
                break  # first come, first served: nobody overtakes a request that does not fit yet
            n_running += 1
            n = min(req.seq.remaining, budget)
            work.append((req, n))
            budget -= n
        return Step(work) if work else None
