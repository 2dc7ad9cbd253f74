"""Model runners: the forward passes behind the engine, for one sequence or a batch of them.

Two runners share one small interface (``prefill(seq) -> logits [V]``, ``decode(seqs) -> logits [B, V]``,
``release(seq)``, ``free_slots``):

- ``TransformersRunner`` calls the transformers model with a ``DynamicCache`` per sequence. It runs any
  causal LM; a "batch" is a loop of single-sequence steps (different lengths do not share a forward).
- ``LeanRunner`` drives ``model.llama.LeanLlama``: a preallocated slot cache and one forward for the whole
  batch, its matrices in one format of ``model.formats`` (``--quant``; "auto" measured by ``calibrate``).

``make_runner`` picks one from ``EngineConfig.impl`` ("auto" = lean for the llama family it supports).
Each runner has ``route``: the weight format that runs and why.
Left out: sampling (``engine.sample_token``), stopping rules (``sequence.py``) and any threading.
"""

from __future__ import annotations

import sys

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
    name = "transformers"
    route = Route("none", "transformers runner")
    free_slots = float("inf")  # each sequence brings its own growing cache

    def __init__(self, model):
        self.model = model

    def prefill(self, seq) -> torch.Tensor:
        from transformers import DynamicCache

        seq.state = DynamicCache(config=self.model.config)
        return prefill(self.model, torch.tensor([seq.ids]), seq.state)

    def prefill_many(self, seqs) -> torch.Tensor:
        return torch.stack([self.prefill(s) for s in seqs])

    def decode(self, seqs) -> torch.Tensor:
        return torch.stack([decode_one_token(self.model, s.last_token, s.state) for s in seqs])

    def release(self, seq) -> None:
        seq.state = None


class LeanRunner:
    """One ``LeanLlama`` with ``max_batch`` cache slots; a sequence holds a slot from prefill to release.

    ``route`` says which weight format runs and why (``calibrate.Route``); for ``--quant auto`` it is the
    fastest one measured here among those that keep float32's tokens.
    """

    def __init__(self, model, config: EngineConfig, max_len: int):
        def build(quant: str, max_batch: int = 1) -> LeanLlama:
            fmt = formats.get(quant)
            blocks_file = store_path(config.cache_dir, model) if fmt.blocks else None
            return LeanLlama(model, dtype=formats.activation_dtype(quant, config.dtype), quant=quant,
                             max_batch=max_batch, max_len=max_len, blocks_file=blocks_file)

        self.route, lean = calibrate.choose(model, config, build)
        if lean is None:
            lean = build(self.route.quant, config.max_batch)
        else:  # auto's winner, built with one slot for its trial
            lean.new_cache(config.max_batch)
        self.lean = lean
        # Named after the formats the matrices ended in: q4_1 keeps a matrix it cannot reproduce in fp16.
        fmt = formats.get(self.route.quant)
        self.name = "lean-" + ("+".join(lean.formats()) if fmt.blocks else
                               config.dtype if fmt.name == "none" else fmt.name)
        print(f"labserver: weights {self.route.quant} ({self.name}, {kernels.path() or 'no'} kernels): {self.route.why}"
              f"; {self.route.threads_why}", file=sys.stderr, flush=True)

    @property
    def free_slots(self) -> int:
        return len(self.lean.cache.free)

    def prefill(self, seq) -> torch.Tensor:
        seq.state = self.lean.cache.allocate()
        return self.lean.prefill(seq.ids, seq.state)

    def prefill_many(self, seqs) -> torch.Tensor:
        for seq in seqs:
            seq.state = self.lean.cache.allocate()
        return self.lean.prefill_many([s.ids for s in seqs], [s.state for s in seqs])

    def decode(self, seqs) -> torch.Tensor:
        # In slot order, so a block of slots is read as a view; rows go back in the caller's order.
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].state)
        logits = self.lean.decode([seqs[i].last_token for i in order], [seqs[i].state for i in order])
        return logits[torch.tensor(order).argsort()] if order != sorted(order) else logits

    def release(self, seq) -> None:
        if seq.state is not None:
            self.lean.cache.release(seq.state)
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
    # Slots hold the longest request the limits allow; untouched cache pages cost no memory.
    return LeanRunner(model, config, min(context_len, config.max_prompt_tokens + config.max_tokens_limit))
