"""The engine: one causal LM, one request at a time, as a generator of token events.

The phases are small named functions, as in gpt-fast: ``prefill`` runs the prompt through the model and
fills the KV cache, ``decode_one_token`` feeds back one token and reuses that cache, ``sample_token``
picks the next id. ``Engine.generate_stream`` strings them together and yields a ``TokenEvent`` per token
(text from the incremental detokenizer, the measured ``step_ms``) and a final ``Finish``.

Each phase enters ``torch.inference_mode`` itself instead of the generator holding it open: grad mode is
thread-local, and a generator resumed on another thread (the seed's ``run_in_executor(next)`` pattern)
would otherwise run its later steps with autograd on.

Left out on purpose: batching (one sequence per generator), stop strings, repetition penalties, and any
threading: whoever calls ``next()`` runs the model on its own thread (see ``worker.py``).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from .config import EngineConfig, SamplingParams
from .detokenize import IncrementalDetokenizer


class PromptTooLong(ValueError):
    """The prompt does not fit the engine's limits or the model's context."""


@dataclass
class TokenEvent:
    token: str  # the text this token adds ("" while a multi-byte character is incomplete)
    token_id: int
    index: int  # 0-based position in the output
    step_ms: float  # compute time of the step that produced it (the prefill, for index 0)
    prefill_time_ms: float | None = None  # only on the first token

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.prefill_time_ms is None:
            del d["prefill_time_ms"]
        return d


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


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the whole prompt ``[1, S]`` once; return the last position's logits ``[V]``."""
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


@torch.inference_mode()
def decode_one_token(model, token_id: int, cache) -> torch.Tensor:
    """Feed one token ``[1, 1]`` against the cache; return its logits ``[V]``."""
    out = model(input_ids=torch.tensor([[token_id]]), cache=cache, use_cache=True)
    return out.logits[0, -1]


@torch.inference_mode()
def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature, then nucleus (top-p) sampling."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """A model, its tokenizer and the limits of ``config``; counts the generations in progress."""

    def __init__(self, model, tokenizer, config: EngineConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        torch.set_num_threads(config.threads)
        self.eos_ids = self._eos_ids()
        self.context_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self._lock = threading.Lock()
        self.running = 0
        self.tokens_generated = 0

    @classmethod
    def from_config(cls, config: EngineConfig | None = None) -> "Engine":
        from .model import load_model_and_tokenizer

        config = config or EngineConfig.from_env()
        return cls(*load_model_and_tokenizer(config), config)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return {int(i) for i in ids if i is not None}

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids for ``prompt``, inside the chat template when the model has one (and ``chat``)."""
        if len(prompt) > self.config.max_prompt_chars:
            raise PromptTooLong(f"prompt has {len(prompt)} characters; the limit is {self.config.max_prompt_chars}")
        chat = self.config.chat_template if chat is None else chat
        if chat and getattr(self.tokenizer, "chat_template", None):
            return self.encode_messages([{"role": "user", "content": prompt}])
        return self._checked(self.tokenizer(prompt)["input_ids"])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids for a chat (``[{"role": ..., "content": ...}]``) through the model's chat template."""
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        if chars > self.config.max_prompt_chars:
            raise PromptTooLong(f"messages have {chars} characters; the limit is {self.config.max_prompt_chars}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return self._checked(ids if isinstance(ids, list) else ids["input_ids"])

    def _checked(self, ids) -> list[int]:
        limit = min(self.config.max_prompt_tokens, self.context_len - 1)
        if len(ids) > limit:
            raise PromptTooLong(f"prompt is {len(ids)} tokens; the limit is {limit}")
        if not ids:
            raise ValueError("prompt encodes to no tokens")
        return list(ids)

    def generate_stream(
        self, prompt: str | list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent | Finish]:
        """Yield a ``TokenEvent`` per generated token, then one ``Finish``.

        The prompt is encoded now, so a ``PromptTooLong`` is raised before any generator exists.
        ``cancel`` is checked between steps: once set, the generator finishes with "cancelled".
        """
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
        return self._stream(ids, params, cancel or threading.Event())

    def _stream(self, ids: list[int], params: SamplingParams, cancel: threading.Event):
        with self._lock:
            self.running += 1
        try:
            yield from self._generate(ids, params, cancel)
        finally:
            with self._lock:
                self.running -= 1

    def _generate(self, ids: list[int], params: SamplingParams, cancel: threading.Event):
        from transformers import DynamicCache

        seed = params.seed if params.seed is not None else random.randrange(2**63)
        generator = None if params.greedy else torch.Generator().manual_seed(seed)
        max_tokens = min(params.max_tokens, self.context_len - len(ids))
        cache = DynamicCache(config=self.model.config)
        detok = IncrementalDetokenizer(self.tokenizer)
        start = time.perf_counter()
        logits = prefill(self.model, torch.tensor([ids]), cache)
        step_ms: list[float] = []
        finish_reason = "length"
        for index in range(max_tokens):
            if index > 0:
                if cancel.is_set():
                    finish_reason = "cancelled"
                    break
                t0 = time.perf_counter()
                logits = decode_one_token(self.model, token_id, cache)
            token_id = sample_token(logits, params, generator)
            elapsed = (time.perf_counter() - (start if index == 0 else t0)) * 1000
            step_ms.append(elapsed)
            with self._lock:
                self.tokens_generated += 1
            if token_id in self.eos_ids:
                finish_reason = "stop"
                break
            text = detok.step(token_id) + (detok.flush() if index == max_tokens - 1 else "")
            yield TokenEvent(text, token_id, index, round(elapsed, 3),
                             round(elapsed, 3) if index == 0 else None)
        yield self._finish(finish_reason, len(ids), step_ms, start, emitted=len(detok.ids))

    @staticmethod
    def _finish(reason: str, prompt_tokens: int, step_ms: list[float], start: float, emitted: int) -> Finish:
        total_ms = (time.perf_counter() - start) * 1000
        decode_ms = sum(step_ms[1:])
        timings = {
            "prefill_time_ms": round(step_ms[0], 3) if step_ms else 0.0,
            "decode_time_ms": round(decode_ms, 3),
            "mean_step_ms": round(decode_ms / (len(step_ms) - 1), 3) if len(step_ms) > 1 else 0.0,
            "total_ms": round(total_ms, 3),
            "tokens_per_s": round(emitted / total_ms * 1000, 3) if total_ms > 0 else 0.0,
        }
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": emitted,
                 "total_tokens": prompt_tokens + emitted}
        return Finish(reason, usage, timings)

    def generate(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        """Run ``generate_stream`` to the end and collect it."""
        return collect(self.generate_stream(prompt, params))


def collect(items) -> Completion:
    """Gather a stream of ``TokenEvent``s and its ``Finish`` into a ``Completion``."""
    events: list[TokenEvent] = []
    for item in items:
        if isinstance(item, Finish):
            return Completion("".join(e.token for e in events), [e.token_id for e in events], events, item)
        events.append(item)
    raise RuntimeError("the stream ended without a Finish")
