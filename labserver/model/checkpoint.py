"""A local model folder read without transformers: its configs as attributes, its weights memory-mapped.

A server that imports transformers and builds its model object spends seconds before it can answer
anything, though the lean runner needs only the config and the tensors. ``Checkpoint`` offers the same
three things a transformers model offers the engine (``config``, ``generation_config``, ``state_dict()``),
read from ``config.json``, ``generation_config.json`` and the ``.safetensors`` files. The tensors are
views of the mapped files: nothing is read until a matrix is first used, and pages the lean runner
copies into its own layout are never held twice in memory.

The transformers model is still there for whoever asks (``hf_model()``: the oracle tests, the lab's
reference loop, models the lean runner does not support); it loads on first use and is kept.

Left out on purpose: PyTorch ``.bin`` checkpoints, quantized checkpoints, any download.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one private, read-on-demand memory map."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    start = 8 + header_len
    size = start + max((t["data_offsets"][1] for t in header.values()), default=0)
    data = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size))
    tensors = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        tensors[name] = data[start + begin:start + end].view(DTYPES[t["dtype"]]).view(t["shape"])
    return tensors


class Checkpoint:
    """``config``, ``generation_config`` and ``state_dict()`` of a transformers-format folder."""

    def __init__(self, folder, dtype: str = "float32"):
        self.folder, self.dtype = Path(folder), dtype
        self.config = SimpleNamespace(**json.loads((self.folder / "config.json").read_text()))
        gen = self.folder / "generation_config.json"
        self.generation_config = SimpleNamespace(**json.loads(gen.read_text())) if gen.is_file() else None
        self._tensors: dict | None = None
        self._hf_model = None
        self._lock = threading.Lock()

    @staticmethod
    def readable(folder) -> bool:
        """True when ``folder`` has a config and safetensors weights, the two things read here."""
        folder = Path(folder)
        return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors by their transformers names; a tied output matrix appears as ``lm_head.weight`` too."""
        if self._tensors is None:
            tensors = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                tensors.update(read_safetensors(path))
            if "lm_head.weight" not in tensors and getattr(self.config, "tie_word_embeddings", False):
                tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
            self._tensors = tensors
        return self._tensors

    def hf_model(self):
        """The transformers model of this folder, loaded on the first call (seconds) and kept."""
        with self._lock:
            if self._hf_model is None:
                from transformers import AutoModelForCausalLM

                self._hf_model = AutoModelForCausalLM.from_pretrained(
                    self.folder, dtype=getattr(torch, self.dtype)).eval()
            return self._hf_model
