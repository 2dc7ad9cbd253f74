"""The C kernels of ``csrc/``: compiled once per CPU and loaded with ``ctypes``.

The sources are built with the machine's C compiler (``cc``, or ``$CC``) the first time it is needed,
for this CPU (``-march=native``, or the target in ``$LABSERVER_KERNEL_ARCH``, e.g. ``x86-64-v3`` to run
the AVX2 code on an AVX-512 machine), into ``<cache_dir>/kernels/``; later processes load the cached
library in milliseconds. ``path()`` says which vector code it was compiled to: "avx512", "avx2", "neon"
or "portable". It links OpenMP (unless ``LABSERVER_KERNEL_OPENMP=0``; it then runs on the calling thread
alone, as it must where the compiler has no OpenMP): loaded after torch, it shares torch's libgomp and
its thread team, so ``torch.set_num_threads`` on the calling thread also sets how many threads the
kernels use. ``ctypes`` releases the GIL for the length of each call, so a whole decode step runs
without it.

The fused decode step that calls them is ``fused.FusedDecode``. Left out: a build without a compiler (``available()`` says
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
SOURCES = [HERE / f for f in ("kernels.c", "quantize.c", "w4a8.c", "w8a8.c", "step.c", "team.c")]  # and csrc/*.h
# -fno-math-errno lets expf vectorize (glibc's libmvec); no -ffast-math: the sums keep their rounding.
# -ffp-contract=off: GCC would otherwise fuse a * b + c into one FMA, also where vector intrinsics are
# plain operators (_mm256_mul_ps then _mm256_add_ps): the weights q * d + m must be rounded twice, as the
# float32 model's were; the kernels ask for FMA explicitly where they want one rounding.
FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]


def _cpu_flags() -> str:
    try:  # -march=native ties the library to this CPU model
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def arch_flags(arch: str) -> list[str]:
    """Compiler flags for a target: ``-march=`` its name, then ``-m`` each ``+feature`` after it
    ("x86-64-v3+avxvnni": AVX2 with the 256-bit VNNI instructions). An ARM target keeps its features in
    ``-march`` ("armv8.2-a+dotprod"), where GCC and clang take them."""
    if arch.startswith("armv"):
        return [f"-march={arch}"]
    name, *features = arch.split("+")
    return [f"-march={name}", *(f"-m{f}" for f in features)]


def default_target() -> tuple[str, bool]:
    """The target ``library()`` builds: ``$LABSERVER_KERNEL_ARCH`` (default "native") and whether with
    OpenMP (``$LABSERVER_KERNEL_OPENMP``, default 1)."""
    arch = os.environ.get("LABSERVER_KERNEL_ARCH", "").strip() or "native"
    return arch, os.environ.get("LABSERVER_KERNEL_OPENMP", "1").strip() not in ("0", "false", "no", "off")


def build(cache_dir: str | None = None, arch: str = "native", openmp: bool = True) -> Path:
    """Compile ``kernels.c`` for ``arch`` unless the cache holds it already; return the library's path.

    "native" uses what this CPU has (AVX-512 here); "x86-64-v3" the AVX2 + FMA code, "x86-64" the
    portable C, "x86-64-v3+avxvnni" AVX2 with AVX-VNNI for the W4A8 route; ``openmp=False`` a library
    that runs every call on the calling thread. The tests run each against the others.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    flags = [*arch_flags(arch), *FLAGS, "-fopenmp" if openmp else "-fopenmp-simd", "-lm"]
    cpu = _cpu_flags() if arch.startswith("native") else ""
    text = b"".join(f.read_bytes() for f in [*SOURCES, *sorted(HERE.glob("*.h"))])
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
    lib.llama_decode.argtypes = [ptr, ptr, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
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
    lib.kernel_path.restype = lib.kernel_features.restype = ctypes.c_char_p
    lib.kernel_path.argtypes = lib.kernel_features.argtypes = []
    return lib


def describe(lib: ctypes.CDLL) -> tuple[str, str]:
    """(vector path, features) a library was compiled for: e.g. ("avx2", "avxvnni fma openmp")."""
    return lib.kernel_path().decode(), lib.kernel_features().decode().strip()


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        arch, openmp = default_target()
        return load(build(arch=arch, openmp=openmp)), ""
    except (RuntimeError, OSError) as exc:
        return None, str(exc)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (``available`` says why)."""
    return _load()[0]


def library_file() -> str | None:
    """The file ``library()`` loaded (its name carries the hash of sources, flags and CPU), or None."""
    lib = library()
    return None if lib is None else lib._name  # ctypes keeps the path it was given


def path() -> str | None:
    """The vector code the loaded kernels run: "avx512", "avx2", "neon" or "portable" (None: no kernels)."""
    lib = library()
    return None if lib is None else describe(lib)[0]


def features() -> str | None:
    """What else they use, e.g. "avx512vnni fma openmp" (None: no kernels)."""
    lib = library()
    return None if lib is None else describe(lib)[1]


def available() -> tuple[bool, str]:
    """``(True, "")`` when the kernels work here, else ``(False, why)``."""
    lib, why = _load()
    return lib is not None, why


def pointers(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None), as the kernels take matrices."""
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
