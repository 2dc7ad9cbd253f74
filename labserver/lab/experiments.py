"""Measurements and demonstrations for the lab notebooks: what a cell would need more than a few lines for.

Each function runs one experiment against the real engine or a running server and returns plain data
(``Run``, ``TrapResult``, ``CancelRun``, ``Load``) that the ``plot_*`` and ``*_table`` functions draw.

    >>> try_stream(sentinel_stream, lambda: iter("abc")).outcome
    'completed'
    >>> try_stream(seed_stream, lambda: iter("abc"), timeout_s=0.3).outcome  # the seed's loop never returns
    'hung'

Everything that needs its own event loop (the trap, the heartbeat) runs it on a helper thread, so it
works the same in a script and in a Jupyter kernel, whose loop is already running (no nest_asyncio).
Left out: anything the server itself uses; the server never imports this module.
"""
from __future__ import annotations

import asyncio
import inspect
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx

from ..measure.bench import format_table
from ..measure.client import DEFAULT_PROMPT, blocking_generate, run_concurrent, stream_generate
from ..measure.probes import HealthProbe
from ..measure.stats import percentiles, summarize
from ..measure.trace import Trace
from ..config import SamplingParams
from ..engine.engine import collect
from ..measure.plotting import LabFigure

PROMPT = DEFAULT_PROMPT
DONE = object()  # the sentinel of `sentinel_stream`

# One colour per way of serving, the same in every notebook.
COLORS = {"flask": "tab:red", "blocking": "tab:orange", "executor": "tab:purple", "thread": "tab:blue"}
LABELS = {"flask": "Flask (WSGI)", "blocking": "async, engine on the loop", "executor": "run_in_executor(next)",
          "thread": "engine thread"}


def _in_thread(fn: Callable[[], Any], name: str = "labserver-lab") -> Any:
    """Run ``fn`` on a fresh thread and return its result: a place for a new event loop or clean torch state."""
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        return pool.submit(fn).result()


def show_source(obj) -> None:
    """Print the source of a function, so a notebook shows the code it is about to run."""
    print(inspect.getsource(obj).rstrip())


def _cell(value):
    return ("yes" if value else "no") if isinstance(value, bool) else value


def print_table(rows: Sequence[Mapping[str, Any]]) -> None:
    """A list of dicts with the same keys, as an aligned text table (booleans as yes/no)."""
    if rows:
        print(format_table(list(rows[0]), [[_cell(v) for v in r.values()] for r in rows]))


def compare_table(traces_by_label: Mapping[str, Sequence[Trace]]) -> str:
    """Medians over repeated runs: TTFT, E2E and tokens/s per way of serving, and TTFT relative to the first."""
    rows, first = [], None
    for label, traces in traces_by_label.items():
        s = summarize(traces)
        first = first or s["p50_ttft_ms"]
        rows.append([label, len(traces), s["p50_ttft_ms"], s["p50_e2e_ms"],
                     median(t.tokens_per_s for t in traces), s["p50_ttft_ms"] / first])
    return format_table(["server", "runs", "TTFT p50 ms", "E2E p50 ms", "tokens/s", "TTFT vs first"], rows)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- one request, measured ------------------------------------------------------------------------------
@dataclass
class Run:
    """One request's ``Trace``, the ``/health`` probe that ran during it, and the threads that ran its steps."""
    label: str
    trace: Trace
    probe: HealthProbe
    threads: list[str] = field(default_factory=list)
    torch_threads_before: int | None = None  # threads that had run a generation in this process before it

    @property
    def step_p50_ms(self) -> float | None:
        return median(self.trace.decode_step_ms)

    def row(self) -> dict:
        health = self.probe.summary()
        return {"variant": self.label, "TTFT ms": self.trace.ttft_ms, "E2E ms": self.trace.e2e_ms,
                "step p50 ms": self.step_p50_ms, "ITL p50 ms": median(self.trace.itl_ms),
                "/health p50 ms": health["p50_ms"], "/health max ms": health["max_ms"],
                "step threads": len(set(self.threads)) or None, "torch threads before": self.torch_threads_before}


def measure(url: str, prompt: str = PROMPT, max_tokens: int = 32, *, stream: bool = True, label: str = "",
            interval_ms: float = 20.0, recorder: "ThreadRecorder | None" = None) -> Run:
    """Warm up, then send one greedy request while ``/health`` is probed every ``interval_ms``.

    ``stream=False`` sends a blocking request (the Flask baseline). With a ``recorder`` wrapped around the
    server's engine, ``Run.threads`` names the threads that ran each step of this request.
    """
    send = stream_generate if stream else blocking_generate
    send(url, prompt, 2, 0.0)  # warm-up: the first connection and the first steps on the serving thread
    before = len(recorder.threads()) if recorder else None
    with HealthProbe(url, interval_ms=interval_ms) as probe:
        trace = send(url, prompt, max_tokens, 0.0)
    if not trace.ok:
        raise RuntimeError(f"the request to {url} failed: {trace.error}")
    threads = list(recorder.generations[-1]) if recorder and recorder.generations else []
    return Run(label or url, trace, probe, threads, before)


def runs_table(runs: Mapping[str, Run]) -> str:
    rows = [run.row() for run in runs.values()]
    return format_table(list(rows[0]), [list(r.values()) for r in rows])


def plot_runs(runs: Mapping[str, Run]) -> LabFigure:
    """Left: /health latency over time (log scale). Right: server step_ms per token, for each variant."""
    fig = LabFigure(figsize=(11, 3.8), layout="constrained")
    health, steps = fig.subplots(1, 2)
    for kind, run in runs.items():
        color, label = COLORS.get(kind), LABELS.get(kind, run.label)
        if run.probe.samples:
            t_s = [t / 1000 for t, _ in run.probe.samples]
            health.plot(t_s, [max(lat, 0.1) for _, lat in run.probe.samples], ".-", color=color, label=label)
        steps.plot(range(1, run.trace.n_tokens), run.trace.decode_step_ms, ".-", color=color,
                   label=f"{label} (p50 {run.step_p50_ms:.0f} ms)")
    health.set(yscale="log", xlabel="probe sent at (s)", ylabel="/health latency (ms)",
               title="/health while one request generates")
    steps.set(xlabel="token index", ylabel="server step_ms", title="Per-token decode step on the server",
              ylim=(0, None))
    health.legend(fontsize=8)
    steps.legend(fontsize=8)
    return fig


# -- what the engine computes vs what the client receives ------------------------------------------------
def plot_engine_steps(completion) -> LabFigure:
    """The engine's own clock: one bar per token (the prefill first), and the running total."""
    steps = [e.step_ms for e in completion.events]
    fig = LabFigure(figsize=(10, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(steps)), steps, color=["tab:orange"] + ["tab:blue"] * (len(steps) - 1))
    ax.set(xlabel="token index (0 = prefill + first token)", ylabel="step_ms",
           title=f"{len(steps)} tokens: prefill {steps[0]:.0f} ms, then decode steps of "
                 f"~{median(steps[1:]) or 0:.0f} ms; total {sum(steps):.0f} ms")
    return fig


def produced_trace(trace: Trace) -> Trace:
    """When the server had each token ready: the running sum of its step_ms (its clock, not the client's)."""
    done, total = [], 0.0
    for step in trace.step_ms:
        total += step or 0.0
        done.append(total)
    return Trace(prompt=trace.prompt, arrival_ms=done, tokens=list(trace.tokens))


def plot_arrivals(traces_by_label: Mapping[str, Trace], title: str = "Tokens received over time") -> LabFigure:
    """Tokens received so far against time for each trace: a staircase when streaming, a cliff when not."""
    fig = LabFigure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, trace) in enumerate(traces_by_label.items()):
        t_s = [0.0] + [t / 1000 for t in trace.arrival_ms]
        ax.step(t_s, range(len(t_s)), where="post", color=f"C{i}", linewidth=2 if i == 0 else 1.5, label=label)
    ax.set(xlabel="s after the request was sent", ylabel="tokens", title=title)
    ax.legend(loc="upper left", fontsize=8)
    return fig


# -- raw SSE ---------------------------------------------------------------------------------------------
def raw_sse(url: str, prompt: str = PROMPT, max_tokens: int = 6, *, show: bool = True,
            width: int = 150) -> list[tuple[float, str]]:
    """Stream one greedy request and return each raw line with its arrival time, as ``curl -N`` shows them.

    With ``show`` the status, the content type and every line are printed as they arrive (long lines cut
    at ``width``); the blank lines are the SSE event separators.
    """
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    lines = []
    with httpx.Client(timeout=120) as http:
        start = time.perf_counter()
        with http.stream("POST", url.rstrip("/") + "/generate", json=body) as response:
            if show:
                print(f"HTTP {response.status_code}  content-type: {response.headers.get('content-type')}")
            for line in response.iter_lines():
                t_ms = (time.perf_counter() - start) * 1000
                lines.append((t_ms, line))
                if show:
                    text = line if len(line) <= width else line[:width - 3] + "..."
                    print(f"{t_ms:7.1f} ms | {text}")
    return lines


# -- the event loop --------------------------------------------------------------------------------------
def heartbeat_gaps(work: Callable[[], Any], offload: bool, interval_ms: float = 5.0) -> list[float]:
    """Gaps (ms) between the beats of a coroutine that wakes every ``interval_ms``, while ``work()`` runs.

    ``offload=False`` calls ``work()`` inside a coroutine on the loop (what the naive server does);
    ``offload=True`` awaits it in a worker thread (``asyncio.to_thread``). A beat that is late by hundreds
    of ms means the loop could answer nobody during that time. Runs on a fresh loop in a helper thread.
    """
    async def main():
        beats, running = [], True

        async def heartbeat():
            while True:
                beats.append(time.perf_counter())  # one beat after the work, too: the last gap counts
                if not running:
                    return
                await asyncio.sleep(interval_ms / 1000)

        async def job():
            if offload:
                return await asyncio.to_thread(work)
            return work()

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(3 * interval_ms / 1000)  # the heartbeat is going before the work starts
        await job()
        running = False
        await beat
        return [(b - a) * 1000 for a, b in zip(beats, beats[1:])]

    return _in_thread(lambda: asyncio.run(main()))


# -- the seed's StopIteration trap -----------------------------------------------------------------------
async def seed_stream(gen):
    """The seed's loop: each next(gen) in the default thread pool, stop on StopIteration."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            item = await loop.run_in_executor(None, next, gen)
        except StopIteration:  # never reached: asyncio cannot put a StopIteration into a Future
            break
        yield item


async def sentinel_stream(gen):
    """The fix: next(gen, DONE) returns a sentinel at the end instead of raising StopIteration."""
    loop = asyncio.get_running_loop()
    while (item := await loop.run_in_executor(None, next, gen, DONE)) is not DONE:
        yield item


@dataclass
class TrapResult:
    outcome: str                  # "completed", "hung" (timed out) or "error"
    items: list = field(default_factory=list)
    elapsed_s: float = 0.0
    asyncio_errors: list[str] = field(default_factory=list)  # what the loop's exception handler saw
    error: str | None = None

    def __str__(self) -> str:
        said = f"; asyncio logged: {self.asyncio_errors[0]}" if self.asyncio_errors else ""
        failed = f"; raised {self.error}" if self.error else ""
        return f"{self.outcome} after {self.elapsed_s:.2f} s with {len(self.items)} items{said}{failed}"


def try_stream(stream: Callable[[Any], Any], make_gen: Callable[[], Iterator], timeout_s: float = 2.0) -> TrapResult:
    """Consume ``stream(make_gen())`` (an async generator function) on a fresh loop, for at most ``timeout_s``.

    It can never hang the caller: the loop runs on a helper thread and ``asyncio.wait_for`` gives up after
    ``timeout_s``. Errors the loop swallows (raised in callbacks, where no ``await`` sees them) are collected.
    """
    result = TrapResult("hung")

    async def consume():
        async for item in stream(make_gen()):
            result.items.append(item)

    async def main():
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, ctx: result.asyncio_errors.append(repr(ctx.get("exception") or ctx["message"])))
        try:
            await asyncio.wait_for(consume(), timeout_s)
            result.outcome = "completed"
        except asyncio.TimeoutError:
            result.outcome = "hung"
        except Exception as exc:
            result.outcome, result.error = "error", repr(exc)

    start = time.perf_counter()
    _in_thread(lambda: asyncio.run(main()), name="labserver-trap")
    result.elapsed_s = time.perf_counter() - start
    return result


# -- grad mode is thread-local ---------------------------------------------------------------------------
def seed_style_stream(engine, prompt: str = PROMPT, steps: int = 6):
    """A generator the way the seed wrote it: the whole loop inside one ``with torch.inference_mode()``.

    Yields, per decode step, which thread ran it, whether inference mode / grad mode were on there, whether
    autograd recorded a graph for the logits, and the step's time.
    """
    import torch
    from transformers import DynamicCache

    ids = engine.encode(prompt)
    with torch.inference_mode():
        cache = DynamicCache(config=engine.model.config)
        logits = engine.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            token = int(logits[0, -1].argmax())
            logits = engine.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
            yield {"step": step, "thread": threading.current_thread().name,
                   "inference_mode": torch.is_inference_mode_enabled(), "grad_enabled": torch.is_grad_enabled(),
                   "graph_recorded": logits.requires_grad, "step_ms": round((time.perf_counter() - t0) * 1000, 1)}


@dataclass
class InferenceModeDemo:
    steps: list[dict]                 # one row per decode step
    left_in_inference_mode: dict      # thread -> in inference mode while the generator waits between steps?


def inference_mode_steps(engine, prompt: str = PROMPT, steps: int = 6, hop: bool = True) -> InferenceModeDemo:
    """Drive ``seed_style_stream`` with ``next()`` calls sent to worker threads, as ``run_in_executor`` does.

    ``hop=True`` alternates between two single-thread pools, one way a shared pool hands out its threads
    (``run_in_executor`` promises no particular thread); ``hop=False`` keeps every step on one thread.
    An error inside a step ends the demo and is recorded in that step's row.
    """
    import torch

    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"pool-{i}") for i in range(2 if hop else 1)]
    gen = seed_style_stream(engine, prompt, steps)
    rows = []
    try:
        for i in range(steps):
            try:
                rows.append(pools[i % len(pools)].submit(next, gen).result())
            except Exception as exc:
                rows.append({"step": i + 1, "error": f"{type(exc).__name__}: {exc}"[:120]})
                break
        left = {f"pool-{i}_0": pool.submit(torch.is_inference_mode_enabled).result() for i, pool in enumerate(pools)}
    finally:
        pools[0].submit(gen.close).result()
        for pool in pools:
            pool.shutdown()
    return InferenceModeDemo(rows, left)


class ThreadRecorder:
    """Wraps an engine and records, for each generation, the name of the thread that ran each step.

    Pass it to ``start_fastapi``/``start_flask`` instead of the engine; everything else is forwarded.
    """

    def __init__(self, engine):
        self._engine = engine
        self.generations: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def threads(self) -> set[str]:
        """Every thread that has run a step of any generation so far."""
        return {name for names in self.generations for name in names}

    def generate_stream(self, prompt, params: SamplingParams, cancel=None):
        inner = self._engine.generate_stream(prompt, params, cancel)
        names: list[str] = []
        self.generations.append(names)

        def steps():
            try:
                while True:
                    names.append(threading.current_thread().name)
                    item = next(inner, DONE)
                    if item is DONE:
                        return
                    yield item
            finally:
                inner.close()

        return steps()

    def generate(self, prompt, params: SamplingParams):
        return collect(self.generate_stream(prompt, params))


# -- cancellation ----------------------------------------------------------------------------------------
@dataclass
class CancelRun:
    """One request whose client leaves early, and what the engine did meanwhile (times in ms from the send)."""
    label: str
    received: int                  # token events the client read before leaving
    generated: int                 # tokens the engine computed for this request
    hangup_ms: float               # when the client left
    idle_ms: float | None          # when the engine had no running generation any more
    samples: list[tuple[float, int, int]]  # (t_ms, tokens generated so far, running generations)
    arrival_ms: list[float] = field(default_factory=list)

    @property
    def wasted(self) -> int:
        return self.generated - self.received

    def row(self) -> dict:
        after = None if self.idle_ms is None else self.idle_ms - self.hangup_ms
        return {"request": self.label, "received": self.received, "generated": self.generated,
                "wasted": self.wasted, "left at ms": self.hangup_ms, "engine idle ms after": after}


class _Watcher:
    """Samples the engine's counters every ``interval_ms`` on its own thread."""

    def __init__(self, engine, interval_ms: float = 5.0):
        self.engine, self.interval_s = engine, interval_ms / 1000
        self.start_s = time.perf_counter()
        self.base = engine.tokens_generated
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labserver-watch", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(((time.perf_counter() - self.start_s) * 1000,
                                 self.engine.tokens_generated - self.base, self.engine.running))
            self._stop.wait(self.interval_s)

    def now_ms(self) -> float:
        return (time.perf_counter() - self.start_s) * 1000

    def stop(self):
        self._stop.set()
        self._thread.join()


def wait_idle(engine, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.005)


def hang_up(engine, url: str, *, stream: bool = True, after_tokens: int = 5, after_s: float = 0.5,
            max_tokens: int = 64, prompt: str = PROMPT, label: str = "", linger_s: float = 0.3) -> CancelRun:
    """Send one greedy request and leave early; watch the engine's counters until it is idle again.

    Streaming: read ``after_tokens`` token events, then close the connection. Not streaming: give up after
    ``after_s`` seconds (a client timeout). The server runs on ``engine`` (the same object, so its counters
    are exact). Waits for the engine to be idle, then ``linger_s`` more, so a generation that kept going
    would show.
    """
    wait_idle(engine)
    watch = _Watcher(engine)
    arrival: list[float] = []
    if stream:
        trace = stream_generate(url, prompt, max_tokens, 0.0, stop_after=after_tokens)
        offset = (trace.sent_s - watch.start_s) * 1000
        arrival = [offset + t for t in trace.arrival_ms]
    else:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        try:
            httpx.post(url.rstrip("/") + "/generate", json=body, timeout=httpx.Timeout(after_s, connect=10))
        except httpx.TimeoutException:
            pass
    hangup_ms = watch.now_ms()
    wait_idle(engine)
    idle_ms = watch.now_ms() if engine.running == 0 else None
    time.sleep(linger_s)
    watch.stop()
    return CancelRun(label or ("stream" if stream else "blocking"), len(arrival),
                     watch.samples[-1][1] if watch.samples else 0, hangup_ms, idle_ms, watch.samples, arrival)


def plot_cancel(runs: Sequence[CancelRun]) -> LabFigure:
    """Per request: tokens the engine computed vs tokens the client received, and when the client left."""
    fig = LabFigure(figsize=(4 * len(runs), 3.4), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        t_s = [t / 1000 for t, _, _ in run.samples]
        ax.plot(t_s, [n for _, n, _ in run.samples], color="tab:gray", linewidth=2, label="computed by the engine")
        ax.step([0.0] + [t / 1000 for t in run.arrival_ms], range(run.received + 1), where="post",
                color="tab:blue", label="received by the client")
        ax.axvline(run.hangup_ms / 1000, color="tab:red", linestyle="--", label="client left")
        ax.set(title=f"{run.label}: {run.wasted} tokens for nobody", xlabel="s after the request was sent",
               ylabel="tokens")
        ax.legend(fontsize=7, loc="center right")
    return fig


# -- concurrency -----------------------------------------------------------------------------------------
@dataclass
class Load:
    """``n`` streams sent at once, and the ``/health`` probe that ran meanwhile."""
    n: int
    traces: list[Trace]
    probe: HealthProbe

    @property
    def wall_ms(self) -> float:
        start = min(t.sent_s for t in self.traces)
        return max((t.sent_s - start) * 1000 + (t.e2e_ms or 0) for t in self.traces)

    @property
    def tokens_per_s(self) -> float:
        return 1000 * sum(t.n_tokens for t in self.traces) / self.wall_ms

    def row(self) -> dict:
        ttft = [t.ttft_ms for t in self.traces]
        itl = percentiles([g for t in self.traces for g in t.itl_ms])
        step = percentiles([s for t in self.traces for s in t.decode_step_ms])
        health = self.probe.summary()
        return {"N": self.n, "TTFT min ms": min(ttft), "TTFT max ms": max(ttft), "ITL p50 ms": itl[50],
                "ITL p90 ms": itl[90], "step p50 ms": step[50], "tokens/s (all)": self.tokens_per_s,
                "/health p50 ms": health["p50_ms"], "/health p99 ms": health["p99_ms"]}


def sweep(url: str, ns: Sequence[int] = (1, 2, 4, 8), max_tokens: int = 32, prompt: str = PROMPT,
          interval_ms: float = 20.0) -> list[Load]:
    """For each N: N greedy streams at once (``run_concurrent``) while ``/health`` is probed."""
    run_concurrent(url, 1, prompt=prompt, max_tokens=2, temperature=0.0)  # warm-up, the same path as below
    loads = []
    for n in ns:
        with HealthProbe(url, interval_ms=interval_ms) as probe:
            traces = run_concurrent(url, n, prompt=prompt, max_tokens=max_tokens, temperature=0.0)
        failed = [t.error for t in traces if not t.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} streams failed: {failed[0]}")
        loads.append(Load(n, traces, probe))
    return loads


def sweep_table(loads: Sequence[Load]) -> str:
    rows = [load.row() for load in loads]
    return format_table(list(rows[0]), [list(r.values()) for r in rows])


def plot_streams(load: Load, title: str | None = None) -> LabFigure:
    """Each of the N streams: tokens received over time (s from the first send)."""
    start = min(t.sent_s for t in load.traces)
    fig = LabFigure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, trace in enumerate(load.traces):
        offset = (trace.sent_s - start)
        t_s = [offset] + [offset + t / 1000 for t in trace.arrival_ms]
        ax.step(t_s, range(len(t_s)), where="post", label=f"stream {i}")
    ax.set(xlabel="s after the first request was sent", ylabel="tokens received",
           title=title or f"{load.n} streams at once share one engine thread")
    ax.legend(fontsize=7, ncols=2, loc="upper left")
    return fig


SWEEP_COLORS = ("tab:blue", "tab:green", "tab:orange", "tab:purple")


def plot_sweep(sweeps: Mapping[str, Sequence[Load]] | Sequence[Load]) -> LabFigure:
    """TTFT per stream, ITL, aggregate tokens/s and /health latency against N, one colour per server."""
    if not isinstance(sweeps, Mapping):
        sweeps = {"server": sweeps}
    fig = LabFigure(figsize=(11, 6.4), layout="constrained")
    (ttft, itl), (tput, health) = fig.subplots(2, 2)
    for (label, loads), color in zip(sweeps.items(), SWEEP_COLORS):
        ns = [load.n for load in loads]
        for load in loads:
            ttft.plot([load.n] * load.n, [t.ttft_ms for t in load.traces], "o", color=color, alpha=0.4)
        ttft.plot(ns, [median(t.ttft_ms for t in load.traces) for load in loads], "-", color=color, label=label)
        itl.plot(ns, [percentiles([g for t in load.traces for g in t.itl_ms])[50] for load in loads], "o-",
                 color=color, label=f"{label}: client ITL p50")
        itl.plot(ns, [median(s for t in load.traces for s in t.decode_step_ms) for load in loads], "^:",
                 color=color, label=f"{label}: server step_ms p50")
        tput.plot(ns, [load.tokens_per_s for load in loads], "o-", color=color, label=label)
        for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            health.plot(ns, [load.probe.summary()[key] for load in loads], style, color=color,
                        label=f"{label}: {key[:3]}")
    ttft.set(title="TTFT of each stream (dots) and the median", ylabel="ms", ylim=(0, None))
    itl.set(title="Gap between a stream's tokens", ylabel="ms", ylim=(0, None))
    tput.set(title="Tokens per second, all streams together", ylabel="tokens/s", ylim=(0, None))
    health.set(title="/health latency under load", ylabel="ms", ylim=(0, None))
    for ax in (ttft, itl, tput, health):
        ax.set_xlabel("N concurrent streams")
        ax.set_xticks(sorted({load.n for loads in sweeps.values() for load in loads}))
        ax.legend(fontsize=7)
    return fig


def step_ms_by_batch(loads: Sequence[Load]) -> dict[int, float]:
    """Median server ``step_ms`` of the decode steps that carried B sequences, for each B seen.

    Read from the events of the batched scheduler, which say how many sequences shared each step.
    """
    steps: dict[int, list[float]] = {}
    for load in loads:
        for trace in load.traces:
            for batch, step in zip(trace.batch[1:], trace.step_ms[1:]):
                if batch and step is not None:
                    steps.setdefault(batch, []).append(step)
    return {b: round(statistics.median(v), 2) for b, v in sorted(steps.items())}
