"""Notebook 5's experiments (concurrency): N streams at once while /health is probed, for N in a sweep,
and what the batched scheduler's steps cost per batch size. The notebook reaches these names as ``lab.NAME``.

Left out: request-rate schedules (every stream of a load starts at once; ``vllm bench serve`` does rates).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..measure.client import run_concurrent
from ..measure.plotting import LabFigure, plot_arrivals
from ..measure.probes import HealthProbe
from ..measure.stats import aggregate_tokens_per_s, percentiles
from ..measure.tables import format_table
from ..measure.trace import Trace
from .display import PROMPT, median, print_table

__all__ = ["PROMPT", "print_table", "Load", "sweep", "sweep_table", "plot_streams", "plot_sweep",
           "step_ms_by_batch"]


@dataclass
class Load:
    """``n`` streams sent at once, and the ``/health`` probe that ran meanwhile."""
    n: int
    traces: list[Trace]
    probe: HealthProbe

    @property
    def tokens_per_s(self) -> float | None:
        return aggregate_tokens_per_s(self.traces)

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
    return plot_arrivals({f"request {i + 1}": trace for i, trace in enumerate(load.traces)},
                         title or f"{load.n} streams at once share one engine thread", common_start=True)


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
