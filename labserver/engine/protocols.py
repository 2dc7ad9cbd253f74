"""What a runner and an engine offer, written down as ``typing.Protocol``s, and what an engine reports.

Callers rely on these names and nothing else, so there is no need to probe an object with ``hasattr``:
every engine is an ``engine.Engine`` (on the model's runner or on ``fake.FakeRunner``). ``EngineHealth``
is what every backend answers about its engine (alive, where, why not); a stream whose engine died raises
``EngineDeadError``.

Left out: any implementation, runtime checks (the protocols are for readers and type checkers), and the
backends' own doors (``serve/backends.py``: they belong to the web layer).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

if TYPE_CHECKING:
    import torch

    from ..config import EngineConfig, SamplingParams
    from .sequence import Completion, Finish, Sequence, TokenEvent, TokenOutput


class EngineDeadError(RuntimeError):
    """The engine stopped (its thread failed, its process died) with requests in flight."""


@dataclass(frozen=True)
class EngineHealth:
    alive: bool  # the engine runs, or will start on first use
    pid: int | None  # the process that runs the engine
    backend: str  # "thread", "batched", "process", "executor", "blocking", ...
    route: str  # the weight format that runs ("q4_1", "fp16", "none", "fake")
    reason: str | None = None  # why the engine cannot serve (dead, wedged, restarting); None when it can
    running: int = 0
    waiting: int = 0
    restarts: int = 0
    no_progress_s: float = 0.0  # since the engine loop last came round while it had work; 0 when idle
    prefilled: int = 0  # prompts the engine has prefilled since it started (none for a request that left waiting)
    kv: dict | None = None  # the KV cache: usage, blocks free and used, prefix-cache queries and hits

    @property
    def ok(self) -> bool:
        return self.alive and self.reason is None

    def to_dict(self) -> dict:
        return asdict(self)


class Runner(Protocol):
    """The forward passes (``runners.py``, ``fake.FakeRunner``). A sequence holds ``seq.state`` (its cache
    or its blocks) from its prefill until ``release``."""

    name: str
    free_slots: int | float  # sequences that can still be prefilled now
    kv_layout: tuple[int, int] | None  # (num_blocks, block_size) of its paged KV pool; None: no pool

    # For each (seq, start, n, block table): feed seq.tokens[start:start + n]; the logits after each
    # entry's last token [len(entries), V] (decode steps, prompts, chunks of prompts, or a mix).
    def forward(self, entries: list[tuple["Sequence", int, int, list[int] | None]]) -> "torch.Tensor": ...
    def release(self, seq: "Sequence") -> None: ...
    # With a pool: K/V of block src's first rows positions into block dst (a prefix ending inside a block).
    def copy_rows(self, src: int, dst: int, rows: int) -> None: ...


class EngineProtocol(Protocol):
    """Limits, encoding, the phases the engine core drives, and counters (``engine.Engine``)."""

    config: "EngineConfig"
    runner: Runner
    context_len: int  # prompt + output tokens one sequence may hold
    running: int  # sequences between their prefill and ``end``
    tokens_generated: int
    route: dict  # the weight format that runs and why: {"quant", "why", ...}

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]: ...
    def encode_messages(self, messages: list[dict]) -> list[int]: ...
    def begin(self, prompt: str | list[int], params: "SamplingParams",
              cancel: threading.Event | None = None) -> "Sequence": ...
    def prefill_steps(self, seqs: list["Sequence"]) -> list["TokenOutput | None"]: ...
    def decode_step(self, seqs: list["Sequence"], batched: bool = False) -> list["TokenOutput | None"]: ...
    def end(self, seq: "Sequence") -> "Finish": ...
    def steps(self, prompt: str | list[int], params: "SamplingParams",
              cancel: threading.Event | None = None) -> Iterator["TokenOutput | Finish"]: ...
    def generate_stream(self, prompt: str | list[int], params: "SamplingParams",
                        cancel: threading.Event | None = None) -> Iterator["TokenEvent | Finish"]: ...
    def generate(self, prompt: str | list[int], params: "SamplingParams") -> "Completion": ...

