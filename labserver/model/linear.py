"""Weight matrices in torch's formats: ``self(x)`` is ``x @ W.T``, each format its own kernel.

Dense float32 or bfloat16, and weight-only float16 (fbgemm) with float32 activations. (torch's weight-only
int8 and int4 kernels were routes once; they changed the tokens and no measurement showed them ahead of
the exact GGUF blocks.) Left out: GGUF blocks and their C kernels (``blocks.py``), and which
format a model gets (``formats.py``).
"""

from __future__ import annotations

import torch


class Linear:
    """A weight matrix in one storage format: ``self(x)`` is ``x @ W.T``, ``add(r, x)`` is ``r + x @ W.T``."""

    nbytes = 0  # what one matmul reads

    def __call__(self, x):
        raise NotImplementedError

    def add(self, r, x):
        return r.add_(self(x).to(r.dtype))


class Dense(Linear):
    """``x @ W.T``, with ``W.T`` stored contiguous: MKL's single-row matmul reads it faster (measured)."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        self.wt = w.detach().to(dtype).t().contiguous()  # [in, out]
        self.nbytes = self.wt.numel() * self.wt.element_size()

    def __call__(self, x):
        return x @ self.wt

    def add(self, r, x):
        # One addmm instead of a matmul and an add (float32 only: the residual stream stays float32).
        return torch.addmm(r, x, self.wt) if x.dtype == r.dtype else r.add_((x @ self.wt).to(r.dtype))


class Fp16(Linear):
    """Weight-only float16 through fbgemm: half the bytes of float32, float32 activations in and out.

    The default model's weights come from 4-bit blocks with float16 scales, so they lose almost nothing
    in float16 (``make bench`` shows the greedy agreement with float32). 8-row steps gain the most:
    float32 matmuls with a few rows are compute-bound on this class of CPU, fbgemm's float16 ones are not.
    """

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        w = w.detach().float().contiguous()
        self.packed = torch.ops.quantized.linear_prepack_fp16(w)
        self.nbytes = w.numel() * 2

    def __call__(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Projections that share an input, stacked into one matrix (one matmul for q, k and v)."""
    return torch.cat(parts) if len(parts) > 1 else parts[0]
