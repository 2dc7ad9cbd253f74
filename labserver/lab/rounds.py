"""One round of a continuous-batching scheduler, as a function a student writes, driven on the fake runner.

A round is what the server's engine thread does with the batched policy (``engine.scheduler.Batched``,
``engine.core``) between two looks at its inbox, folded into one function::

    one_round(engine, waiting, running, free_slots)

admits the first waiting sequences into the free cache slots and prefills them in one forward
(``engine.prefill_steps``), runs one decode step for every running sequence that is not finished
(``engine.decode_step(seqs, batched=True)``), and retires every finished sequence (``engine.end``, which
frees its slot) before the round ends, so the next round can give that slot to someone else. It mutates
``waiting`` and ``running`` (lists of ``engine.sequence.Sequence``). These are the engine's own phases on
the real ``Engine``; only the runner is ``FakeRunner`` (no sleeps here), whose tokens can be written down.

``drive`` calls a round function round after round, with sequences arriving at given rounds, and records
what each round did (``RoundRecord``), watching the engine's calls through ``_Spy``.

Left out (the real policy has them): the prefill token budget, prefill and decode in separate forwards,
and cancellation (the engine thread drops cancelled requests before it schedules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import EngineConfig, SamplingParams
from ..engine.fake import WORDS, fake_engine
from .display import print_table

__all__ = ["RoundRecord", "Drive", "drive", "expected_text", "print_rounds"]


@dataclass
class RoundRecord:
    """What one round did; sequences by name."""
    index: int
    free_slots: int                       # what the round was told
    waiting: list[str]                    # in line when the round began
    prefills: list[list[str]] = field(default_factory=list)   # one list per prefill forward
    decodes: list[list[str]] = field(default_factory=list)    # one list per decode forward
    ended: list[str] = field(default_factory=list)
    still_holding: list[str] = field(default_factory=list)    # finished, yet holding a slot after the round
    running: list[str] = field(default_factory=list)          # the caller's `running` after the round

    @property
    def admitted(self) -> list[str]:
        return [name for forward in self.prefills for name in forward]

    def row(self) -> dict:
        decoded = [name for forward in self.decodes for name in forward]
        return {"round": self.index, "free slots": self.free_slots, "waiting": " ".join(self.waiting) or "-",
                "prefilled": " ".join(self.admitted) or "-", "decoded": " ".join(decoded) or "-",
                "retired": " ".join(self.ended) or "-"}


class _Spy:
    """The engine, with its phase calls recorded into the current ``RoundRecord``."""

    def __init__(self, engine, names: dict[int, str]):
        self._engine, self._names = engine, names
        self.record: RoundRecord | None = None

    def _named(self, seqs) -> list[str]:
        return [self._names.get(id(s), "?") for s in seqs]

    def prefill_steps(self, seqs):
        self.record.prefills.append(self._named(seqs))
        return self._engine.prefill_steps(list(seqs))

    def decode_step(self, seqs, batched: bool = False):
        self.record.decodes.append(self._named(seqs))
        return self._engine.decode_step(list(seqs), batched)

    def end(self, seq):
        if seq.running:
            self.record.ended.append(self._names.get(id(seq), "?"))
        return self._engine.end(seq)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@dataclass
class Drive:
    records: list[RoundRecord]
    sequences: dict            # name -> Sequence
    finished_in: dict          # name -> the round after which it had its last token
    error: str | None = None


def expected_text(max_tokens: int) -> str:
    """What the fake runner writes: " one two three ...", then again from "one"."""
    return "".join(" " + WORDS[i % len(WORDS)] for i in range(max_tokens))


def drive(one_round: Callable, arrivals: dict[int, list[tuple[str, int]]], slots: int, rounds: int) -> Drive:
    """Run ``one_round`` ``rounds`` times. ``arrivals[r]`` lists (name, max_tokens) that join the line before
    round ``r``. ``free_slots`` is ``slots`` minus the sequences holding one; the runner itself has more,
    so a round that admits too many is recorded, not crashed."""
    config = EngineConfig(model="fake", threads=1, max_batch=slots + 8)
    engine = fake_engine(prefill_ms=0, step_ms=0, config=config)
    names: dict[int, str] = {}
    spy, waiting, running = _Spy(engine, names), [], []
    seqs, finished_in, records = {}, {}, []
    for r in range(rounds):
        for name, max_tokens in arrivals.get(r, []):
            seq = engine.begin("go", SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            names[id(seq)], seqs[name] = name, seq
            waiting.append(seq)
        free = slots - sum(s.running for s in seqs.values())
        spy.record = RoundRecord(r, free, [names[id(s)] for s in waiting])
        records.append(spy.record)
        try:
            one_round(spy, waiting, running, free)
        except Exception as exc:
            return Drive(records, seqs, finished_in, f"round {r} raised {type(exc).__name__}: {exc}")
        spy.record.still_holding = [n for n, s in seqs.items() if s.finished and s.running]
        spy.record.running = [names.get(id(s), "?") for s in running]
        for name, seq in seqs.items():
            if seq.finished and name not in finished_in:
                finished_in[name] = r
    return Drive(records, seqs, finished_in)


def print_rounds(result: Drive) -> None:
    print_table([record.row() for record in result.records])
