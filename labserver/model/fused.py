"""The lean llama's whole forward (decode steps, prompts, chunks of prompts) as one call into the C kernels.

``FusedDecode`` reads a model only through ``LeanLlama``'s public parts (its layers' matrices and norms,
the output matrix, the embeddings, the rotary tables, the paged cache and the sizes); it does not import it.
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
    """Rows of ``LeanLlama.forward`` in one C call; ``usable(lean)`` says whether ``lean`` qualifies."""

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

    def __call__(self, tokens, pos, seqs, tables, out_rows):
        """Logits ``[len(out_rows), V]`` of the rows ``out_rows``: row b is token ``tokens[b]`` at position
        ``pos[b]`` of the sequence whose block table is ``tables[seqs[b]]`` (``tables [n, widest]``)."""
        lean, cache = self.lean, self.lean.cache
        _, layers, kv_heads, block_size, head_dim = cache.k.shape
        x = lean.embed[tokens].contiguous()  # [B, D], becomes the residual stream
        pos, seqs = pos.to(torch.long).contiguous(), seqs.to(torch.long).contiguous()
        tables, wanted = tables.to(torch.long).contiguous(), torch.as_tensor(out_rows, dtype=torch.long)
        rows = torch.zeros(max(1, len(wanted)), dtype=torch.long)  # never NULL: that would mean every row
        rows[:len(wanted)] = wanted
        dims = torch.tensor([layers, x.shape[1], lean.heads, kv_heads, head_dim, lean.intermediate, lean.vocab,
                             x.shape[0], block_size, tables.shape[1], len(wanted), int(self.w4a8), layers],
                            dtype=torch.long)
        logits = torch.empty(len(wanted), lean.vocab)
        self.lib.llama_decode(self.pointers, dims.data_ptr(), lean.eps, x.data_ptr(), pos.data_ptr(),
                              seqs.data_ptr(), tables.data_ptr(), lean.cos.data_ptr(), lean.sin.data_ptr(),
                              cache.k.data_ptr(), cache.v.data_ptr(), rows.data_ptr(), logits.data_ptr())
        return logits
