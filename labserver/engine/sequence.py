"""One request's state between model steps: what it asked for, what it has produced, how long each step took.

The engine turns a prompt into a ``Sequence`` (``Engine.begin``), runs its prefill, then decode steps,
alone (``Engine.generate_stream``) or on the engine thread, in turn or in a batch with others
(``serve.engine_thread``). After each step ``Sequence.append`` records the sampled token and returns the
``TokenEvent`` to send, so the rules for stopping (EOS unless ``ignore_eos``/``min_tokens`` say otherwise,
``max_tokens``) and for text (the incremental detokenizer) live in one place.

Left out: any model call (``runners.py``), any threading, and stop strings (applied by the web layer).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, fields

import torch

from ..config import SamplingParams
from .detokenize import IncrementalDetokenizer


@dataclass
class TokenEvent:
    token: str  # the text this token adds ("" while a multi-byte character is incomplete)
    token_id: int
    index: int  # 0-based position in the output
    step_ms: float  # wall time of the step that produced it (the prefill, for index 0)
    prefill_time_ms: float | None = None  # only on the first token
    batch: int | None = None  # sequences that shared the step: a decode step, or a prefill of several prompts

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it deep-copies every field, ~0.1 ms a token on the event loop.
        d = {name: getattr(self, name) for name in TOKEN_FIELDS}
        for key in ("prefill_time_ms", "batch"):
            if d[key] is None:
                del d[key]
        return d


TOKEN_FIELDS = tuple(f.name for f in fields(TokenEvent))


@dataclass
class Finish:
    finish_reason: str  # "stop" (EOS), "length" (max_tokens) or "cancelled"
    usage: dict
    timings: dict

    def to_dict(self) -> dict:
        return asdict(self)


class Sequence:
    """Prompt ids, sampling state and outputs of one generation; ``state`` is the runner's (its cache or blocks)."""

    def __init__(self, ids: list[int], params: SamplingParams, cancel: threading.Event,
                 tokenizer, eos_ids: set[int], max_tokens: int):
        self.ids, self.params, self.cancel, self.eos_ids = ids, params, cancel, eos_ids
        self.max_tokens = max_tokens  # already capped by the context left after the prompt
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.generator = None if params.greedy else torch.Generator().manual_seed(seed)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.step_ms: list[float] = []
        self.last_token: int | None = None
        self.finish_reason: str | None = None
        self.state = None  # the runner's: its blocks of the lean runner's pool, or a DynamicCache
        self.running = False  # counted by the engine between prefill_step and end
        self.start = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def honours_eos(self, index: int) -> bool:
        """Whether an end-of-sequence token at output position ``index`` ends the sequence: never with
        ``ignore_eos``, and not before ``min_tokens`` tokens (an ignored one is an ordinary, textless token)."""
        return not self.params.ignore_eos and index >= self.params.min_tokens

    def append(self, token_id: int, elapsed_ms: float, batch: int | None = None) -> TokenEvent | None:
        """Record a sampled token; return its event, or None for EOS (which ends the sequence unsent)."""
        index = len(self.step_ms)
        self.step_ms.append(elapsed_ms)
        if token_id in self.eos_ids and self.honours_eos(index):
            self.finish_reason = "stop"
            return None
        last = index == self.max_tokens - 1
        text = self.detok.step(token_id) + (self.detok.flush() if last else "")
        self.last_token = token_id
        if last:
            self.finish_reason = "length"
        ms = round(elapsed_ms, 3)
        return TokenEvent(text, token_id, index, ms, ms if index == 0 else None, batch)

    def finish(self) -> Finish:
        reason = self.finish_reason or "cancelled"
        emitted = len(self.detok.ids)
        total_ms = (time.perf_counter() - self.start) * 1000
        decode_ms = sum(self.step_ms[1:])
        timings = {
            "prefill_time_ms": round(self.step_ms[0], 3) if self.step_ms else 0.0,
            "decode_time_ms": round(decode_ms, 3),
            "mean_step_ms": round(decode_ms / (len(self.step_ms) - 1), 3) if len(self.step_ms) > 1 else 0.0,
            "total_ms": round(total_ms, 3),
            "tokens_per_s": round(emitted / total_ms * 1000, 3) if total_ms > 0 else 0.0,
        }
        usage = {"prompt_tokens": len(self.ids), "completion_tokens": emitted,
                 "total_tokens": len(self.ids) + emitted}
        return Finish(reason, usage, timings)
