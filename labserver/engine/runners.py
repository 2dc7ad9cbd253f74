"""Model runners: the forward passes behind the engine, for one sequence or a batch of them.

Two runners share one small interface (``prefill(seq) -> logits [V]``, ``decode(seqs) -> logits [B, V]``,
``release(seq)``, ``free_slots``):

- ``TransformersRunner`` calls the transformers model with a ``DynamicCache`` per sequence. It runs any
  causal LM; a "batch" is a loop of single-sequence steps (different lengths do not share a forward).
- ``LeanRunner`` drives ``lean_llama.LeanLlama``: a preallocated slot cache and one forward for the whole
  batch, in float32 (equal to transformers), bfloat16, or weight-only float16 / int8 / int4.

``make_runner`` picks one from ``EngineConfig.impl`` ("auto" = lean for the llama family it supports),
and the lean runner's weight format from ``EngineConfig.weight_format``.
Left out: sampling (``engine.sample_token``), stopping rules (``sequence.py``) and any threading.
"""

from __future__ import annotations

import torch

from ..config import EngineConfig


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
    """One ``LeanLlama`` with ``max_batch`` cache slots; a sequence holds a slot from prefill to release."""

    def __init__(self, model, config: EngineConfig, max_len: int):
        from ..model.llama import LeanLlama

        fmt = config.weight_format(lean=True)
        if fmt == "q4_1" and config.quant == "auto":
            from ..model.kernels import available

            fmt = "q4_1" if available()[0] else "fp16"  # no C compiler here: the next fastest format
        quant = None if fmt == "none" else fmt
        # The int8/int4 kernels want bfloat16 activations, the others float32 ones; dense keeps the dtype.
        dtype = {"int8": torch.bfloat16, "int4": torch.bfloat16}.get(quant) \
            or (torch.float32 if quant else getattr(torch, config.dtype))
        blocks_file = None
        if quant in ("q4_1", "w4a8"):
            from ..model.blocks import store_path

            blocks_file = store_path(config.cache_dir, model)
        self.lean = LeanLlama(model, dtype=dtype, quant=quant, max_batch=config.max_batch, max_len=max_len,
                              blocks_file=blocks_file)
        # Named after the formats the matrices ended in: q4_1 keeps a matrix it cannot reproduce in fp16.
        self.name = f"lean-{'+'.join(self.lean.formats()) if quant in ('q4_1', 'w4a8') else quant or config.dtype}"

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
    from ..model.llama import supports

    if config.impl == "transformers" or not supports(model):
        if config.impl == "lean" or config.weight_format(lean=False) != "none":
            raise ValueError(f"impl='lean' and quant={config.quant!r} need a llama-family model and the lean "
                             f"runner; this is {model.config.model_type!r} with impl={config.impl!r}")
        return TransformersRunner(model.hf_model() if hasattr(model, "hf_model") else model)
    # Slots hold the longest request the limits allow; untouched cache pages cost no memory.
    return LeanRunner(model, config, min(context_len, config.max_prompt_tokens + config.max_tokens_limit))
