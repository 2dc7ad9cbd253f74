"""What a runner, an engine and a backend offer, written down as ``typing.Protocol``s.

Callers rely on these names and nothing else, so there is no need to probe an object with ``hasattr``:
every engine is an ``engine.Engine`` (on the model's runner or on ``fake.FakeRunner``), and every backend
(``serve.engine_thread.EngineThread``, the lab's ``serve.variants``) offers all of ``Backend``. A stream
whose engine died raises ``serve.health.EngineDeadError``.

Left out: any implementation, and runtime checks (the protocols are for readers and type checkers).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Protocol

if TYPE_CHECKING:
    import torch

    from ..config import EngineConfig, SamplingParams
    from .engine import Completion
    from .sequence import Finish, Sequence, TokenEvent
    from ..serve.health import EngineHealth


class Runner(Protocol):
    """The forward passes (``runners.py``, ``fake.FakeRunner``). A sequence holds ``seq.state`` (its cache
    or its blocks) from its prefill until ``release``."""

    name: str
    free_slots: int | float  # sequences that can still be prefilled now

    def prefill(self, seq: "Sequence") -> "torch.Tensor": ...  # logits [V] after the prompt
    def prefill_many(self, seqs: list["Sequence"]) -> "torch.Tensor": ...  # [B, V]
    def decode(self, seqs: list["Sequence"]) -> "torch.Tensor": ...  # [B, V] after each last token
    def release(self, seq: "Sequence") -> None: ...


class EngineProtocol(Protocol):
    """Limits, encoding, the phases the engine thread drives, and counters (``engine.Engine``)."""

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
    def prefill_steps(self, seqs: list["Sequence"]) -> list["TokenEvent | None"]: ...
    def decode_step(self, seqs: list["Sequence"], batched: bool = False) -> list["TokenEvent | None"]: ...
    def end(self, seq: "Sequence") -> "Finish": ...
    def generate_stream(self, prompt: str | list[int], params: "SamplingParams",
                        cancel: threading.Event | None = None) -> Iterator["TokenEvent | Finish"]: ...
    def generate(self, prompt: str | list[int], params: "SamplingParams") -> "Completion": ...


class Backend(Protocol):
    """Where the web apps run an engine from (``serve.variants.make_backend`` makes one by name)."""

    kind: str  # "batched", "thread", "process", "executor" or "blocking"
    engine: EngineProtocol

    @property
    def running(self) -> int: ...  # generations in progress (what /health reports)
    @property
    def alive(self) -> bool: ...  # able to take requests (started, or starting on first use)

    def health(self) -> "EngineHealth": ...  # alive, where, why not (cheap: /health and every request ask)
    def start(self) -> "Backend": ...  # idempotent; the FastAPI lifespan calls it
    def stream(self, prompt: str | list[int],
               params: "SamplingParams") -> AsyncIterator["TokenEvent | Finish"]: ...  # re-raises engine errors
    async def complete(self, prompt: str | list[int], params: "SamplingParams") -> "Completion": ...
    def generate(self, prompt: str | list[int], params: "SamplingParams") -> "Completion": ...  # blocking
    def close(self) -> None: ...
