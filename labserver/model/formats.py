"""The weight formats of the lean llama, in one registry: ``--quant`` name -> how its matrices are built.

Each ``WeightFormat`` says what it stores, which activations it takes, whether it needs the C kernels,
whether it computes the float32 model exactly, and whether ``--quant auto`` may pick it. ``auto`` is
not a rule written here: the engine measures the candidates on the machine (``engine/calibrate.py``).

>>> get("q4_1").needs_compiler, get("fp16").activations, [f.name for f in auto_candidates()]
(True, torch.float32, ['q4_1', 'fp16', 'none'])

"none" is the one spelling of "no quantization": the checkpoint's weights in the engine's dtype.
Left out: the kernels themselves (``linear.py``, ``blocks.py``), and formats for other architectures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .blocks import BlockStore
from .linear import Dense, Fp16, Linear, joined

# (matrix name, row blocks that share an input, activation dtype, block store or None) -> a matrix
Builder = Callable[[str, list[torch.Tensor], torch.dtype, "BlockStore | None"], Linear]
HEAD = "lm_head"  # the output matrix: the most sensitive one (tied to the embeddings, often not 4-bit friendly)


@dataclass(frozen=True)
class WeightFormat:
    name: str                          # the ``--quant`` spelling
    stores: str                        # what the matrices hold, for people
    build: Builder
    activations: torch.dtype | None    # the activations it takes; None: the engine's dtype
    exact: bool = False                # the float32 model's greedy tokens by construction
    auto: bool = False                 # a candidate of ``--quant auto`` (checked and timed at the first start)
    needs_compiler: bool = False       # runs through the C kernels (``kernels.available()``)
    blocks: bool = False               # GGUF blocks, kept in a block file; the fused C step when all are blocks

    def check(self, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` unless this format runs with ``dtype`` activations."""
        if self.activations is not None and dtype != self.activations:
            raise ValueError(f"{self.name} weights take {str(self.activations).removeprefix('torch.')} activations"
                             f", not {str(dtype).removeprefix('torch.')}")


def _torch(layer, head) -> Builder:
    def build(name, parts, dtype, store):
        return (head if name == HEAD else layer)(joined(parts), dtype)
    return build


def _blocks(w4a8: bool) -> Builder:
    def build(name, parts, dtype, store):
        # 8-bit blocks for the output matrix, as the GGUF has it; float16 for a matrix off the block grid.
        kind = "q8_0" if name == HEAD else "q4_1"
        return store.get(name, parts, kind, w4a8=w4a8) or Fp16(joined(parts), dtype)
    return build


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("q4_1", "GGUF Q4_1 blocks (Q8_0 for the output matrix) where they reproduce a matrix, "
                 "float16 where not; float32 activations through the C kernels", _blocks(False), torch.float32,
                 exact=True, auto=True, needs_compiler=True, blocks=True),
    WeightFormat("fp16", "float16 weights (fbgemm), float32 activations", _torch(Fp16, Fp16), torch.float32,
                 auto=True),
    WeightFormat("none", "the checkpoint's weights in the engine's dtype (float32: equal to transformers)",
                 _torch(Dense, Dense), None, exact=True, auto=True),
    WeightFormat("w4a8", "the q4_1 blocks times activations rounded to 8 bits (llama.cpp's arithmetic)",
                 _blocks(True), torch.float32, needs_compiler=True, blocks=True),
)}
NAMES = tuple(FORMATS)


def get(name: str) -> WeightFormat:
    """The format called ``name``; ``ValueError`` naming the valid ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"quant must be one of {NAMES}, got {name!r}")
    return FORMATS[name]


def auto_candidates() -> list[WeightFormat]:
    """The formats ``--quant auto`` measures, in the registry's order (which also breaks ties)."""
    return [f for f in FORMATS.values() if f.auto]


def activation_dtype(name: str, dtype: str) -> torch.dtype:
    """The activations format ``name`` runs with when the engine asked for ``dtype`` ("float32", ...)."""
    return get(name).activations or getattr(torch, dtype)
