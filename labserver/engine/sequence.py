"""One request's state between model steps: what it asked for, what it has produced, how long each step took.

The engine turns a prompt into a ``Sequence`` (``Engine.begin``), runs its prefill, then decode steps,
alone (``Engine.steps``) or on the engine core's thread, in turn or in a batch with others (``core.py``).
After each step ``Sequence.append`` records the sampled token and returns the ``TokenOutput`` to send, so
the rules for stopping (EOS unless ``ignore_eos``/``min_tokens`` say otherwise, ``max_tokens``) live in
one place. The engine emits token ids only, as vLLM's ``EngineCore`` does: the text of a ``TokenEvent`` is
made by the one output processor (``output.py``), wherever the engine runs.

Left out: any model call (``runners.py``), any threading, text, and stop strings (the OpenAI wire format's).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, fields

import torch

from ..config import SamplingParams


def max_new_tokens(max_tokens: int, context_len: int, prompt_len: int) -> int:
    """Tokens a request may generate: what it asked for, capped by the context left after its prompt.

    >>> max_new_tokens(128, context_len=2048, prompt_len=2000)
    48
    """
    return min(max_tokens, context_len - prompt_len)


@dataclass
class TokenOutput:
    """What the engine emits for one generated token: its id and timings, no text."""

    token_id: int
    index: int  # 0-based position in the output
    step_ms: float  # wall time of the step that produced it (the prefill, for index 0)
    prefill_time_ms: float | None = None  # only on the first token
    batch: int | None = None  # sequences that shared the step


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


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    events: list[TokenEvent]
    finish: Finish

    def to_dict(self) -> dict:
        """The non-streaming JSON body: the same information as the stream, in one object."""
        return {"text": self.text, "tokens": [e.to_dict() for e in self.events], **self.finish.to_dict()}


def collect(items) -> "Completion":
    """Gather a stream of ``TokenEvent``s and its ``Finish`` into a ``Completion``."""
    events: list[TokenEvent] = []
    for item in items:
        if isinstance(item, Finish):
            return Completion("".join(e.token for e in events), [e.token_id for e in events], events, item)
        events.append(item)
    raise RuntimeError("the stream ended without a Finish")


class Sequence:
    """Prompt ids, sampling state and outputs of one generation; ``state`` is the runner's (its cache).

    ``tokens`` is the prompt and every token sampled so far; ``computed`` counts those whose K/V the model
    has written (``cached`` of them found in the prefix cache rather than computed). What a forward feeds
    is ``tokens[computed:]``, all of it or a chunk; once nothing is left the next token is sampled. A
    decode step feeds the one token sampled last; a prefill feeds the prompt; a sequence preempted (its
    blocks taken back) starts again from ``computed = 0``, its outputs part of what it feeds.
    """

    def __init__(self, ids: list[int], params: SamplingParams, cancel: threading.Event,
                 eos_ids: set[int], max_tokens: int):
        self.ids, self.params, self.cancel, self.eos_ids = ids, params, cancel, eos_ids
        self.max_tokens = max_tokens  # already capped by the context left after the prompt
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.generator = None if params.greedy else torch.Generator().manual_seed(seed)
        self.emitted = 0  # tokens sent (an honoured EOS is not)
        self.step_ms: list[float] = []
        self.last_token: int | None = None
        self.finish_reason: str | None = None
        self.state = None  # the runner's: a DynamicCache, or nothing (the KV blocks are the engine's)
        self.running = False  # holds KV memory and counts as running: from its admission until end
        self.tokens = list(ids)
        self.computed = 0  # tokens whose K/V are written
        self.cached = 0  # prompt tokens found in the prefix cache at its first admission
        self.admitted = False  # admitted once (a preempted sequence is admitted again)
        self.prefill_ms = 0.0  # forward time spent on its prompt so far (chunks add up)
        self.start = time.perf_counter()

    @property
    def remaining(self) -> int:
        """Tokens to feed before the next token can be sampled (1 for a decoding sequence)."""
        return len(self.tokens) - self.computed

    @property
    def decoding(self) -> bool:
        return self.running and self.remaining == 1 and len(self.tokens) > len(self.ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def honours_eos(self, index: int) -> bool:
        """Whether an end-of-sequence token at output position ``index`` ends the sequence: never with
        ``ignore_eos``, and not before ``min_tokens`` tokens (an ignored one is an ordinary, textless token)."""
        return not self.params.ignore_eos and index >= self.params.min_tokens

    def append(self, token_id: int, elapsed_ms: float, batch: int | None = None) -> TokenOutput | None:
        """Record a sampled token; return its event, or None for EOS (which ends the sequence unsent)."""
        index = len(self.step_ms)
        self.step_ms.append(elapsed_ms)
        if token_id in self.eos_ids and self.honours_eos(index):
            self.finish_reason = "stop"
            return None
        self.last_token = token_id
        self.tokens.append(token_id)
        self.emitted += 1
        if index == self.max_tokens - 1:
            self.finish_reason = "length"
        ms = round(elapsed_ms, 3)
        return TokenOutput(token_id, index, ms, ms if index == 0 else None, batch)

    def finish(self) -> Finish:
        reason = self.finish_reason or "cancelled"
        emitted = self.emitted
        total_ms = (time.perf_counter() - self.start) * 1000
        decode_ms = sum(self.step_ms[1:])
        timings = {
            "prefill_time_ms": round(self.step_ms[0], 3) if self.step_ms else 0.0,
            "decode_time_ms": round(decode_ms, 3),
            "mean_step_ms": round(decode_ms / (len(self.step_ms) - 1), 3) if len(self.step_ms) > 1 else 0.0,
            "total_ms": round(total_ms, 3),
            "tokens_per_s": round(emitted / total_ms * 1000, 3) if total_ms > 0 else 0.0,
        }
        timings["cached_tokens"] = self.cached
        usage = {"prompt_tokens": len(self.ids), "completion_tokens": emitted,
                 "total_tokens": len(self.ids) + emitted, "prompt_tokens_details": {"cached_tokens": self.cached}}
        return Finish(reason, usage, timings)
