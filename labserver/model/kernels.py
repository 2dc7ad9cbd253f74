"""The C kernels of ``kernels.c``: compiled once, loaded with ``ctypes``, and the fused decode step.

``kernels.c`` is built with the machine's C compiler (``cc``, or ``$CC``) the first time it is needed,
for this CPU (``-march=native``), into ``<cache_dir>/kernels/``; later processes load the cached library
in milliseconds. It links OpenMP: loaded after torch, it shares torch's libgomp and its thread team, so
``torch.set_num_threads`` on the calling thread also sets how many threads the kernels use. ``ctypes``
releases the GIL for the length of each call, so a whole decode step runs without it.

``FusedDecode`` is ``LeanLlama.decode_step`` (and its prefill) as one such call, for models whose
matrices are all in ``blockquant`` blocks. Left out: a build without a compiler (``available()`` says
why, and the lean model keeps its torch path), and Windows.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..config import default_cache_dir

HERE = Path(__file__).parent / "csrc"
SOURCES = [HERE / "kernels.c", HERE / "w4a8.c"]  # and the header they share, kernels.h
# -fno-math-errno lets expf vectorize (glibc's libmvec); no -ffast-math: the sums keep their rounding.
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-lm"]


def _cpu_flags() -> str:
    try:  # -march=native ties the library to this CPU model
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def build(cache_dir: str | None = None, arch: str = "native") -> Path:
    """Compile ``kernels.c`` for ``-march=arch`` unless the cache holds it already; return the library's path.

    "native" uses what this CPU has (AVX-512 here); a generic one such as "x86-64" builds the portable C
    paths, which the tests run against the native ones.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    flags = [f"-march={arch}", *FLAGS]
    cpu = _cpu_flags() if arch == "native" else ""
    text = b"".join(f.read_bytes() for f in [*SOURCES, HERE / "kernels.h"])
    key = hashlib.sha256(text + " ".join(flags).encode() + cpu.encode()).hexdigest()[:16]
    target = Path(cache_dir or default_cache_dir()) / "kernels" / f"kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or interrupted build never leaves half a library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *map(str, SOURCES), "-o", str(out), *flags], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the kernels failed:\n{done.stderr.strip()}")
        out.replace(target)
    return target


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    ptr, n = ctypes.c_void_p, ctypes.c_long
    lib.q4_1_matmul.argtypes = [ptr, n, n, ptr, n, ptr, ctypes.c_int]
    lib.q4_1_repack.argtypes = [ptr, ptr, ptr, n, n, ptr, ptr, ptr]
    lib.q8_0_matmul.argtypes = [ptr, n, n, ptr, ptr, n, ptr, ctypes.c_int]
    lib.llama_decode.argtypes = [ptr, ptr, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.w4a8_matmul.argtypes = lib.q4_1_matmul.argtypes
    lib.w4a8_repack.argtypes = lib.q4_1_repack.argtypes
    lib.w8a8_matmul.argtypes = lib.q4_1_matmul.argtypes
    lib.w8a8_repack.argtypes = [ptr, ptr, n, n, ptr, ptr]
    for fn in (lib.q4_1_matmul, lib.q4_1_repack, lib.q8_0_matmul, lib.llama_decode, lib.w4a8_matmul, lib.w4a8_repack,
               lib.w8a8_matmul, lib.w8a8_repack):
        fn.restype = None
    lib.q4_1_quantize.argtypes = [ptr, n, n, ptr, ptr, ptr, ctypes.c_float]
    lib.q8_0_quantize.argtypes = [ptr, n, n, ptr, ptr, ctypes.c_float]
    lib.q4_1_quantize.restype = lib.q8_0_quantize.restype = ctypes.c_long
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        return load(build()), ""
    except (RuntimeError, OSError) as exc:
        return None, str(exc)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (``available`` says why)."""
    return _load()[0]


def available() -> tuple[bool, str]:
    """``(True, "")`` when the kernels work here, else ``(False, why)``."""
    lib, why = _load()
    return lib is not None, why


def pointers(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None), as the kernels take matrices."""
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
