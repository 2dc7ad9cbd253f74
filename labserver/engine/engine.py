"""The engine: a causal LM behind small named phases that yield token events.

The phases follow gpt-fast: ``prefill_step`` runs a prompt through the model and samples its first token,
``decode_step`` feeds back the last token of one or more sequences in one forward, ``sample_token``
picks each next id. ``Engine.generate_stream`` strings them together for one sequence and yields a
``TokenEvent`` per token (text from the incremental detokenizer, the measured ``step_ms``) and a final
``Finish``, for the lab's executor and blocking variants and for scripts; the server's engine thread
(``serve.engine_thread``) calls the same phases itself, for one sequence or many at once.

The forward passes live in ``runners.py`` (the lean llama, or transformers for any other model); each
enters ``torch.inference_mode`` itself, because grad mode is thread-local and a generator resumed on
another thread (the first streaming version's ``run_in_executor(next)`` pattern) would otherwise run later steps with
autograd on.

Left out on purpose: stop strings, repetition penalties, and any threading: whoever calls a phase runs
the model on its own thread (see ``serve/engine_thread.py``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import EngineConfig, SamplingParams
from . import calibrate
from .protocols import Runner
from .runners import decode_one_token, make_runner, prefill  # noqa: F401  (prefill, decode_one_token: API)
from .sequence import Finish, Sequence, TokenEvent


class PromptTooLong(ValueError):
    """The prompt does not fit the engine's limits or the model's context."""


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
def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature, then nucleus (top-p) sampling."""
    if params.greedy:
        # numpy's argmax on a CPU float32 row: 4 us here for 49152 logits, against 107 us for torch's,
        # which splits a reduction this small across threads. Both return the first maximum.
        if logits.dtype == torch.float32 and logits.device.type == "cpu":
            return int(logits.numpy().argmax())
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def off_thread(fn, *args):
    """Run one-off torch work (loading, converting weights) on a short-lived thread, and return its result.

    libgomp keeps the OpenMP workers of every thread that has run a parallel region for as long as that
    thread lives. Once they outnumber the cores it stops spinning between regions, and every decode step
    then pays for waking its workers: 1.7x slower steps on the engine thread, measured here, if the
    long-lived main thread had built the model. A thread that exits takes its workers with it.
    """
    result: list = []

    def work():
        try:
            result.append((True, fn(*args)))
        except BaseException as exc:  # re-raised on the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=work, name="labserver-load")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


class Engine:
    """A model, its tokenizer and the limits of ``config``; counts the generations in progress.

    ``model`` is a transformers model or a ``checkpoint.Checkpoint`` (what ``from_config`` loads when the
    lean runner serves the model); ``engine.model`` is the transformers model either way, loaded from the
    checkpoint on first use. A ready ``runner`` (``fake.FakeRunner``) replaces the one made for ``model``
    (then ``None``), and brings its ``context_len``.
    """

    def __init__(self, model, tokenizer, config: EngineConfig, runner: Runner | None = None):
        self.source, self.tokenizer, self.config = model, tokenizer, config
        self._model = None
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()
        self.running = 0
        self.tokens_generated = 0
        self.prompts_prefilled = 0  # since it was made: what /health reports, a cancelled wait adds none
        if runner is not None:  # e.g. fake.FakeRunner: no model behind it, its own context length
            self.runner, self.context_len = runner, runner.context_len
        else:
            self.context_len = int(getattr(model.config, "max_position_embeddings", 2048))
            self.runner: Runner = off_thread(make_runner, model, config, self.context_len)
        # The count chosen at the first start (or asked for) becomes the config every thread that runs the
        # model reads (the engine thread sets it on itself: the setting is per calling thread).
        self.runner.route = calibrate.settle_threads(self.runner.route, config)
        self.config = dataclasses.replace(config, threads=self.runner.route.threads)
        if runner is None:
            torch.set_num_threads(self.config.threads)

    @classmethod
    def from_config(cls, config: EngineConfig | None = None) -> "Engine":
        from .loading import load_for_serving

        config = config or EngineConfig.from_env()
        return cls(*off_thread(load_for_serving, config), config)

    @property
    def route(self) -> dict:
        """Which weight format runs and why: ``{"quant", "why", "measured_ms", "excluded"}`` (calibrate.Route)."""
        return self.runner.route.to_dict()

    @property
    def model(self):
        """The transformers model (for reference loops and oracles); from a checkpoint, loaded now."""
        if self._model is None:
            hf_model = getattr(self.source, "hf_model", None)
            self._model = off_thread(hf_model) if hf_model else self.source
        return self._model

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.source, "generation_config", None), "eos_token_id", None)
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

    # -- the phases ----------------------------------------------------------------------------------
    def begin(self, prompt: str | list[int], params: SamplingParams,
              cancel: threading.Event | None = None) -> Sequence:
        """Encode ``prompt`` into a new sequence; a ``PromptTooLong`` is raised here, before any work."""
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
        max_tokens = min(params.max_tokens, self.context_len - len(ids))
        return Sequence(ids, params, cancel or threading.Event(), self.tokenizer, self.eos_ids, max_tokens)

    def prefill_step(self, seq: Sequence) -> TokenEvent | None:
        """Run the prompt, sample the first token; its ``step_ms`` is also the ``prefill_time_ms``.

        From here until ``end(seq)`` the sequence counts as running and holds its cache.
        """
        return self.prefill_steps([seq])[0]

    def prefill_steps(self, seqs: list[Sequence]) -> list[TokenEvent | None]:
        """``prefill_step`` for several prompts in one forward (the runner's ``prefill_many``); each event's
        ``prefill_time_ms`` is that forward's time and, for more than one prompt, ``batch`` says how many
        shared it."""
        start = time.perf_counter()
        for seq in seqs:
            with self._lock:
                self.running += 1
                self.prompts_prefilled += 1
            seq.running, seq.start = True, start
        logits = self.runner.prefill(seqs[0])[None] if len(seqs) == 1 else self.runner.prefill_many(seqs)
        ids = [sample_token(row, s.params, s.generator) for row, s in zip(logits, seqs)]
        elapsed, batch = (time.perf_counter() - start) * 1000, len(seqs) if len(seqs) > 1 else None
        return [self._append(s, i, elapsed, batch) for s, i in zip(seqs, ids)]

    def decode_step(self, seqs: list[Sequence], batched: bool = False) -> list[TokenEvent | None]:
        """One forward for every sequence in ``seqs``; each event's ``step_ms`` is that forward's time.

        ``batched`` (the batched policy's steps) adds to each event how many sequences shared the step.
        """
        t0 = time.perf_counter()
        logits = self.runner.decode(seqs)  # [B, V]
        ids = [sample_token(row, s.params, s.generator) for row, s in zip(logits, seqs)]
        elapsed, batch = (time.perf_counter() - t0) * 1000, len(seqs) if batched else None
        return [self._append(s, i, elapsed, batch) for s, i in zip(seqs, ids)]

    def end(self, seq: Sequence) -> Finish:
        """Free the sequence's cache and stop counting it (once, whatever calls it); return its ``Finish``."""
        if seq.running:
            seq.running = False
            self.runner.release(seq)
            with self._lock:
                self.running -= 1
        return seq.finish()

    def _append(self, seq: Sequence, token_id: int, elapsed_ms: float, batch: int | None):
        with self._lock:
            self.tokens_generated += 1
        return seq.append(token_id, elapsed_ms, batch)

    # -- one sequence as a generator -----------------------------------------------------------------
    def generate_stream(
        self, prompt: str | list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent | Finish]:
        """Yield a ``TokenEvent`` per generated token, then one ``Finish``.

        The prompt is encoded now, so a ``PromptTooLong`` is raised before any generator exists.
        ``cancel`` is checked between steps: once set, the generator finishes with "cancelled".
        """
        return self._stream(self.begin(prompt, params, cancel))

    def _stream(self, seq: Sequence):
        try:
            event = self.prefill_step(seq)
            while True:
                if event is not None:
                    yield event
                if seq.finished or seq.cancel.is_set():
                    break
                event = self.decode_step([seq])[0]
            yield self.end(seq)
        finally:
            self.end(seq)  # a closed or failed generator frees its cache slot now

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
