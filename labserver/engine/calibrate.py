"""The first start's measurements: the fastest weight format among those that keep float32's tokens
(``--quant auto``), then the fastest thread count for it (unless ``--threads`` says).

No rule of thumb survives two CPUs: on an AVX2 laptop the q4_1 blocks (portable C there) stepped in 81 ms
while float16 took 21 and float32 37; on an AVX-512 one the same blocks take 5-8 ms. So at the first start
each candidate of the registry (``formats.auto_candidates``: q4_1, fp16, none) is built once from the
loaded weights, decodes a fixed prompt greedily, and is timed (the best of its decode steps). A route
whose tokens differ from float32's is excluded, whatever its speed: auto never trades exactness. The
fastest remaining one wins, and the result is kept in ``<cache_dir>/routes/<key>.json``, the key naming
the CPU (model and flags), the kernel library, the model's files, torch and the thread count; later
starts read it and build only the winner. Delete the file to measure again.

>>> rank({"q4_1": Trial(81.0, True), "fp16": Trial(20.6, True), "none": Trial(36.5, True)})
'fp16'
>>> rank({"q4_1": Trial(None, False, "no C compiler"), "fp16": Trial(5.0, False, "tokens differ"),
...       "none": Trial(36.5, True)})
'none'

Threads: a laptop's 8 or 10 cores are not 2, and no rule says how many a step wants (a decode step reads
the weights and stops gaining once memory is saturated; a prefill computes and gains from every core). So
the served route is timed at the machine's physical cores (``config.physical_cores``), all but one (a core
left to the event loop and the rest of the process) and half of them: a prefill of a fixed prompt and a
few decode steps each, in turns. The fastest decode step wins, since every token of every stream pays it;
prefill decides only between counts whose decode steps are within ``DECODE_TIE`` (5%) of the fastest, which
the noise of a shared machine cannot tell apart; then fewer threads. The choice is kept in
``<cache_dir>/threads/<key>.json`` like the route's. ``--threads N`` (``LABSERVER_THREADS``) measures
nothing. On a 2-core machine the counts are 2 and 1.

>>> pick_threads({8: ThreadTrial(5.0, 40.0), 7: ThreadTrial(5.1, 44.0), 4: ThreadTrial(6.5, 70.0)})
8
>>> pick_threads({8: ThreadTrial(5.2, 40.0), 7: ThreadTrial(5.0, 44.0), 4: ThreadTrial(6.5, 70.0)})
8
>>> pick_threads({8: ThreadTrial(7.0, 40.0), 7: ThreadTrial(5.0, 44.0), 4: ThreadTrial(5.1, 70.0)})
7

Left out: batches (the ranking is of one sequence's step; the rank of 8-row steps can differ), routes
that change the tokens (w4a8, bfloat16, int8, int4: opt-in, ``make bench`` prints their agreement),
re-measuring when the machine was busy at the first start (the files keep what was measured), and every
route at every thread count (the routes are ranked at the physical cores, then the winner's count chosen).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..config import EngineConfig, physical_cores
from ..model import formats, kernels
from .threads import ThreadTrial, measure_threads, pick_threads, thread_candidates, threads_why

PROMPT_TOKENS, STEPS = 12, 16  # a fixed prompt, then greedy steps: the check and the first timing
ROUNDS = 3  # timings of each route that agrees, in turns; its best step counts
VERSION = 1  # of the measurement; a change measures again
THREADS_VERSION = 1


@dataclass(frozen=True)
class Trial:
    ms: float | None  # best decode step in milliseconds; None: not run
    agrees: bool  # its greedy tokens equal float32's
    why_not: str = ""  # why it cannot be chosen


@dataclass(frozen=True)
class Route:
    """The weight format that runs and why: ``to_dict()`` is what ``Engine.route`` shows (``/health``)."""

    quant: str
    why: str
    measured_ms: dict[str, float] = field(default_factory=dict)  # route -> best decode step, this CPU
    excluded: dict[str, str] = field(default_factory=dict)  # route -> why auto may not pick it
    threads: int | None = None  # None until chosen (``choose``, or ``settle_threads`` for other runners)
    threads_why: str = ""  # "4 threads: fastest decode of 8/7/4 measured now (...)", "--threads 2 asked for"

    def to_dict(self) -> dict:
        return {"quant": self.quant, "why": self.why, "measured_ms": dict(self.measured_ms),
                "excluded": dict(self.excluded), "threads": self.threads, "threads_why": self.threads_why}


def rank(trials: dict[str, Trial]) -> str | None:
    """The fastest route whose tokens agree (ties: the first in ``trials``); None if none agrees."""
    ok = [name for name, t in trials.items() if t.agrees and t.ms is not None]
    return min(ok, key=lambda name: trials[name].ms) if ok else None


def summary(measured_ms: dict[str, float], excluded: dict[str, str]) -> str:
    """``"q4_1 7.9 ms/step; fp16 20.1; none 35.8"``, fastest first, then what was excluded and why."""
    items = sorted(measured_ms.items(), key=lambda kv: kv[1])
    text = "; ".join(f"{n} {ms:.1f}" + (" ms/step" if i == 0 else "") for i, (n, ms) in enumerate(items))
    return text + "".join(f"; {n} excluded: {why}" for n, why in excluded.items())


def greedy_trial(lean, steps: int) -> tuple[list[int], float]:
    """Greedy tokens of a fixed prompt on ``lean`` (in the first blocks of its pool), and its best decode
    step in ms."""
    prompt = torch.randint(0, lean.vocab, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = max(1, min(steps, lean.max_len - PROMPT_TOKENS - 1))
    table = list(range(lean.cache.blocks_for(PROMPT_TOKENS + steps)))
    tokens, best = [int(lean.prefill(prompt, table).argmax())], float("inf")
    for position in range(PROMPT_TOKENS, PROMPT_TOKENS + steps):
        start = time.perf_counter()
        logits = lean.decode([tokens[-1]], [position], [table])
        best = min(best, time.perf_counter() - start)
        tokens.append(int(logits[0].argmax()))
    return tokens, best * 1000


def measure(build: Callable[[str], object], trial=greedy_trial) -> tuple[dict[str, Trial], object | None]:
    """Build and check every candidate (float32 first: the reference), time those that agree in turns,
    and return the trials and the winner's model, kept so that the engine need not build it again."""
    ok, no_kernels = kernels.available()
    order = [f.name for f in formats.auto_candidates()]
    trials, models, reference = {}, {}, None
    for name in ["none"] + [n for n in order if n != "none"]:
        if formats.get(name).needs_compiler and not ok:
            trials[name] = Trial(None, False, f"no C kernels: {no_kernels}")
            continue
        try:
            lean = build(name)
        except RuntimeError as exc:  # e.g. the kernels failed to load: that route is not available here
            trials[name] = Trial(None, False, f"failed to build: {exc}")
            continue
        tokens, ms = trial(lean, STEPS)
        reference = tokens if reference is None else reference
        differ = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
        trials[name] = Trial(ms, differ is None, "" if differ is None else
                             f"greedy tokens differ from float32's at step {differ}")
        if differ is None:
            models[name] = lean
        del lean
    # Timed again in turns: a load that comes and goes (other processes) then weighs on every route alike.
    # Only contenders stay: a route at twice the fastest one's step wins only if a passing load doubled it.
    fastest = min((trials[n].ms for n in models), default=0.0)
    models = {n: lean for n, lean in models.items() if trials[n].ms < 2 * fastest}
    for _ in range(ROUNDS - 1):
        for name, lean in models.items():
            trials[name] = replace(trials[name], ms=min(trials[name].ms, trial(lean, STEPS // 2)[1]))
    trials = {n: trials[n] for n in order if n in trials}  # the registry's order breaks ties
    return trials, models.get(rank(trials))


def cpu_identity() -> str:
    """The CPU's model name and feature flags (what a measurement and ``-march=native`` depend on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(next(x for x in lines if x.startswith(k)) for k in ("model name", "flags"))
    except (OSError, StopIteration):
        return f"{platform.machine()}|{platform.processor()}"


def model_identity(model) -> str | None:
    """The model's weight files (paths, sizes, times), or None for a model that has no folder on disk."""
    folder = getattr(model, "folder", None) or getattr(model.config, "name_or_path", None)
    files = sorted(Path(folder).glob("*.safetensors")) if folder and Path(folder).is_dir() else []
    if not files:
        return None
    return "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def route_key(model, config: EngineConfig) -> dict | None:
    """What a measurement depends on; None when the model cannot be named (measured at every start)."""
    identity = model_identity(model)
    if identity is None:
        return None
    ok, why = kernels.available()
    return {"version": VERSION, "cpu": cpu_identity(), "kernels": kernels.library_file() if ok else f"none: {why}",
            "model": identity, "torch": torch.__version__, "threads": config.threads or physical_cores(),
            "candidates": [f.name for f in formats.auto_candidates()]}


def cache_path(config: EngineConfig, key: dict, folder: str = "routes") -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(config.cache_dir) / folder / f"{digest}.json"


def _read(path: Path, key: dict) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("key") == key else None


def _write(path: Path, key: dict, values: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, **values, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime())}, indent=1))
        tmp.replace(path)  # readers see the whole file or none
    except OSError:  # a read-only cache costs a measurement at the next start, nothing more
        pass


def choose_route(model, config: EngineConfig, build: Callable[[str], object], trial=greedy_trial):
    """``(Route, model or None)`` for ``config.quant``; the model is auto's winner when it was built here.

    ``build(quant)`` makes a ``LeanLlama`` of ``model`` in that format, its pool holding one sequence.
    """
    if config.quant != "auto":
        return Route(config.quant, f"--quant {config.quant} asked for"), None
    if config.dtype != "float32":
        return Route("none", f"--quant auto keeps --dtype {config.dtype} (it measures float32 routes only)"), None
    key = route_key(model, config)
    path = cache_path(config, key) if key else None
    saved = _read(path, key) if path else None
    if saved is not None and saved.get("quant") in formats.FORMATS:
        measured, excluded = saved["measured_ms"], saved["excluded"]
        why = f"fastest with float32's tokens, measured at a first start: {summary(measured, excluded)} ({path})"
        return Route(saved["quant"], why, measured, excluded), None
    trials, kept = measure(build, trial)
    best = rank(trials)
    if best is None:  # float32 agrees with itself: only a failure to build every route gets here
        raise RuntimeError(f"no weight format could be built here: {trials}")
    measured = {n: round(t.ms, 2) for n, t in trials.items() if t.ms is not None}
    excluded = {n: t.why_not for n, t in trials.items() if t.why_not}
    why = f"fastest with float32's tokens, measured now: {summary(measured, excluded)}"
    route = Route(best, why, measured, excluded)
    if path is not None:
        _write(path, key, {k: v for k, v in route.to_dict().items() if not k.startswith("threads")})
    return route, kept


# -- threads: measured by ``threads.py``, chosen and cached here -----------------------------------
def thread_key(model, config: EngineConfig, quant: str, candidates: list[int]) -> dict | None:
    """What the thread count's measurement depends on; None when the model cannot be named."""
    identity = model_identity(model)
    if identity is None:
        return None
    ok, why = kernels.available()
    return {"version": THREADS_VERSION, "cpu": cpu_identity(), "kernels": kernels.library_file() if ok else "none",
            "model": identity, "torch": torch.__version__, "quant": quant, "dtype": config.dtype,
            "candidates": candidates}


def choose_threads(model, config: EngineConfig, quant: str, build: Callable[[str], object], lean=None,
                   timing=None):
    """``(threads, why, model or None)``: ``config.threads`` as asked, else the cached choice, else measured
    on ``lean`` (built here if None, and returned so that the engine need not build it again)."""
    if config.threads is not None:
        return config.threads, f"--threads {config.threads} asked for", lean
    candidates = thread_candidates(physical_cores())
    if len(candidates) == 1:
        return 1, "1 thread: this process may use one core", lean
    key = thread_key(model, config, quant, candidates)
    path = cache_path(config, key, "threads") if key else None
    saved = _read(path, key) if path else None
    if saved is not None and saved.get("threads") in candidates:
        trials = {int(n): ThreadTrial(*t) for n, t in saved["trials"].items()}
        return saved["threads"], f"{threads_why(trials, saved['threads'], 'at a first start')} ({path})", lean
    lean = lean if lean is not None else build(quant)
    trials = measure_threads(lean, candidates, timing)
    chosen = pick_threads(trials)
    if path is not None:
        _write(path, key, {"threads": chosen, "trials": {n: [t.decode_ms, t.prefill_ms] for n, t in trials.items()}})
    return chosen, threads_why(trials, chosen, "now"), lean


def settle_threads(route: Route, config: EngineConfig) -> Route:
    """``route`` with its thread count: as ``choose`` measured it, else as asked, else the physical cores
    (the transformers and fake runners are not measured)."""
    if route.threads is not None:
        return route
    if config.threads is not None:
        return replace(route, threads=config.threads, threads_why=f"--threads {config.threads} asked for")
    n = physical_cores()
    return replace(route, threads=n, threads_why=f"{n} thread{'s' * (n != 1)}: the physical cores this process may "
                                                  "use (counts are measured for the lean runner only)")


def kernels_note(quant: str) -> str:
    """What the C kernels' build gave up, for a route that runs on them ("" when nothing)."""
    ok, how = kernels.available()
    return f"; C kernels {how}" if ok and how and formats.get(quant).needs_compiler else ""


def choose(model, config: EngineConfig, build: Callable[[str], object], trial=greedy_trial, timing=None):
    """``(Route, model or None)`` for ``config``: the weight format (``choose_route``) and the thread count
    (``choose_threads``); the model is one built here for a measurement, with one cache slot.

    ``build(quant)`` makes a ``LeanLlama`` of ``model`` in that format, with one cache slot. The routes are
    timed at ``config.threads``, or at the physical cores when the count is measured after them.
    """
    before = torch.get_num_threads()  # per calling thread: put back for a caller that keeps running
    try:
        torch.set_num_threads(config.threads or physical_cores())
        route, kept = choose_route(model, config, build, trial)
        threads, why, kept = choose_threads(model, config, route.quant, build, kept, timing)
    finally:
        torch.set_num_threads(before)
    return replace(route, why=route.why + kernels_note(route.quant), threads=threads, threads_why=why), kept
