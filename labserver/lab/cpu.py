"""The appendix notebook's experiments (09_appendix_cpu): what the CPU does under a decode step.

- OpenMP thread teams: every thread that runs the model gets a team of worker threads of its own;
  ``second_thread_team`` counts the process's OS threads around a second thread's generation.
- GGUF's 4-bit blocks: ``block_table`` reads the model file's tensor types and their bits per weight;
  ``dequantize_q4_1_block`` undoes one 20-byte Q4_1 block by hand.
- SIMD: ``VECTOR_BYTES`` of each kernel path; ``rows_cost`` times one block-quantized product of 1 and
  of B rows (the weights are read once either way); ``float32_sum_bound``, how far a float32 product may
  differ from another by rounding alone.

Left out: anything the server uses (the kernels are ``model.kernels``/``model.blocks``), and other block
types than Q4_1 and Q8_0.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..config import SamplingParams
from .display import PROMPT

# Bytes in one vector register of each kernel path (model.kernels.path()); "portable" C has none.
VECTOR_BYTES = {"avx512": 64, "avx2": 32, "neon": 16}


def os_threads() -> int:
    """Threads of this process, as the OS counts them (OpenMP workers included)."""
    import psutil

    return psutil.Process().num_threads()


def second_thread_team(engine, tokens: int = 4) -> dict:
    """OS threads before and after a new long-lived thread runs a short generation, and after it ends.

    The thread is made and idled first, so that ``after - before`` counts only what running the model
    on it added: its OpenMP team.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="second-model-thread")
    pool.submit(lambda: None).result()
    before = os_threads()
    pool.submit(engine.generate, PROMPT, SamplingParams(max_tokens=tokens, temperature=0)).result()
    after = os_threads()
    pool.shutdown()
    time.sleep(0.2)  # the ended thread's team finishes exiting
    return {"before": before, "after": after, "ended": os_threads()}


def gguf_path():
    from ..engine.loading import default_gguf_path

    return default_gguf_path()


def block_table(path=None) -> list[dict]:
    """One row per tensor type of the GGUF file: tensors, weights, bytes and bits per weight."""
    from gguf import GGUFReader

    totals = defaultdict(lambda: [0, 0, 0])
    for tensor in GGUFReader(path or gguf_path()).tensors:
        row = totals[tensor.tensor_type.name]
        row[0], row[1], row[2] = row[0] + 1, row[1] + int(tensor.n_elements), row[2] + int(tensor.n_bytes)
    return [{"type": kind, "tensors": n, "weights": w, "MB": round(b / 1e6, 1), "bits per weight": 8 * b / w}
            for kind, (n, w, b) in sorted(totals.items())]


def first_tensor(kind: str = "Q4_1", path=None):
    """The first tensor of type ``kind`` in the GGUF file (a gguf ``ReaderTensor``: ``.data`` holds its bytes)."""
    from gguf import GGUFReader

    return next(t for t in GGUFReader(path or gguf_path()).tensors if t.tensor_type.name == kind)


def dequantize_q4_1_block(block: np.ndarray) -> np.ndarray:
    """The 32 float32 weights of one 20-byte Q4_1 block: scale d, minimum m (float16 each), 16 bytes of nibbles.

    Byte j holds weight j in its low 4 bits and weight j + 16 in its high 4 bits; a weight is d * q + m.
    """
    d, m = block[:2].view(np.float16).astype(np.float32)[0], block[2:4].view(np.float16).astype(np.float32)[0]
    nibbles = block[4:20]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4]).astype(np.float32)
    return d * q + m


def on_grid_matrix(kind: str = "Q4_1", rows: int = 16384, path=None) -> torch.Tensor:
    """A float32 matrix of ``rows`` rows whose values are exactly the model's Q4_1 weights (stacked layers)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    parts, total = [], 0
    for tensor in GGUFReader(path or gguf_path()).tensors:
        if tensor.tensor_type.name == kind and total < rows:
            w = dequantize(tensor.data, tensor.tensor_type)
            if not parts or w.shape[1] == parts[0].shape[1]:
                parts.append(w)
                total += w.shape[0]
    return torch.from_numpy(np.concatenate(parts)[:rows]).contiguous()


def float32_sum_bound(x: torch.Tensor, w: torch.Tensor) -> float:
    """How far any float32 evaluation of ``x @ w.T`` may stray from the exact product, whatever the order of
    its sums: each of the K - 1 additions rounds once, by at most eps of the running sum, which is at most
    the sum of the terms' sizes (the classic bound ``(K - 1) * eps * sum_k |x_k w_k|``), largest over outputs.
    """
    k = x.shape[1]
    return (k - 1) * torch.finfo(torch.float32).eps * float((x.abs() @ w.abs().T).max())


def rows_cost(layer, in_features: int, batches=(1, 8), repeats: int = 15) -> dict[int, float]:
    """Median ms of ``layer(x)`` for ``x`` of each number of rows (after one warm-up call each)."""
    out = {}
    for b in batches:
        x = torch.randn(b, in_features)
        layer(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x)
            times.append((time.perf_counter() - t0) * 1000)
        out[b] = statistics.median(times)
    return out
