"""The engine: a causal LM behind small named phases that emit token ids.

The phases follow gpt-fast: ``prefill_step`` runs a prompt through the model and samples its first token,
``decode_step`` feeds back the last token of one or more sequences in one forward, ``sample_token``
picks each next id. ``Engine.steps`` strings them together for one sequence and yields a ``TokenOutput``
per token (its id and the measured ``step_ms``, no text) and a final ``Finish``; ``generate_stream`` adds
the text through the output processor (``output.py``), for the lab's variants and for scripts. The
server's engine core (``core.py``) calls the same phases itself, for one sequence or many at once.

The forward passes live in ``runners.py`` (the lean llama, or transformers for any other model); each
enters ``torch.inference_mode`` itself, because grad mode is thread-local and a generator resumed on
another thread (the first streaming version's ``run_in_executor(next)`` pattern) would otherwise run later
steps with autograd on.

Left out on purpose: stop strings, repetition penalties, and any threading: whoever calls a phase runs
the model on its own thread (see ``core.py``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import closing
from typing import Iterator

import torch

from ..config import EngineConfig, SamplingParams
from .kv_cache import KVCacheManager
from .output import OutputProcessor
from . import calibrate
from .prompts import PromptEncoder
from .protocols import Runner
from .loading import off_thread
from .runners import make_runner
from .sequence import Completion, Finish, Sequence, TokenEvent, TokenOutput, collect, max_new_tokens


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


class Engine(PromptEncoder):
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
        self.preemptions = 0
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
        # The KV blocks are the engine's to hand out; a runner without a paged cache (transformers) has none.
        layout = getattr(self.runner, "kv_layout", None)
        self.kv = None if layout is None else KVCacheManager(*layout, prefix_caching=config.prefix_caching)
        if self.kv is not None:  # one request never needs more than the whole pool
            self.context_len = min(self.context_len, self.kv.num_blocks * self.kv.block_size)

    @classmethod
    def from_config(cls, config: EngineConfig | None = None) -> "Engine":
        from .loading import load_for_serving  # transformers and friends only for those who load a model

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

    # -- the phases ----------------------------------------------------------------------------------
    def begin(self, prompt: str | list[int], params: SamplingParams,
              cancel: threading.Event | None = None) -> Sequence:
        """Encode ``prompt`` into a new sequence; a ``PromptTooLong`` is raised here, before any work."""
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
        return Sequence(ids, params, cancel or threading.Event(), self.eos_ids,
                        max_new_tokens(params.max_tokens, self.context_len, len(ids)))

    def kv_report(self) -> dict | None:
        """The KV cache as ``/health`` and ``/metrics`` show it (vLLM's names); None without a paged pool."""
        kv = self.kv
        if kv is None:
            return None
        return {"kv_cache_usage_perc": round(100 * kv.usage, 2), "blocks_used": kv.num_used_blocks,
                "blocks_free": kv.num_free_blocks, "block_size": kv.block_size,
                "prefix_caching": kv.prefix_caching, "prefix_cache_queries": kv.stats.queries,
                "prefix_cache_hits": kv.stats.hits, "preemptions": self.preemptions}

    def admit(self, seq: Sequence) -> bool:
        """Give ``seq`` KV memory for all it must feed (its prompt; after a preemption, everything so far),
        taking what the prefix cache already holds; False, with nothing changed, when the free blocks cannot.

        From here until ``end(seq)`` (or ``preempt(seq)``) the sequence counts as running.
        """
        if self.kv is not None:
            cached = self.kv.allocate(seq, seq.tokens, copy=getattr(self.runner, "copy_rows", None))
            if cached is None:
                return False
            seq.computed = cached
            seq.cached = seq.cached if seq.admitted else cached
        with self._lock:
            self.running += 1
            self.prompts_prefilled += not seq.admitted
        if not seq.admitted:
            seq.start = time.perf_counter()  # its timings count from here, not from its wait
        seq.running, seq.admitted = True, True
        return True

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Make room for ``n`` more tokens of a running sequence (a decode step crossing into a new block);
        False when no block is free (the scheduler then preempts someone)."""
        return self.kv is None or self.kv.grow(seq, seq.computed + n)

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence's KV memory back; it waits, and is computed again when admitted (its
        full blocks stay in the prefix cache until someone needs them: vLLM's recompute preemption)."""
        if seq.running:
            self._release(seq)
            seq.computed = 0
            self.preemptions += 1

    def forward(self, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward that feeds ``n`` tokens of each sequence (``tokens[computed:computed + n]``): decode
        steps, prompts, chunks of prompts, or a mix; the logits after each one's last token ``[len(work), V]``.
        No sampling: ``step`` samples; a benchmark or a teacher-forced check appends its own tokens."""
        return self._forward(work)[0]

    def _forward(self, work: list[tuple[Sequence, int]]):
        """``forward``, and the work as fed: a sequence admitted here feeds only what its cached prefix left."""
        fresh = [seq for seq, _ in work if not seq.running]
        for seq in fresh:  # the phases' own callers (a script, the lab) admit here; the scheduler did already
            if not self.admit(seq):
                raise MemoryError("no KV memory for a new sequence: the scheduler must wait or preempt")
        # What the prefix cache held for a sequence admitted just now is not fed again.
        work = [(seq, min(n, seq.remaining) if seq in fresh else n) for seq, n in work]
        for seq, n in work:
            if not self.reserve(seq, n):
                raise MemoryError(f"no KV memory for {n} more tokens of a sequence: the scheduler must preempt")
        logits = self.runner.forward([(seq, seq.computed, n, self.kv.table(seq) if self.kv else None)
                                      for seq, n in work])
        for seq, n in work:
            seq.computed += n
            if self.kv is not None:
                self.kv.commit(seq, seq.tokens, seq.computed)
        return logits, work

    def step(self, work: list[tuple[Sequence, int]], batched: bool = False) -> list[TokenOutput | None]:
        """``forward``, then each sequence fed to its end samples its next token: its output, whose
        ``step_ms`` is this forward's time (for the first token, every chunk's); one fed a chunk gives None.
        ``batched``: each output says how many sequences shared the forward."""
        t0 = time.perf_counter()
        logits, work = self._forward(work)
        elapsed = (time.perf_counter() - t0) * 1000
        batch, outs = len(work) if batched else None, []
        for (seq, n), row in zip(work, logits):
            if seq.remaining:  # a chunk: the prompt goes on in a later forward
                seq.prefill_ms += elapsed
                outs.append(None)
                continue
            ms = seq.prefill_ms + elapsed if not seq.step_ms else elapsed
            outs.append(self._append(seq, sample_token(row, seq.params, seq.generator), ms, batch))
        return outs

    def prefill_step(self, seq: Sequence) -> TokenOutput | None:
        """Run the prompt, sample the first token; its ``step_ms`` is also the ``prefill_time_ms``."""
        return self.prefill_steps([seq])[0]

    def prefill_steps(self, seqs: list[Sequence]) -> list[TokenOutput | None]:
        """Several whole prompts in one forward; for more than one, ``batch`` says how many shared it."""
        return self.step([(seq, seq.remaining) for seq in seqs], batched=len(seqs) > 1)

    def decode_step(self, seqs: list[Sequence], batched: bool = False) -> list[TokenOutput | None]:
        """One forward for every sequence in ``seqs``, one token each; ``batched`` (the batched policy's
        steps) adds to each output how many sequences shared the step."""
        return self.step([(seq, 1) for seq in seqs], batched)

    def end(self, seq: Sequence) -> Finish:
        """Free the sequence's KV memory and stop counting it (once, whatever calls it); its ``Finish``."""
        if seq.running:
            self._release(seq)
        return seq.finish()

    def _release(self, seq: Sequence) -> None:
        seq.running = False
        if self.kv is not None:
            self.kv.free(seq)
        self.runner.release(seq)
        with self._lock:
            self.running -= 1

    def _append(self, seq: Sequence, token_id: int, elapsed_ms: float, batch: int | None):
        with self._lock:
            self.tokens_generated += 1
        return seq.append(token_id, elapsed_ms, batch)

    # -- one sequence as a generator -----------------------------------------------------------------
    def steps(self, prompt: str | list[int], params: SamplingParams,
              cancel: threading.Event | None = None) -> Iterator[TokenOutput | Finish]:
        """Yield the engine's ``TokenOutput`` per generated token (ids, no text), then one ``Finish``.

        The prompt is encoded now, so a ``PromptTooLong`` is raised before any generator exists.
        ``cancel`` is checked between steps: once set, the generator finishes with "cancelled".
        """
        return self._steps(self.begin(prompt, params, cancel))

    def _steps(self, seq: Sequence):
        try:
            out = self.prefill_step(seq)
            while True:
                if out is not None:
                    yield out
                if seq.finished or seq.cancel.is_set():
                    break
                out = self.decode_step([seq])[0]
            yield self.end(seq)
        finally:
            self.end(seq)  # a closed or failed generator frees its cache now

    def generate_stream(self, prompt: str | list[int], params: SamplingParams,
                        cancel: threading.Event | None = None) -> Iterator[TokenEvent | Finish]:
        """``steps`` with text: a ``TokenEvent`` per token (the output processor's), then one ``Finish``."""
        seq = self.begin(prompt, params, cancel)  # encodes now: PromptTooLong before any generator
        return self._with_text(self._steps(seq), OutputProcessor(self.tokenizer, seq.max_tokens))

    @staticmethod
    def _with_text(outputs, processor: OutputProcessor):
        with closing(outputs):
            for item in outputs:
                yield from processor.add(item)

    def generate(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        """Run ``generate_stream`` to the end and collect it."""
        return collect(self.generate_stream(prompt, params))
