"""Weight matrices in torch's formats: ``self(x)`` is ``x @ W.T``, each format its own kernel.

Dense float32 or bfloat16, weight-only float16 (fbgemm) with float32 activations, weight-only int8 and
int4 with bfloat16 activations. Left out: GGUF blocks and their C kernels (``blocks.py``), and which
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


class Int8(Linear):
    """Weight-only int8: one scale per output row, ``W ~ q * scale``; activations stay bfloat16."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        w = w.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # [out]
        self.q = torch.round(w / scale[:, None]).to(torch.int8)  # [out, in]
        self.scale = scale.to(dtype)
        self.nbytes = self.q.numel() + self.scale.numel() * self.scale.element_size()

    def __call__(self, x):
        return torch._weight_int8pack_mm(x, self.q, self.scale)


class Int4(Linear):
    """Weight-only int4 in groups of 32 inputs, ``W ~ q * scale + min`` with q in 0..15.

    That is the GGUF Q4_1 layout the default model ships in, so its weights round-trip almost exactly.
    """

    GROUP = 32

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        out_f, in_f = w.shape
        g = w.detach().float().view(out_f, in_f // self.GROUP, self.GROUP)  # [out, in/32, 32]
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out_f, in_f), 2)
        # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale.  [in/32, out, 2]
        self.scale_zero = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(dtype)
        self.nbytes = out_f * in_f // 2 + self.scale_zero.numel() * self.scale_zero.element_size()

    def __call__(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.GROUP, self.scale_zero)


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Projections that share an input, stacked into one matrix (one matmul for q, k and v)."""
    return torch.cat(parts) if len(parts) > 1 else parts[0]
