"""The C kernels on each of their code paths, checked by the C harness in labserver/model/csrc/test/.

The harness (plain C: no torch, no Python) checks every entry point against references it computes in
double precision, within bounds derived from the float32 arithmetic, and prints one line per check and
`N passed, M failed`. Here it is built with kernels.py's own flags for this CPU, for AVX2 (x86-64-v3,
and with AVX-VNNI), for a generic x86-64 (the portable C), without OpenMP, and for ARM64 (plain ARMv8-A
and with the dot product instructions) with Debian's cross compiler, run under qemu-aarch64. A case whose compiler,
emulator or CPU is missing is skipped and says which. The step reads its cache through scattered block
tables; on every path a prompt in chunks, or after a prefix another sequence wrote, must give the bits of
the whole prompt, and the W4A8 step the same bits as on every other path. `--perturb` corrupts one output of every check by a realistic bug's amount, and every check must
then fail.

Left out: timing (the benchmarks print speed), and Apple's clang (no such machine in CI).
"""

import functools
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from labserver.model import kernels
from labserver.model import toolchain

SOURCES = [*sorted((toolchain.HERE / "test").glob("*.c")), *toolchain.SOURCES]
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)
X86 = platform.machine().lower() in ("x86_64", "amd64")
ARM64 = platform.machine().lower() in ("aarch64", "arm64")
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


def host_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")  # as toolchain.build chooses


def cpu_has(*features: str) -> bool:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(features) <= set(line.split())


# name: (compiler, -march, OpenMP, command prefix to run the program, why the case cannot run here or None)
def cases():
    cc, cross = host_compiler(), shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    no_cc = None if cc else "no C compiler (cc or gcc) on PATH"
    if ARM64:  # an ARM64 host runs its builds itself
        arm = (cc, [], no_cc)
    else:
        arm = (cross, [qemu, "-L", AARCH64_SYSROOT, "-cpu", "max"],
               "no aarch64-linux-gnu-gcc (Debian: apt-get install gcc-aarch64-linux-gnu)" if not cross
               else "no qemu-aarch64 (Debian: apt-get install qemu-user)" if not qemu
               else f"no ARM64 libraries in {AARCH64_SYSROOT}" if not Path(AARCH64_SYSROOT).is_dir() else None)
    not_x86 = None if X86 else f"x86 build, this is {platform.machine()}"
    return {
        "native": (cc, "native", True, [], no_cc),
        "avx2": (cc, "x86-64-v3", True, [], not_x86 or no_cc or (
            None if cpu_has("avx2", "fma", "bmi2", "f16c", "movbe") else "this CPU has no AVX2 (x86-64-v3)")),
        "avx2-vnni": (cc, "x86-64-v3+avxvnni", True, [], not_x86 or no_cc or (
            None if cpu_has("avx2", "fma", "bmi2", "f16c", "movbe", "avx_vnni") else "this CPU has no AVX-VNNI")),
        "portable": (cc, "x86-64", True, [], not_x86 or no_cc),
        "no-openmp": (cc, "native", False, [], no_cc),
        "arm64": (arm[0], "armv8-a", True, arm[1], arm[2]),
        "arm64-dotprod": (arm[0], "armv8.2-a+dotprod", True, arm[1], arm[2]),
    }


CASES = cases()
# The edit loop (make test-fast) checks the build for this CPU; the other paths are cross builds (and
# ARM64 runs under an emulator), so they are `slow`: make test runs them all.
PARAMS = [pytest.param(name, marks=() if name == "native" else pytest.mark.slow) for name in CASES]
# The vector path each build must report (the harness's `build:` line, from the library itself), and
# the features it must (+) and must not (-) show: proof that the flags reached the compiler.
NATIVE = "neon" if ARM64 else "avx512" if cpu_has("avx512f") else "avx2" if cpu_has("avx2", "fma") else "portable"
EXPECTED = {
    "native": (NATIVE, {"openmp"}, set()),
    "avx2": ("avx2", {"fma", "openmp"}, {"avxvnni"}),
    "avx2-vnni": ("avx2", {"avxvnni", "fma", "openmp"}, set()),
    "portable": ("portable", {"openmp"}, {"fma"}),
    "no-openmp": (NATIVE, {"single-thread"}, {"openmp"}),
    "arm64": ("neon", {"openmp"}, {"dotprod"}),
    "arm64-dotprod": ("neon", {"dotprod", "openmp"}, set()),
}


@functools.lru_cache(maxsize=None)
def has_openmp(compiler: str, out_dir: Path) -> bool:
    """Whether `compiler` builds and links an OpenMP program (Apple's clang does not)."""
    source = out_dir / "omp.c"
    source.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
    done = subprocess.run([compiler, str(source), "-fopenmp", "-o", str(out_dir / "omp")], capture_output=True)
    return done.returncode == 0


def harness_flags(arch: str, openmp: bool) -> list[str]:
    """The flags toolchain.build compiles the library with, for a program instead of a library."""
    flags = [f for f in toolchain.FLAGS if f != "-shared"]
    return [*toolchain.arch_flags(arch), *flags, "-fopenmp" if openmp else "-fopenmp-simd", "-lm"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The harness program of one case (built once per module run)."""
    built, out_dir = {}, tmp_path_factory.mktemp("harness")

    def get(name):
        compiler, arch, openmp, runner, why_not = CASES[name]
        if why_not:
            pytest.skip(why_not)
        if openmp and not has_openmp(compiler, out_dir):
            pytest.skip(f"{compiler} has no OpenMP (the no-openmp case runs the same checks)")
        if name not in built:
            program = out_dir / f"harness-{name}"
            done = subprocess.run([compiler, *map(str, SOURCES), "-o", str(program), *harness_flags(arch, openmp)],
                                  capture_output=True, text=True, timeout=600)
            built[name] = (program, done)
        program, done = built[name]
        if done.returncode != 0:
            pytest.fail(f"compiling the harness for {name} failed:\n{done.stderr[-3000:]}")
        return [*runner, str(program)]

    return get


@pytest.fixture(scope="module")
def result(build):
    """The harness's run for one case (run once per module run)."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = run(build(name))
        return done[name]

    return get


def run(command, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # two threads even on one core: the work split runs
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=900, env=env)
    summary = SUMMARY.search(done.stdout)
    assert summary, f"no summary line; exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    return done, int(summary[1]), int(summary[2]), lines


@pytest.mark.parametrize("name", PARAMS)
def test_every_check_passes(result, name):
    done, passed, failed, lines = result(name)
    failures = [line for line in lines if line.startswith("FAIL")]
    assert done.returncode == 0 and failed == 0 and not failures, "\n".join(failures) or done.stderr[-2000:]
    assert passed == sum(line.startswith("PASS") for line in lines) > 50
    build_line = next(line for line in lines if line.startswith("build:"))
    path, features = re.fullmatch(r"build: path=(\S+) features=(.*)", build_line).groups()
    want_path, wanted, unwanted = EXPECTED[name]
    shown = set(features.split())
    assert path == want_path and wanted <= shown and not unwanted & shown, f"{name}: {build_line}"


@pytest.mark.parametrize("name", PARAMS)
def test_chunks_and_shared_prefixes_give_the_whole_prompts_bits(result, name):
    """The harness's check of the paged step that is exact by construction (llama_steps.c, section 3)."""
    lines = result(name)[3]
    assert any(re.match(r"PASS llama_decode: a prompt in 3 chunks.*whole prompt's bits", line) for line in lines)


@pytest.mark.parametrize("name", [p for p in PARAMS if p.values[0] != "native"])
def test_the_w4a8_step_gives_the_same_bits_on_every_path(result, name):
    """The W4A8 step runs one fixed order of float32 operations on every path (kernels.c), so its logits
    and cache are the same bits as the native build's; the harness prints their digest."""
    digest = re.compile(r"^digest of the w4a8 step: ([0-9a-f]{16})$", re.M)
    theirs, ours = (digest.search("\n".join(result(n)[3])) for n in (name, "native"))
    assert theirs and ours and theirs[1] == ours[1], (name, theirs and theirs[1], ours and ours[1])


def test_the_harness_fails_every_check_it_perturbs(build, result):
    """One output of each check corrupted by a realistic bug's amount: every tolerance must catch it."""
    _, passed, failed, _ = result("no-openmp")  # a build every C compiler makes
    done, passed_perturbed, failed_perturbed, lines = run(build("no-openmp"), "--perturb")
    assert done.returncode != 0
    assert (passed_perturbed, failed_perturbed) == (0, passed + failed), [l for l in lines if l.startswith("PASS")]
