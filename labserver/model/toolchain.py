"""Building the C kernels: the compiler, its flags for a target, and the ladder of builds tried in turn,
each failure remembered; loading a built library with its functions' signatures declared.

``kernels.py`` says why (and uses the library this builds); this module is how. Left out: which
library the engine uses (``kernels.library()``), and any kernel itself (``csrc/``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch  # noqa: F401  (loaded before any kernels: the library then shares its libgomp)

from ..config import default_cache_dir

HERE = Path(__file__).parent / "csrc"
SOURCES = [HERE / f for f in ("kernels.c", "quantize.c", "w4a8.c", "w8a8.c", "step.c", "team.c")]  # and csrc/*.h
# -fno-math-errno lets expf vectorize (glibc's libmvec); no -ffast-math: the sums keep their rounding.
# -ffp-contract=off: GCC would otherwise fuse a * b + c into one FMA, also where vector intrinsics are
# plain operators (_mm256_mul_ps then _mm256_add_ps): the weights q * d + m must be rounded twice, as the
# float32 model's were; the kernels ask for FMA explicitly where they want one rounding.
FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
LADDER_VERSION = 1  # of the ladder's record; a change tries every rung again
ARM = ("aarch64", "arm64")


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


def compiler() -> list[str]:
    """The C compiler's command: ``$CC`` when set (a name on PATH or a path, with its arguments), else the
    first of cc, gcc, clang on PATH. A ``$CC`` that is not found means no compiler, not another one: the
    student who set it meant that one."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        words = [cc] if Path(cc).is_file() else shlex.split(cc)  # a path with spaces or backslashes, whole
        found = shutil.which(words[0])
        if found is None:
            raise RuntimeError(f"no C compiler: $CC is {cc!r}, which is not found")
        return [found, *words[1:]]
    found = next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
    if found is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    return [found]


def _compiler_identity(cc: list[str]) -> str:
    """The compiler's path, size and time: another compiler (or an upgrade) builds and tries anew."""
    stat = Path(cc[0]).stat()
    return f"{' '.join(cc)}:{stat.st_size}:{stat.st_mtime_ns}"


def _sources_text() -> bytes:
    return b"".join(f.read_bytes() for f in [*SOURCES, *sorted(HERE.glob("*.h"))])


class BuildFailed(RuntimeError):
    """The compiler ran and refused; ``first_error`` is its most telling line."""

    def __init__(self, stderr: str):
        super().__init__(f"compiling the kernels failed:\n{stderr.strip()}")
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        self.first_error = next((line for line in lines if "error" in line or "cannot find" in line),
                                lines[0] if lines else "no message")


def compile_library(flags: list[str], cache_dir: str | None = None, cc: list[str] | None = None) -> Path:
    """Compile the sources with ``flags`` unless the cache holds that library already; return its path."""
    cc = cc or compiler()
    cpu = _cpu_flags() if any(f.endswith("=native") for f in flags) else ""
    key = hashlib.sha256(_sources_text() + " ".join(flags).encode() + cpu.encode()
                         + _compiler_identity(cc).encode()).hexdigest()[:16]
    target = Path(cache_dir or default_cache_dir()) / "kernels" / f"kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or interrupted build never leaves half a library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([*cc, *map(str, SOURCES), "-o", str(out), *flags], capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildFailed(done.stderr)
        out.replace(target)
    return target


def build(cache_dir: str | None = None, arch: str = "native", openmp: bool = True) -> Path:
    """Compile ``kernels.c`` for ``arch`` unless the cache holds it already; return the library's path.

    "native" uses what this CPU has (AVX-512 here); "x86-64-v3" the AVX2 + FMA code, "x86-64" the
    portable C, "x86-64-v3+avxvnni" AVX2 with AVX-VNNI for the W4A8 route; ``openmp=False`` a library
    that runs every call on the calling thread. The tests run each against the others. One rung, no
    ladder: a compiler that refuses it raises ``BuildFailed``.
    """
    return compile_library(Rung(tuple(arch_flags(arch)), "-fopenmp" if openmp else "-fopenmp-simd").flags, cache_dir)


# -- the ladder ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rung:
    """One way to build: a target (``[]``: the compiler's default) and how threads are asked for."""

    target: tuple[str, ...]
    threads: str  # "-fopenmp", "-fopenmp-simd" (no OpenMP runtime, its vector pragmas kept) or "" (neither)

    @property
    def flags(self) -> list[str]:
        return [*self.target, *FLAGS, *([self.threads] if self.threads else []), "-lm"]

    @property
    def name(self) -> str:
        """e.g. "-march=native -fopenmp", "default target -fopenmp-simd", "-mcpu=native, no OpenMP flag"."""
        target = " ".join(self.target) or "default target"
        return f"{target} {self.threads}" if self.threads else f"{target}, no OpenMP flag"


def x86_level(flags: set[str]) -> str | None:
    """The x86-64 level a CPU's ``/proc/cpuinfo`` flags name, with its VNNI (the W4A8 products use it):
    what a compiler that refuses ``-march=native`` can still be told.

    >>> x86_level({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "avx_vnni"})
    'x86-64-v3+avxvnni'
    >>> x86_level({"sse2"}) is None
    True
    """
    v3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    if not v3 <= flags:
        return None
    if v4 <= flags:
        return "x86-64-v4" + ("+avx512vnni" if "avx512_vnni" in flags else "")
    return "x86-64-v3" + ("+avxvnni" if "avx_vnni" in flags else "")


def ladder(arch: str = "native", openmp: bool = True, machine: str | None = None,
           cpu_flags: set[str] | None = None) -> list[Rung]:
    """The builds ``library()`` tries, best first: each target with OpenMP, then each without it, then the
    compiler's default target the same way.

    >>> [r.name for r in ladder("native", True, "arm64")][:4]
    ['-march=native -fopenmp', '-mcpu=native -fopenmp', '-march=native -fopenmp-simd', '-mcpu=native -fopenmp-simd']
    """
    machine = (machine or platform.machine()).lower()
    targets = [arch_flags(arch)]
    if arch == "native" and machine in ARM:  # Apple's clang before 15 takes -mcpu=native only
        targets.append(["-mcpu=native"])
    if arch == "native" and machine in ("x86_64", "amd64"):
        level = x86_level(cpu_flags if cpu_flags is not None else set(_cpu_flags().partition(":")[2].split()))
        if level:
            targets.append(arch_flags(level))
    modes = (["-fopenmp"] if openmp else []) + ["-fopenmp-simd", ""]
    return [Rung(tuple(t), m) for m in modes for t in targets] + [Rung((), m) for m in modes]


def _ladder_record(cc: list[str], rungs: list[Rung], cache_dir: str | None) -> tuple[Path, dict]:
    key = {"version": LADDER_VERSION, "compiler": _compiler_identity(cc), "cpu": _cpu_flags(),
           "sources": hashlib.sha256(_sources_text()).hexdigest()[:16], "rungs": [r.name for r in rungs]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "kernels" / f"ladder-{digest}.json"
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return path, saved
    except (OSError, ValueError):
        pass
    return path, {"key": key, "failed": {}}


def _save(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError:  # a read-only cache: the failing rungs are tried again at the next start, nothing worse
        pass


def explain(rungs: list[Rung], used: Rung, failed: dict[str, str]) -> str:
    """What ``used`` gave up against the first rung, and the compiler's words for why ("" for nothing).

    >>> r = ladder("native", True, "x86_64", set())
    >>> explain(r, r[1], {r[0].name: "clang: error: unsupported option '-fopenmp'"})
    "built without OpenMP (the kernels run on the calling thread): the compiler rejected -fopenmp (clang: error: unsupported option '-fopenmp')"
    """
    first, notes = rungs[0], []
    if tuple(used.target) != tuple(first.target):
        refused = failed.get(Rung(first.target, used.threads).name, "")
        target = " ".join(used.target) or "the compiler's default target"
        notes.append(f"built for {target}: the compiler rejected {' '.join(first.target)}"
                     + (f" ({refused})" if refused else ""))
    if first.threads == "-fopenmp" and used.threads != "-fopenmp":
        refused = failed.get(Rung(used.target, "-fopenmp").name, "")
        notes.append("built without OpenMP (the kernels run on the calling thread): the compiler rejected -fopenmp"
                     + (f" ({refused})" if refused else ""))
    return "; ".join(notes)


def climb(rungs: list[Rung], cache_dir: str | None = None, loader=None) -> tuple[object, Rung, str]:
    """``(loader(library), rung, why)`` for the first rung that builds and loads, trying no rung that failed
    at an earlier start (``ladder-<key>.json``); ``why`` is what that rung gave up (``explain``). ``loader``
    is ``load`` unless given (a cross build, which cannot be loaded here, passes ``Path``). Raises
    ``RuntimeError`` when there is no compiler or every rung failed."""
    loader = loader or load
    cc = compiler()
    path, record = _ladder_record(cc, rungs, cache_dir)
    failed = record["failed"]
    for rung in (r for r in rungs if r.name not in failed):
        try:
            library = compile_library(rung.flags, cache_dir, cc)
        except BuildFailed as exc:
            failed[rung.name] = exc.first_error
            _save(path, record)
            continue
        try:
            return loader(library), rung, explain(rungs, rung, failed)
        except OSError as exc:  # built, but the loader refused it (a runtime library missing, say)
            failed[rung.name] = f"built, but could not be loaded: {exc}"
            _save(path, record)
    tried = "; ".join(f"{name}: {why}" for name, why in failed.items())
    raise RuntimeError(f"no build of the kernels worked with {' '.join(cc)} (each tried once, remembered in "
                       f"{path}; delete it to try again): {tried}")


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
