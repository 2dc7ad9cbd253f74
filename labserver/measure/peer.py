"""The peer: llama.cpp's own C++ `llama-server`, built natively for this CPU once, then started on demand.

    python -m labserver.measure.peer            # build (or find) the binary, print its path

The sources are the llama.cpp vendored in the llama-cpp-python sdist (`pip download --no-binary`), so
the version is pinned by one PyPI release. The build goes to a cache folder keyed by that version and
by the CPU (machine, model name, SIMD flags): a `-DGGML_NATIVE=ON` binary is only valid on the CPU it
was built for, and a home folder may be shared between machines. `PeerServer` runs the server on
loopback and waits for `/health`. If a native binary dies at start or in its first prefill (on an Intel
CPU with AMX, this version's AMX build segfaults in its start-up warm-up run), `ensure_server` rebuilds
it with `-DGGML_AMX_INT8=OFF`, keeping AVX-512, and says so. (`llama-server --no-repack` also avoids
that crash: it keeps the weights out of the AMX buffers.)

Left out: GPU backends, other llama.cpp versions, downloading prebuilt binaries, Windows.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

VERSION = "0.3.36"  # llama-cpp-python release whose sdist vendors the llama.cpp we build
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
NO_AMX = "-DGGML_AMX_INT8=OFF"
_say = partial(print, flush=True)  # progress lines must show while a build runs, also through a pipe
# Flags that change what a native build emits; the rest of /proc/cpuinfo's list does not matter here.
_SIMD = re.compile(r"^(avx|amx|fma|f16c|sse|ssse|bmi|vnni|asimd|neon|sve|i8mm|dotprod|fphp|asimdhp)")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: tuple[str, ...]  # the SIMD-relevant ones, sorted
    machine: str

    @property
    def key(self) -> str:
        """Cache key: a native binary is reusable exactly when machine, model name and SIMD flags match."""
        text = "\n".join([self.machine, self.model, " ".join(self.flags)])
        return f"{self.machine}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"

    def describe(self) -> str:
        wide = [f for f in self.flags if f.startswith(("avx", "amx"))] or list(self.flags)
        return f"{self.model} ({self.machine}; {' '.join(wide) or 'no SIMD flags found'})"


def parse_cpuinfo(text: str, machine: str | None = None) -> CpuInfo:
    """Model name and SIMD flags from /proc/cpuinfo text (x86 `flags`, ARM `Features`)."""
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name", "hardware", "cpu model") and model == "unknown CPU":
            model = value.strip()
        elif name in ("flags", "features") and not flags:
            flags = {f for f in value.split() if _SIMD.match(f)}
    return CpuInfo(model, tuple(sorted(flags)), machine or platform.machine())


def this_cpu() -> CpuInfo:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # macOS: no /proc; the brand string stands in for the model name
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return CpuInfo(brand.stdout.strip() or platform.processor() or "unknown CPU", (), platform.machine())


def cache_dir(cpu: CpuInfo | None = None, root: Path | None = None) -> Path:
    root = root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "labserver" / "peer"
    return root / f"llama.cpp-{VERSION}-{(cpu or this_cpu()).key}"


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks, as a line to print."""
    missing = [] if shutil.which("cmake") else ["cmake"]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++ or clang++)")
    return missing


def _run(cmd: list[str], log, logfile: Path) -> None:
    """Run a build step; its [ n%] lines are the progress shown, the whole output goes to `logfile`."""
    log("$ " + " ".join(cmd))
    with open(logfile, "a") as out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, errors="replace") as proc:
        tail = []
        for line in proc.stdout:
            out.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith(("[", "-- ", "CMake Error")):  # not gcc's many warnings on intrinsics
                log(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); the end of {logfile}:\n" + "\n".join(tail))


def _sources(folder: Path, log) -> Path:
    src = folder / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        folder.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={VERSION}", "-d", tmp], log, folder / "download.log")
        with tarfile.open(Path(tmp) / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            # The "data" filter (no absolute paths, no links out) where this Python has it (3.11.4+).
            tar.extractall(folder / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return src


def build(folder: Path | None = None, amx: bool = True, log=_say) -> Path:
    """Build `llama-server` into `folder` (default: this CPU's cache folder) unless already there."""
    folder = folder or cache_dir()
    build_dir = folder / ("build" if amx else "build-noamx")
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        return binary
    if missing := missing_tools():
        raise RuntimeError(f"building llama-server needs {' and '.join(missing)}: "
                           "e.g. `apt-get install cmake g++` (Debian/Ubuntu) or `xcode-select --install`")
    src = _sources(folder, log)
    log(f"building llama.cpp's llama-server natively for {this_cpu().describe()} into {build_dir} "
        "(once; about 12 minutes on 2 cores)")
    logfile = folder / f"{build_dir.name}.log"
    _run(["cmake", "-S", str(src), "-B", str(build_dir)] + CMAKE_FLAGS + ([] if amx else [NO_AMX]), log, logfile)
    _run(["cmake", "--build", str(build_dir), "--target", "llama-server", f"-j{os.cpu_count() or 2}"], log,
         logfile)
    return binary


class PeerServer:
    """A running llama-server on 127.0.0.1; `stop()` (or leaving the `with`) ends it."""

    def __init__(self, binary: Path, gguf: Path, port: int, threads: int = 2, parallel: int = 1,
                 ctx: int = 2048, timeout_s: float = 120.0, extra: tuple[str, ...] = ()):
        self.url = f"http://127.0.0.1:{port}"
        self.args = [str(binary), "-m", str(gguf), "-t", str(threads), "-np", str(parallel), "-c", str(ctx),
                     "--host", "127.0.0.1", "--port", str(port), *extra]
        # Its log goes to a file: llama.cpp writes a lot while loading, and a full pipe would stall it.
        self._log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise PeerCrashed(self.proc.returncode, self.log_tail())
            try:  # /health is 503 while the model loads, 200 once it serves
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.ready_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not answer /health within {timeout_s} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        self._log.seek(0)
        return self._log.read()[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "PeerServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class PeerCrashed(RuntimeError):
    def __init__(self, returncode: int, log: str):
        super().__init__(f"llama-server exited with {returncode} while starting: {log}")
        self.returncode = returncode


def _smoke(binary: Path, gguf: Path, extra: tuple[str, ...] = ()) -> None:
    """Start the server and run a prefill and a few steps: a bad instruction may only fault at compute."""
    with PeerServer(binary, gguf, free_port(), parallel=1, extra=extra) as server:
        try:  # ~100 prompt tokens: batched matrix products, where llama.cpp's AMX kernels run
            httpx.post(server.url + "/completion", json={"prompt": "Count: " + "one two " * 50, "n_predict": 4},
                       timeout=600).raise_for_status()  # minutes only on a CPU other work keeps busy
        except httpx.HTTPError as err:
            if server.proc.poll() is not None:
                raise PeerCrashed(server.proc.returncode, server.log_tail()) from err
            raise


NO_REPACK = ("--no-repack",)


def ensure_server(gguf: Path, log=_say) -> tuple[Path, str, tuple[str, ...]]:
    """A llama-server binary that runs on this CPU, a note on how it was built, and the arguments it needs.

    In order: the native build; without AMX (AVX-512 kept); that build started with ``--no-repack`` (its
    weights then stay in the file's layout instead of the CPU-specific interleaved one, which costs
    llama.cpp speed: the note says so, and so does the comparison's output)."""
    binary = build(log=log)
    try:
        _smoke(binary, gguf)
        return binary, "native build (GGML_NATIVE=ON)", ()
    except PeerCrashed as err:
        log(f"the native build crashed ({err.returncode}); rebuilding with {NO_AMX}, AVX-512 kept")
    binary = build(amx=False, log=log)
    try:
        _smoke(binary, gguf)
        return binary, f"native build with {NO_AMX} (the build with AMX crashed here)", ()
    except PeerCrashed as err:
        log(f"the build without AMX crashed too ({err.returncode}); starting it with --no-repack")
    _smoke(binary, gguf, NO_REPACK)
    return (binary, f"native build with {NO_AMX}, run with --no-repack (weights not repacked for the CPU's "
                    "wide kernels, slower for llama.cpp; both other setups crashed here)", NO_REPACK)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    print(build())
