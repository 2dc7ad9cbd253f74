"""Model runners: the forward passes behind the engine, one call for any mix of sequences' new tokens.

Every runner has one small interface: ``forward(entries) -> logits [len(entries), V]``, where an entry
``(seq, start, n, table)`` feeds ``seq.tokens[start:start + n]`` (a decode step's one token, a prompt, or
a chunk of one) through the sequence's KV block table; ``release(seq)``; ``free_slots``; and
``kv_layout``, the ``(num_blocks, block_size)`` of its paged KV pool (None: no pool), with
``copy_rows(src, dst, rows)`` when it has one (a cached prefix that ends inside a block).

- ``TransformersRunner`` calls the transformers model with a ``DynamicCache`` per sequence. It runs any
  causal LM; a "batch" is a loop of single-sequence steps, and it has no pool (no prefix caching).
- ``LeanRunner`` drives ``model.llama.LeanLlama``: a paged KV pool and one forward for the whole batch,
  its matrices in one format of ``model.formats`` (``--quant``; "auto" measured by ``calibrate``).

``make_runner`` picks one from ``EngineConfig.impl`` ("auto" = lean for the llama family it supports).
Each runner has ``route``: the weight format that runs and why.
Left out: sampling (``engine.sample_token``), stopping rules (``sequence.py``), any threading, and which
blocks a sequence holds (``kv_cache.KVCacheManager``, the engine's).
"""

from __future__ import annotations

import sys

import torch

from ..config import EngineConfig, kv_cache_bytes
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


class LeanRunner:
    """One ``LeanLlama`` on a paged KV pool sized by ``config.kv_cache_memory``; which blocks a sequence
    holds is the engine's (``kv_cache.KVCacheManager``, from ``kv_layout``), the runner only feeds tokens
    through the tables it is given.

    ``route`` says which weight format runs and why (``calibrate.Route``); for ``--quant auto`` it is the
    fastest one measured here among those that keep float32's tokens.
    """

    def __init__(self, model, config: EngineConfig, max_len: int):
        def build(quant: str) -> LeanLlama:
            fmt = formats.get(quant)
            blocks_file = store_path(config.cache_dir, model) if fmt.blocks else None
            return LeanLlama(model, dtype=formats.activation_dtype(quant, config.dtype), quant=quant,
                             max_len=max_len, blocks_file=blocks_file, block_size=config.block_size)

        self.route, lean = calibrate.choose(model, config, build)
        self.lean = lean or build(self.route.quant)  # auto's winner was built with a pool for its trial
        per_token = self.lean.cache.bytes_per_token
        pool = kv_cache_bytes(config.kv_cache_memory, per_token, want_tokens=config.max_batch * max_len)
        # Blocks no sequence writes cost no memory (cache.py): the pool's size is a ceiling, not a cost.
        self.lean.new_cache(max(1, pool // self.lean.cache.bytes_per_block), config.block_size)
        self.kv_layout = (self.lean.cache.num_blocks, config.block_size)
        self.max_batch, self.active = config.max_batch, 0
        # Named after the formats the matrices ended in: q4_1 keeps a matrix it cannot reproduce in fp16.
        fmt = formats.get(self.route.quant)
        self.name = "lean-" + ("+".join(self.lean.formats()) if fmt.blocks else
                               config.dtype if fmt.name == "none" else fmt.name)
        gib = self.lean.cache.num_blocks * self.lean.cache.bytes_per_block / 2**30
        print(f"labserver: weights {self.route.quant} ({self.name}, {kernels.path() or 'no'} kernels): {self.route.why}"
              f"; {self.route.threads_why}; KV pool {gib:.2f} GiB at most "
              f"({self.lean.cache.num_blocks * config.block_size} tokens)", file=sys.stderr, flush=True)

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.active

    def forward(self, entries) -> torch.Tensor:
        """For each ``(seq, start, n, table)``: feed ``seq.tokens[start:start + n]`` through its block table;
        the logits after each one's last token ``[len(entries), V]``."""
        for seq, *_ in entries:
            if seq.state is None:
                seq.state, self.active = "blocks", self.active + 1
        return self.lean.forward([(seq.tokens[start:start + n], start, table) for seq, start, n, table in entries])

    def release(self, seq) -> None:
        if seq.state is not None:
            seq.state, self.active = None, self.active - 1

    def copy_rows(self, src: int, dst: int, rows: int) -> None:
        """K/V of block ``src``'s first ``rows`` positions into block ``dst`` (``KVCacheManager.allocate``)."""
        self.lean.cache.copy_rows(src, dst, rows)


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
