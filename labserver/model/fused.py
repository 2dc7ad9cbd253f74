"""The lean llama's whole decode step (and its prefill) as one call into the C kernels.

``FusedDecode`` reads a model only through ``LeanLlama``'s public parts (its layers' matrices and norms,
the output matrix, the embeddings, the rotary tables, the cache and the sizes); it does not import it.
Left out: models whose matrices are not all in GGUF blocks of one route (``usable`` says no and the lean
model keeps its torch path).
"""

from __future__ import annotations

import torch

from .blocks import Q4_1, Q8_0
from .kernels import library, pointers

LAYER = ("ln1", "qkv", "o", "ln2", "gate_up", "down")  # kernels.c's order of a layer's parts
MATRICES = ("qkv", "o", "gate_up", "down")


class FusedDecode:
    """``LeanLlama.decode_step`` in one C call; ``usable(lean)`` says whether ``lean`` qualifies."""

    @staticmethod
    def usable(lean) -> bool:
        matrices = [p[name] for p in lean.layers for name in MATRICES]
        return (library() is not None and isinstance(lean.lm_head, Q8_0)
                and all(isinstance(m, Q4_1) for m in matrices)
                and len({m.format for m in matrices}) == 1)  # one route for every layer

    def __init__(self, lean):
        self.lean, self.lib = lean, library()
        tensors = []
        for p in lean.layers:
            for name in LAYER:  # a norm is one tensor, a matrix its blocks (and panels)
                tensors += p[name].kernel_parts if name in MATRICES else [p[name]]
        tensors += [lean.norm, *lean.lm_head.kernel_parts]
        # The C side holds raw pointers into these (None: a matrix without panels).
        self._keep = [None if t is None else t.contiguous() for t in tensors]
        self.pointers = pointers(self._keep)
        self.w4a8 = lean.layers[0]["qkv"].format == "w4a8"

    def __call__(self, tokens, pos, slots, t, out_rows=None):
        """Logits ``[B, V]``, or of the rows ``out_rows`` only (a prefill: each prompt's last row)."""
        lean, (layers, n_slots, kv_heads, length, head_dim) = self.lean, self.lean.cache.k.shape
        b = tokens.shape[0]
        x = lean.embed[tokens].contiguous()  # [B, D], becomes the residual stream
        pos, slots = pos.to(torch.long).contiguous(), slots.to(torch.long).contiguous()
        dims = torch.tensor([layers, x.shape[1], lean.heads, kv_heads, head_dim, lean.intermediate, lean.vocab,
                             b, n_slots, length, 0 if out_rows is None else len(out_rows), int(self.w4a8)],
                            dtype=torch.long)
        rows = None if out_rows is None else torch.as_tensor(out_rows, dtype=torch.long).contiguous()
        logits = torch.empty(b if rows is None else len(rows), lean.vocab)
        self.lib.llama_decode(self.pointers, dims.data_ptr(), lean.eps, x.data_ptr(), pos.data_ptr(),
                              slots.data_ptr(), lean.cos.data_ptr(), lean.sin.data_ptr(),
                              lean.cache.k.data_ptr(), lean.cache.v.data_ptr(),
                              None if rows is None else rows.data_ptr(), logits.data_ptr())
        return logits
