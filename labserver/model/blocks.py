"""Block-quantized weights (GGUF's Q4_1 and Q8_0) with C kernels that keep activations in float32.

The default model ships as a GGUF whose layer matrices are Q4_1 and whose embedding (tied to the output
matrix) is Q8_0. Its float32 weights are those blocks dequantized, so quantizing them again gives the very
same blocks: the float32 model at a fifth of the bytes (112 MB with float32 scales, instead of 538), and,
with float32 activations, the same logits up to the order of a sum. torch has no kernel for that
pairing (its int4 kernel wants bfloat16 activations), so ``kernels.c`` has one (see ``kernels.py``).

``lossless(w, kind)`` gives a matrix in blocks only when it survives the round trip; ``formats.py`` keeps
any matrix that does not (or all of them, when no compiler is found) in float16.

``w4a8=True`` lays a Q4_1 matrix (and the Q8_0 output matrix, as "w8a8") out for ``w4a8.c`` instead: the
same weights times activations rounded to 8 bits, llama.cpp's arithmetic, faster and not exact.

Left out: block types other than these two, and a kernel for machines without a C compiler
(``kernels.available()`` says why).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .checkpoint import read_safetensors
from .kernels import available, library, pointers
from .linear import Linear

QK = 32  # weights per block
FORMAT = "q4_1+q8_0/1"  # the stored layout; a change of layout changes it, and so the file a store reads
RTOL = 4e-7  # a few float32 roundings of a row's largest weight: within it, the blocks are the weights


def quantize_q4_1(w: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int]:
    """``w [N, K]`` -> (nibbles ``[N, K/2]`` uint8, scales, minima ``[N, K/32]``), weights missed."""
    n, k = w.shape
    w = w.detach().float().contiguous()
    q, d, m = torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(n, k // QK), torch.empty(n, k // QK)
    missed = _lib().q4_1_quantize(w.data_ptr(), n, k, q.data_ptr(), d.data_ptr(), m.data_ptr(), RTOL)
    return (q, d, m), missed


def quantize_q8_0(w: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int]:
    """``w [N, K]`` -> (``[N, K]`` int8, scales ``[N, K/32]``; symmetric, absmax / 127), weights missed."""
    n, k = w.shape
    w = w.detach().float().contiguous()
    q, d = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // QK)
    return (q, d), _lib().q8_0_quantize(w.data_ptr(), n, k, q.data_ptr(), d.data_ptr(), RTOL)


def _lib():
    lib = library()
    if lib is None:
        raise RuntimeError(f"block-quantized kernels unavailable: {available()[1]}")
    return lib


def dequantize_q4_1(packed, d, m) -> torch.Tensor:
    n = packed.shape[0]
    blocks = packed.reshape(n, -1, QK // 2)
    q = torch.cat([blocks & 15, blocks >> 4], -1).float()  # [N, K/32, 32]
    return (q * d[..., None] + m[..., None]).reshape(n, -1)


def dequantize_q8_0(q, d) -> torch.Tensor:
    n = q.shape[0]
    return (q.reshape(n, -1, QK).float() * d[..., None]).reshape(n, -1)


class _Blocks(Linear):
    """A matrix in blocks, multiplied by the C kernel; ``nbytes`` counts the blocks and their scales (what
    a one-row product reads). ``kernel_parts``: the pointers the C side takes for this matrix."""

    def __init__(self, parts: tuple[torch.Tensor, ...], out_features: int):
        self.parts, self.out_features = parts, out_features
        self.nbytes = sum(t.numel() * t.element_size() for t in parts)
        self._lib = _lib()
        self.kernel_parts = parts

    def _run(self, x: torch.Tensor, y: torch.Tensor, add: int) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x):
        x = x.float().contiguous()
        return self._run(x, torch.empty(x.shape[0], self.out_features), 0)

    def add(self, r, x):  # r: the float32, contiguous residual stream
        return self._run(x.float().contiguous(), r, 1)


class Q4_1(_Blocks):
    """Also kept as panels (the same blocks in another order) when the rows divide into them: of 32 output
    rows for products of many rows with float32 activations (``kernels.c`` 1b: a prefill, a batch), or
    with ``w4a8`` of 16 rows for ``w4a8.c``, which then does every product of this matrix. ``format``:
    "w4a8" when it does, else "q4_1"."""

    def __init__(self, parts, out_features, w4a8: bool = False):
        super().__init__(parts, out_features)
        q, d, m = parts
        rows = 16 if w4a8 else 32
        self.format = "w4a8" if w4a8 and out_features % rows == 0 else "q4_1"
        panels = (None, None, None)
        if out_features % rows == 0:
            panels = torch.empty_like(q), torch.empty_like(d), torch.empty_like(m)
            repack = self._lib.w4a8_repack if w4a8 else self._lib.q4_1_repack
            repack(*(t.data_ptr() for t in parts), out_features, q.shape[1] * 2, *(t.data_ptr() for t in panels))
        self.kernel_parts = (*parts, *panels)
        self._pointers = pointers(self.kernel_parts)

    def _run(self, x, y, add):
        matmul = self._lib.w4a8_matmul if self.format == "w4a8" else self._lib.q4_1_matmul
        matmul(x.data_ptr(), x.shape[0], x.shape[1], self._pointers, self.out_features, y.data_ptr(), add)
        return y


class Q8_0(_Blocks):
    """With ``w4a8`` also kept as W8A8 panels of 16 rows (``w4a8.c``), which then do its products: 8-bit
    activations, as for the Q4_1 matrices of that route. ``format``: "w8a8" when they do, else "q8_0"."""

    def __init__(self, parts, out_features, w4a8: bool = False):
        super().__init__(parts, out_features)
        q, d = parts
        self.format = "w8a8" if w4a8 and out_features % 16 == 0 else "q8_0"
        panels = (None, None)
        if self.format == "w8a8":
            panels = torch.empty(q.shape, dtype=torch.uint8), torch.empty_like(d)
            self._lib.w8a8_repack(q.data_ptr(), d.data_ptr(), out_features, q.shape[1],
                                  *(t.data_ptr() for t in panels))
        self.kernel_parts = (*parts, *panels)
        self._panels = pointers(panels)

    def _run(self, x, y, add):
        if self.format == "w8a8":
            self._lib.w8a8_matmul(x.data_ptr(), x.shape[0], x.shape[1], self._panels, self.out_features,
                                  y.data_ptr(), add)
            return y
        q, d = self.parts
        self._lib.q8_0_matmul(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), d.data_ptr(),
                              self.out_features, y.data_ptr(), add)
        return y


KINDS = {"q4_1": quantize_q4_1, "q8_0": quantize_q8_0}


def _make(kind: str, blocks, rows: int, w4a8: bool) -> _Blocks:
    return (Q4_1 if kind == "q4_1" else Q8_0)(blocks, rows, w4a8)


def lossless(w: torch.Tensor | list[torch.Tensor], kind: str, w4a8: bool = False) -> _Blocks | None:
    """``w`` (a matrix, or matrices stacked by rows) in ``kind`` ("q4_1" or "q8_0") blocks if they reproduce
    it, else None (it is not on that grid). ``w4a8``: a Q4_1 matrix laid out for 8-bit activations."""
    parts = list(w) if isinstance(w, (list, tuple)) else [w]
    w = torch.cat(parts) if len(parts) > 1 else parts[0]
    if w.shape[1] % QK:
        return None
    blocks, missed = KINDS[kind](w)
    return _make(kind, blocks, w.shape[0], w4a8) if missed == 0 else None


def store_path(cache_dir: str, model) -> Path | None:
    """Where ``model``'s blocks are kept: one file per checkpoint (its files' paths, sizes and times)."""
    folder = getattr(model, "folder", None)  # a checkpoint.Checkpoint; a model object has no files to key
    if folder is None:
        return None
    files = sorted(Path(folder).glob("*.safetensors"))
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return Path(cache_dir) / "blocks" / f"{hashlib.sha256((stamp + FORMAT).encode()).hexdigest()[:16]}.safetensors"


class BlockStore:
    """Blocks quantized once, kept in a safetensors file that later starts read instead of quantizing
    again (0.4 s of a server's start here). ``path`` None: nothing is read or written."""

    def __init__(self, path: str | Path | None):
        self.path, self.tensors = (Path(path) if path else None), {}
        if self.path is not None and self.path.is_file():
            try:
                self.tensors = read_safetensors(self.path)
            except (OSError, ValueError, KeyError):  # unreadable (a partial write): quantize again
                self.tensors = {}
        self.loaded = bool(self.tensors)

    def get(self, name: str, parts: list[torch.Tensor], kind: str, w4a8: bool = False) -> _Blocks | None:
        """The matrix ``name`` (rows: ``parts`` stacked) in blocks, from the file or quantized now."""
        n = 3 if kind == "q4_1" else 2
        stored = [self.tensors.get(f"{name}.{j}") for j in range(n)]
        if all(t is not None for t in stored):
            # Copied out of the file's map: pages of an idle server's mapped file can be reclaimed, and a
            # step would then wait for the disk; a copy in memory stays (111 MB, ~30 ms here).
            return _make(kind, tuple(t.clone() for t in stored), sum(p.shape[0] for p in parts), w4a8)
        return lossless(parts, kind, w4a8)

    def save(self, matrices: dict) -> None:
        """Write the blocks of ``matrices`` unless they came from the file; a failed write costs nothing."""
        blocks = {f"{name}.{j}": t for name, m in matrices.items() if isinstance(m, _Blocks)
                  for j, t in enumerate(m.parts)}
        if self.path is None or self.loaded or not blocks:
            return
        from safetensors.torch import save_file

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            save_file(blocks, str(tmp))
            tmp.replace(self.path)  # readers see the whole file or none
        except OSError:
            pass
