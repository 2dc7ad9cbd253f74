"""Model runners: the forward passes behind the engine, for one sequence or a batch of them.

Two runners share one small interface (``prefill(seq) -> logits [V]``, ``decode(seqs) -> logits [B, V]``,
``release(seq)``, ``free_slots``):

- ``TransformersRunner`` calls the transformers model with a ``DynamicCache`` per sequence. It runs any
  causal LM; a "batch" is a loop of single-sequence steps (different lengths do not share a forward).
- ``LeanRunner`` drives ``model.llama.LeanLlama``: a paged KV cache and one forward for the whole batch,
  its matrices in one format of ``model.formats`` (``--quant``; "auto" measured by ``calibrate``). A
  sequence takes blocks of the pool as it grows (``Blocks``, its ``seq.state``) and gives them back.

``make_runner`` picks one from ``EngineConfig.impl`` ("auto" = lean for the llama family it supports).
Each runner has ``route``: the weight format that runs and why.
Left out: sampling (``engine.sample_token``), stopping rules (``sequence.py``), any threading, and a block
manager: the lean runner's free list never shares a block (no prefix caching), and its pool holds
``max_batch`` sequences of the longest length allowed, so a running sequence never waits for a block.
"""

from __future__ import annotations

import heapq
import sys
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig
from ..model import formats, kernels
from ..model.blocks import store_path
from ..model.llama import LeanLlama, supports
from . import calibrate
from .calibrate import Route


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


class TransformersRunner:
    """Any causal LM through transformers, a ``DynamicCache`` per sequence: no KV blocks of the engine's
    (``kv_layout`` is None: no prefix cache), and a "batch" is a loop of single-sequence forwards."""

    name = "transformers"
    route = Route("none", "transformers runner")
    free_slots = float("inf")  # each sequence brings its own growing cache
    kv_layout = None

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def forward(self, entries) -> torch.Tensor:
        """For each ``(seq, start, n, table)``: feed ``seq.tokens[start:start + n]`` against its cache;
        the logits after each one's last token ``[len(entries), V]``."""
        from transformers import DynamicCache

        rows = []
        for seq, start, n, _ in entries:
            if start == 0 or seq.state is None:
                seq.state = DynamicCache(config=self.model.config)
            out = self.model(input_ids=torch.tensor([seq.tokens[start:start + n]]), cache=seq.state,
                             use_cache=True, logits_to_keep=1)
            rows.append(out.logits[0, -1])
        return torch.stack(rows)

    def release(self, seq) -> None:
        seq.state = None


@dataclass
class Blocks:
    """A sequence's share of the pool (its ``seq.state`` on the lean runner): its block table, and how many
    positions its blocks hold."""

    table: list[int] = field(default_factory=list)
    tokens: int = 0


class LeanRunner:
    """One ``LeanLlama`` whose paged cache holds ``max_batch`` sequences of ``max_len`` tokens; a sequence
    holds its blocks from prefill to release, taking one more each time it fills the last.

    ``route`` says which weight format runs and why (``calibrate.Route``); for ``--quant auto`` it is the
    fastest one measured here among those that keep float32's tokens.
    """

    BLOCK_SIZE = 16  # positions per block

    def __init__(self, model, config: EngineConfig, max_len: int):
        def build(quant: str) -> LeanLlama:
            fmt = formats.get(quant)
            blocks_file = store_path(config.cache_dir, model) if fmt.blocks else None
            return LeanLlama(model, dtype=formats.activation_dtype(quant, config.dtype), quant=quant,
                             max_len=max_len, blocks_file=blocks_file, block_size=self.BLOCK_SIZE)

        self.route, lean = calibrate.choose(model, config, build)
        self.lean = lean or build(self.route.quant)  # auto's winner was built with a pool for its trial
        # Room for every sequence at its longest: blocks no sequence writes cost no memory (cache.py).
        self.max_batch, per_sequence = config.max_batch, -(-max_len // self.BLOCK_SIZE)
        self.lean.new_cache(self.max_batch * per_sequence, self.BLOCK_SIZE)
        self.free_blocks = list(range(self.lean.cache.num_blocks))  # a heap: the lowest ids go first
        self.sequences = 0  # holding blocks
        # Named after the formats the matrices ended in: q4_1 keeps a matrix it cannot reproduce in fp16.
        fmt = formats.get(self.route.quant)
        self.name = "lean-" + ("+".join(self.lean.formats()) if fmt.blocks else
                               config.dtype if fmt.name == "none" else fmt.name)
        print(f"labserver: weights {self.route.quant} ({self.name}, {kernels.path() or 'no'} kernels): {self.route.why}",
              file=sys.stderr, flush=True)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.sequences

    def _grow(self, seq, tokens: int) -> list[int]:
        """``seq``'s block table once it holds ``tokens`` positions (new blocks taken as needed)."""
        state = seq.state
        while len(state.table) * self.BLOCK_SIZE < tokens:
            state.table.append(heapq.heappop(self.free_blocks))
        return state.table

    def _admit(self, seqs) -> list[list[int]]:
        if len(seqs) > self.free_slots:
            raise RuntimeError(f"{self.sequences} of {self.max_batch} sequences hold the cache; "
                               f"no room for {len(seqs)} more")
        self.sequences += len(seqs)
        for seq in seqs:
            seq.state = Blocks()
        tables = [self._grow(seq, len(seq.ids)) for seq in seqs]
        for seq in seqs:
            seq.state.tokens = len(seq.ids)
        return tables

    def prefill(self, seq) -> torch.Tensor:
        return self.lean.prefill(seq.ids, self._admit([seq])[0])

    def prefill_many(self, seqs) -> torch.Tensor:
        return self.lean.prefill_many([s.ids for s in seqs], self._admit(seqs))

    def decode(self, seqs) -> torch.Tensor:
        positions = [s.state.tokens for s in seqs]
        if max(positions) >= self.lean.max_len:  # before taking a block the pool was not sized for
            raise ValueError(f"a sequence reached the cache's {self.lean.max_len} tokens")
        tables = [self._grow(s, p + 1) for s, p in zip(seqs, positions)]
        logits = self.lean.decode([s.last_token for s in seqs], positions, tables)
        for s in seqs:
            s.state.tokens += 1
        return logits

    def release(self, seq) -> None:
        if seq.state is not None:
            for block in seq.state.table:
                heapq.heappush(self.free_blocks, block)
            self.sequences -= 1
            seq.state = None


def make_runner(model, config: EngineConfig, context_len: int):
    """The runner ``config.impl`` asks for; "auto" takes the lean one whenever the model is supported."""
    if config.impl == "transformers" or not supports(model):
        if config.impl == "lean" or config.quant not in ("auto", "none"):
            raise ValueError(f"impl='lean' and quant={config.quant!r} need a llama-family model and the lean "
                             f"runner; this is {model.config.model_type!r} with impl={config.impl!r}")
        runner = TransformersRunner(model.hf_model() if hasattr(model, "hf_model") else model)
        why = "--impl transformers asked for" if config.impl == "transformers" else \
            f"transformers runner: the lean one does not implement {model.config.model_type!r}"
        runner.route = Route("none", why)
        return runner
    # The pool holds the longest requests the limits allow; blocks no sequence writes cost no memory.
    return LeanRunner(model, config, min(context_len, config.max_prompt_tokens + config.max_tokens_limit))
