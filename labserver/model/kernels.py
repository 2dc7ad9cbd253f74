"""The C kernels of ``csrc/``: compiled once per CPU and compiler, and loaded with ``ctypes``.

The sources are built with the machine's C compiler (``$CC`` when set, else ``cc``, ``gcc`` or ``clang``)
the first time they are needed, for this CPU (``-march=native``, or the target in
``$LABSERVER_KERNEL_ARCH``, e.g. ``x86-64-v3`` to run the AVX2 code on an AVX-512 machine), into
``<cache_dir>/kernels/``; later processes load the cached library in milliseconds. ``path()`` says which
vector code it was compiled to: "avx512", "avx2", "neon" or "portable". It links OpenMP (unless
``LABSERVER_KERNEL_OPENMP=0``): loaded after torch, it shares torch's libgomp and its thread team, so
``torch.set_num_threads`` on the calling thread also sets how many threads the kernels use. ``ctypes``
releases the GIL for the length of each call, so a whole decode step runs without it.

Compilers differ (Apple's clang has no OpenMP and, before 15, no ``-march=native`` on arm64; Debian's
clang has no ``omp.h`` without ``libomp-dev``), so ``library()`` climbs a ladder (``ladder()``): this CPU
with OpenMP, then without it (``-fopenmp-simd``, then no flag: the calling thread alone), then the
compiler's default target; on ARM ``-mcpu=native`` where ``-march=native`` is refused, on x86 the
x86-64 level the CPU's flags name. The first rung that builds and loads is used, and each rung that fails
is written to ``<cache_dir>/kernels/ladder-<key>.json`` (the key names the compiler, the sources and the
CPU) so that no start tries it again; ``available()`` says what was given up and the compiler's words.
Delete that file to try again (after installing OpenMP, say).

The fused decode step that calls them is ``fused.FusedDecode``. Left out: Windows (a DLL built by MinGW
may load, nothing here tests it; without a compiler the lean model keeps its torch routes), a pthreads
team for compilers without OpenMP, and a clang whose own OpenMP runtime (libomp) would run beside
torch's libgomp.
"""

from __future__ import annotations

import ctypes
import functools

from .toolchain import climb, default_target, describe, ladder


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    arch, openmp = default_target()
    try:
        lib, _, why = climb(ladder(arch, openmp))
    except (RuntimeError, OSError) as exc:
        return None, str(exc)
    asked = [] if openmp else ["built without OpenMP: LABSERVER_KERNEL_OPENMP=0 asked for"]
    return lib, "; ".join([*asked, *([why] if why else [])])


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
    """``(True, how)`` when the kernels work here, ``how`` saying what the build gave up ("" for nothing:
    this CPU's code with OpenMP), else ``(False, why)``."""
    lib, why = _load()
    return lib is not None, why


def pointers(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None), as the kernels take matrices."""
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
