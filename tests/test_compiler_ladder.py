"""The kernels build with whatever compiler the student has, and the server runs without one.

Stand-in compilers (small shell scripts put in ``CC``) play the ones no CI machine has: Apple's clang,
which rejects ``-fopenmp`` and (before 15, on arm64) ``-march=native`` and otherwise compiles, and a
compiler that builds nothing. Debian's ``clang`` plays itself: without ``libomp-dev`` it has no
``omp.h``, so it climbs to the build without OpenMP like Apple's. The arm64 case runs the C harness of
``model/csrc/test/`` on Debian's cross compiler under ``qemu-aarch64``. A case whose tool is missing is
skipped and says which. Each stand-in logs its calls, which shows that a rung is tried once.

Left out: timing (which route auto ranks first on one thread is the machine's business; the route must
still be measurable and exact), and a real Mac.
"""

import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from labserver.model import kernels
from labserver.model import toolchain
from labserver.model.toolchain import Rung, ladder
from tests.test_blockquant import grid_llama
from tests import test_kernel_paths as paths  # its checks, called on each build here (a module: not collected twice)
from tests.test_kernels_c import AARCH64_SYSROOT, SOURCES as HARNESS_SOURCES, run as run_harness

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
POSIX = pytest.mark.skipif(os.name == "nt", reason="the stand-in compilers are shell scripts, and Windows is left out")
APPLE_LIKE = """#!/bin/sh
# Apple's clang as the kernels see it: no OpenMP, and (arm64, before 15) no -march=native.
echo "$*" >> "{log}"
for arg do
    case "$arg" in
        -fopenmp) echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1 ;;
        -march=native) echo "clang: error: the clang compiler does not support '-march=native'" >&2; exit 1 ;;
    esac
done
{rewrite}exec "{real}" "$@"
"""
# The cross compiler cannot see the emulated CPU: -mcpu=native stands for a CPU with the dot product (an M1 has it).
AS_CORTEX_A76 = """for arg do
    shift
    case "$arg" in -mcpu=native) arg=-mcpu=cortex-a76 ;; esac
    set -- "$@" "$arg"
done
"""


def stand_in(folder: Path, real: str, name: str = "apple-clang", rewrite: str = "") -> tuple[Path, Path]:
    """An Apple-like compiler in front of ``real``: (the script, the log of its calls)."""
    script, log = folder / name, folder / f"{name}.log"
    script.write_text(APPLE_LIKE.format(log=log, real=real, rewrite=rewrite))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def features(lib) -> set[str]:
    return set(toolchain.describe(lib)[1].split())


@pytest.fixture(scope="module")
def apple(tmp_path_factory):
    """The stand-in in front of this machine's cc, and a kernels cache of its own (shared by the tests)."""
    if os.name == "nt":
        pytest.skip("the stand-in compilers are shell scripts, and Windows is left out")
    real = shutil.which("cc") or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler (cc or gcc) on PATH to stand behind")
    folder = tmp_path_factory.mktemp("apple")
    script, log = stand_in(folder, real)
    return script, log, folder / "cache"


def test_the_ladder_for_each_machine():
    names = [r.name for r in ladder("native", True, "x86_64", set())]
    assert names == ["-march=native -fopenmp", "-march=native -fopenmp-simd", "-march=native, no OpenMP flag",
                     "default target -fopenmp", "default target -fopenmp-simd", "default target, no OpenMP flag"]
    avx2 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
    assert [r.name for r in ladder("native", True, "x86_64", avx2)][:2] == [
        "-march=native -fopenmp", "-march=x86-64-v3 -fopenmp"]  # what a compiler that refuses native is told
    arm = [r.name for r in ladder("native", True, "arm64")]
    assert arm[:2] == ["-march=native -fopenmp", "-mcpu=native -fopenmp"]
    assert [r.name for r in ladder("x86-64-v3", False, "x86_64")][0] == "-march=x86-64-v3 -fopenmp-simd"


def test_a_compiler_like_apples_still_builds_the_kernels(apple, monkeypatch):
    script, log, cache = apple
    monkeypatch.setenv("CC", str(script))
    lib, rung, why = toolchain.climb(ladder(), cache)
    assert "openmp" not in features(lib) and "single-thread" in features(lib)
    assert "built without OpenMP (the kernels run on the calling thread): the compiler rejected -fopenmp " \
           "(clang: error: unsupported option '-fopenmp')" in why
    assert "the compiler rejected -march=native (clang: error: the clang compiler does not support" in why
    if X86 and toolchain.x86_level(set(toolchain._cpu_flags().partition(":")[2].split())):
        assert rung.target[0].startswith("-march=x86-64-v") and toolchain.describe(lib)[0] in ("avx2", "avx512")
    for rows in (1, 3):  # the products of that build are right
        paths.test_the_weights_are_rounded_twice_on_every_path(lib, rows)
    paths.test_products_stay_within_the_float32_bound_on_every_path(lib, 8)
    paths.test_the_integer_sums_are_exact_on_every_path(lib, 3)

    # The next start builds nothing and tries no rung that failed: the library and the record are cached.
    before = calls(log)
    again, again_rung, again_why = toolchain.climb(ladder(), cache)
    assert calls(log) == before and again._name == lib._name and (again_rung, again_why) == (rung, why)
    records = list((cache / "kernels").glob("ladder-*.json"))
    assert len(records) == 1 and "-march=native -fopenmp" in json.loads(records[0].read_text())["failed"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A llama on the block grids saved as a model folder (q4_1 reproduces it exactly)."""
    path = tmp_path_factory.mktemp("ladder") / "model"
    grid_llama(tie_word_embeddings=False).save_pretrained(path)
    return path


ROUTES = """
import json, sys
from labserver import EngineConfig
from labserver.engine.runners import make_runner
from labserver.model import kernels
from labserver.model.checkpoint import Checkpoint
out = {"available": kernels.available(), "features": kernels.features()}
for quant in ("auto", "q4_1"):
    runner = make_runner(Checkpoint(sys.argv[1]), EngineConfig(quant=quant, threads=1, max_batch=1), 64)
    out[quant] = {**runner.route.to_dict(), "formats": runner.lean.formats(), "fused": runner.lean.fused is not None}
print(json.dumps(out))
"""


def in_process(script: str, *args, **env) -> dict:
    """Run ``script`` in a fresh interpreter (its own ``kernels.library()``), return the JSON it prints."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=environment, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_with_that_compiler_the_route_is_still_the_c_kernels(apple, folder):
    script, log, cache = apple
    out = in_process(ROUTES, folder, CC=str(script), LABSERVER_CACHE=str(cache))
    ok, why = out["available"]
    assert ok and "rejected -fopenmp" in why and "single-thread" in out["features"]
    auto = out["auto"]  # q4_1 runs on the kernels, is exact, and was measured: auto may pick it
    assert "q4_1" in auto["measured_ms"] and "q4_1" not in auto["excluded"]
    q4_1 = out["q4_1"]
    assert q4_1["quant"] == "q4_1" and "q4_1" in q4_1["formats"] and q4_1["fused"]
    assert q4_1["why"].startswith("--quant q4_1 asked for; C kernels built") and "without OpenMP" in q4_1["why"]


def test_a_cc_that_is_not_there_is_no_compiler(tmp_path, monkeypatch):
    """``CC`` set to a missing path: no compiler, even though cc is on PATH (the student meant that one)."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match=r"no C compiler: \$CC is '/nonexistent/cc', which is not found"):
        toolchain.climb(ladder(), tmp_path)
    assert not (tmp_path / "kernels").exists()  # nothing tried, nothing remembered
    monkeypatch.setenv("CC", "")  # empty is unset: the usual search
    assert toolchain.compiler()[0] == (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))


@POSIX
def test_a_compiler_that_builds_nothing_is_tried_once(tmp_path, monkeypatch):
    script, log = tmp_path / "broken-cc", tmp_path / "broken-cc.log"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\necho "cc: error: this compiler builds nothing" >&2\nexit 1\n')
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    rungs = ladder()
    with pytest.raises(RuntimeError, match="each tried once") as first:
        toolchain.climb(rungs, tmp_path)
    assert calls(log) == len(rungs) and "cc: error: this compiler builds nothing" in str(first.value)
    with pytest.raises(RuntimeError, match="each tried once"):
        toolchain.climb(rungs, tmp_path)
    assert calls(log) == len(rungs)  # the next start tries none of them


# -- Debian's clang, x86-64 -----------------------------------------------------------------------------------
def harness(compiler: list[str], rung: Rung, out: Path, runner=()) -> tuple[str, set[str]]:
    """The C harness built with ``rung``'s flags (a program, not a library) and run: every check must pass.
    Returns the path and features it reports."""
    program = out / "harness"
    flags = [f for f in rung.flags if f != "-shared"]
    done = subprocess.run([*compiler, *map(str, HARNESS_SOURCES), "-o", str(program), *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done, passed, failed, lines = run_harness([*runner, str(program)])
    failures = [line for line in lines if line.startswith("FAIL")]
    assert done.returncode == 0 and failed == 0 and passed > 50, "\n".join(failures) or done.stderr[-2000:]
    path, shown = re.fullmatch(r"build: path=(\S+) features=(.*)", next(x for x in lines if x.startswith("build:"))).groups()
    return path, set(shown.split())


@pytest.mark.slow
@POSIX
@pytest.mark.skipif(not X86, reason=f"the clang case is x86-64; this is {platform.machine()}")
@pytest.mark.skipif(shutil.which("clang") is None, reason="no clang (Debian: apt-get install clang)")
def test_debians_clang_builds_the_kernels_and_they_pass_their_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "clang")
    lib, rung, why = toolchain.climb(ladder(), tmp_path)
    has_openmp = "openmp" in features(lib)
    assert has_openmp == (rung.threads == "-fopenmp") and (has_openmp or "rejected -fopenmp" in why)
    for rows in (1, 3, 64):
        paths.test_the_weights_are_rounded_twice_on_every_path(lib, rows)
    for rows in (1, 13):
        paths.test_products_stay_within_the_float32_bound_on_every_path(lib, rows)
        paths.test_the_integer_sums_are_exact_on_every_path(lib, rows)
    # The W4A8 step runs one fixed order of float32 operations: clang's build gives gcc's bits.
    reference = kernels.library()
    if reference is not None:
        grid = grid_llama(tie_word_embeddings=False, num_hidden_layers=4)
        ours, theirs = paths.run_on(lib, grid, "w4a8", paths.IDS_STEP), paths.run_on(reference, grid, "w4a8", paths.IDS_STEP)
        assert all(a.equal(b) for a, b in zip(ours, theirs))
    path, shown = harness(toolchain.compiler(), rung, tmp_path)
    assert path == toolchain.describe(lib)[0] and ("openmp" in shown) == has_openmp


# -- arm64 under qemu, with a compiler that takes -mcpu=native only -------------------------------------------------
def arm64_tools() -> tuple[str | None, str | None, str | None]:
    """(cross compiler, emulator, why the case cannot run here or None)."""
    cross, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    why = ("no aarch64-linux-gnu-gcc (Debian: apt-get install gcc-aarch64-linux-gnu)" if not cross else
           "no qemu-aarch64 (Debian: apt-get install qemu-user)" if not qemu else
           f"no ARM64 libraries in {AARCH64_SYSROOT}" if not Path(AARCH64_SYSROOT).is_dir() else None)
    return cross, qemu, why


CROSS, QEMU, NO_ARM64 = arm64_tools()


@pytest.mark.slow
@POSIX
@pytest.mark.skipif(NO_ARM64 is not None, reason=NO_ARM64 or "")
def test_arm64_with_a_compiler_that_refuses_march_native(tmp_path, monkeypatch):
    """Apple's clang before 15 on an M1: the ladder takes -mcpu=native without OpenMP, and that build's
    harness passes every check under qemu-aarch64."""
    script, log = stand_in(tmp_path, CROSS, "apple-clang-arm64", AS_CORTEX_A76)
    monkeypatch.setenv("CC", str(script))
    library, rung, why = toolchain.climb(ladder("native", True, "aarch64"), tmp_path, loader=Path)
    assert rung == Rung(("-mcpu=native",), "-fopenmp-simd") and library.is_file()
    assert "built for -mcpu=native: the compiler rejected -march=native" in why and "rejected -fopenmp" in why
    path, shown = harness([str(script)], rung, tmp_path, [QEMU, "-L", AARCH64_SYSROOT, "-cpu", "max"])
    assert path == "neon" and {"dotprod", "single-thread"} <= shown and "openmp" not in shown


# -- no compiler at all: the torch routes ------------------------------------------------------------------------
NO_COMPILER = """
import json
from labserver import Engine, EngineConfig, SamplingParams
from labserver.measure.bench_speed import AGREEMENT_PROMPTS
from labserver.model import kernels
engine = Engine.from_config(EngineConfig())
exact = Engine(engine.source, engine.tokenizer, EngineConfig(quant="none", threads=engine.config.threads))
params = SamplingParams(max_tokens=16, temperature=0)
print(json.dumps({"available": kernels.available(), "path": kernels.path(), "route": engine.route,
                  "threads": engine.config.threads, "tokens": engine.generate(AGREEMENT_PROMPTS[0], params).token_ids,
                  "float32": exact.generate(AGREEMENT_PROMPTS[0], params).token_ids}))
"""


@pytest.mark.model
def test_without_a_compiler_auto_serves_the_best_torch_route():
    """``CC`` points nowhere (and cc is on PATH, unused): auto measures the torch routes, says why q4_1 is
    not among them, and the engine serves float32's greedy tokens."""
    out = in_process(NO_COMPILER, CC="/nonexistent/cc")
    assert out["available"] == [False, "no C compiler: $CC is '/nonexistent/cc', which is not found"]
    route = out["route"]
    assert out["path"] is None and route["quant"] in ("fp16", "none")
    assert route["excluded"]["q4_1"] == "no C kernels: no C compiler: $CC is '/nonexistent/cc', which is not found"
    assert route["why"].startswith("fastest with float32's tokens") and "q4_1 excluded: no C kernels" in route["why"]
    assert route["threads"] == out["threads"] and route["threads_why"]
    assert len(out["tokens"]) > 0 and out["tokens"] == out["float32"]
