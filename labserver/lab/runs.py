"""One request measured while /health is probed, for notebooks 3 and 4: `measure` returns a `Run`,
`runs_table` and `plot_runs` compare several ways of serving side by side; a `ThreadRecorder` around
the engine names the threads that ran each step.

Left out: concurrent requests (`concurrency.py`) and requests the client leaves (`cancellation.py`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Mapping

from ..config import SamplingParams
from ..engine.sequence import collect
from ..measure.client import blocking_generate, stream_generate
from ..measure.plotting import LabFigure
from ..measure.probes import HealthProbe
from ..measure.tables import format_table
from ..measure.trace import Trace
from .display import COLORS, LABELS, PROMPT, median

_END = object()  # what `next` returns past a generation's last event


class ThreadRecorder:
    """Wraps an engine and records, for each generation, the name of the thread that ran each step.

    Pass it to ``start_fastapi``/``start_flask`` instead of the engine; everything else is forwarded.
    It records both ways of running the engine: one generator per request (``generate_stream`` for Flask,
    ``steps`` for the lab's variants) and the phases the server's engine core calls (``begin``, then
    ``step`` for each forward).
    """

    def __init__(self, engine):
        self._engine = engine
        self.generations: list[list[str]] = []
        self._steps: dict[int, list[str]] = {}  # id(sequence) -> its generation's thread names

    def begin(self, prompt, params: SamplingParams, cancel=None):
        seq = self._engine.begin(prompt, params, cancel)
        self._steps[id(seq)] = names = []
        self.generations.append(names)
        return seq

    def step(self, work, batched: bool = False):
        self._note([seq for seq, _ in work])
        return self._engine.step(work, batched)

    def end(self, seq):
        self._steps.pop(id(seq), None)
        return self._engine.end(seq)

    def _note(self, seqs) -> None:
        name = threading.current_thread().name
        for seq in seqs:
            self._steps.get(id(seq), []).append(name)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def threads(self) -> set[str]:
        """Every thread that has run a step of any generation so far."""
        return {name for names in self.generations for name in names}

    def generate_stream(self, prompt, params: SamplingParams, cancel=None):
        return self._recorded(self._engine.generate_stream(prompt, params, cancel))

    def steps(self, prompt, params: SamplingParams, cancel=None):
        return self._recorded(self._engine.steps(prompt, params, cancel))

    def _recorded(self, inner):
        names: list[str] = []
        self.generations.append(names)

        def steps():
            try:
                while True:
                    names.append(threading.current_thread().name)
                    item = next(inner, _END)
                    if item is _END:
                        return
                    yield item
            finally:
                inner.close()

        return steps()

    def generate(self, prompt, params: SamplingParams):
        return collect(self.generate_stream(prompt, params))


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
            interval_ms: float = 20.0, recorder: ThreadRecorder | None = None, budget_s: float | None = None) -> Run:
    """Warm up, then send one greedy request while ``/health`` is probed every ``interval_ms``.

    ``stream=False`` sends a blocking request (the Flask baseline). With a ``recorder`` wrapped around the
    server's engine, ``Run.threads`` names the threads that ran each step of this request. ``budget_s``:
    a stream hangs up at its first token after that many seconds once it has 3 (two steps to time), as a
    client that gives up would, so that a server slowed down a hundredfold is measured, not waited for.
    """
    send = stream_generate if stream else blocking_generate
    send(url, prompt, 2, 0.0)  # warm-up: the first connection and the first steps on the serving thread
    before = len(recorder.threads()) if recorder else None
    kwargs = {} if budget_s is None or not stream else \
        {"stop_after": lambda t: t.n_tokens >= 3 and t.arrival_ms[-1] >= budget_s * 1000}
    with HealthProbe(url, interval_ms=interval_ms) as probe:
        trace = send(url, prompt, max_tokens, 0.0, **kwargs)
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
