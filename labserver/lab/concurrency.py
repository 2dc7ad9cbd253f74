"""Notebook 5's experiments (concurrency): N streams at once while /health is probed, for N in a sweep;
what the batched scheduler did with them (``prefill_groups``, ``step_ms_by_batch``, ``decode_tokens_per_s``);
and what a decode step costs per batch size, measured in turns (``batch_step_ms``). The notebook reaches
these names as ``lab.NAME``, with the scheduler exercise's driver from ``rounds``.

Left out: request-rate schedules (every stream of a load starts at once; ``vllm bench serve`` does rates).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..config import SamplingParams
from ..measure.plotting import LabFigure, plot_arrivals
from ..measure.probes import HealthProbe
from ..measure.stats import aggregate_tokens_per_s, percentiles
from ..measure.tables import format_table
from ..measure.trace import Trace
from .display import PROMPT, median, print_table

from .rounds import drive, print_rounds
from .target import Target, as_target

__all__ = ["PROMPT", "print_table", "Load", "sweep", "sweep_table", "plot_streams", "plot_sweep",
           "step_ms_by_batch", "prefill_forwards", "prefill_groups", "joined_while_running", "decode_tokens_per_s", "engine_timing",
           "batch_step_ms",
           "drive", "print_rounds", "prefill_budget", "tokens_per_step", "health_p50_ms", "e2e_p50_ms"]


@dataclass
class Load:
    """``n`` streams sent at once, and the ``/health`` probe that ran meanwhile."""
    n: int
    traces: list[Trace]
    probe: HealthProbe
    wall_s: float | None = None  # a stopwatch around the whole load: from before sending to after the last read

    @property
    def tokens_per_s(self) -> float | None:
        return aggregate_tokens_per_s(self.traces)

    @property
    def itl_p50_ms(self) -> float:
        return percentiles([g for t in self.traces for g in t.itl_ms])[50]

    @property
    def step_p50_ms(self) -> float:
        return percentiles([s for t in self.traces for s in t.decode_step_ms])[50]

    def row(self) -> dict:
        ttft = [t.ttft_ms for t in self.traces]
        itl = percentiles([g for t in self.traces for g in t.itl_ms])
        step = percentiles([s for t in self.traces for s in t.decode_step_ms])
        health = self.probe.summary()
        return {"N": self.n, "TTFT min ms": min(ttft), "TTFT max ms": max(ttft), "ITL p50 ms": itl[50],
                "ITL p90 ms": itl[90], "step p50 ms": step[50], "tokens/s (all)": self.tokens_per_s,
                "/health p50 ms": health["p50_ms"], "/health p99 ms": health["p99_ms"]}


def sweep(server: Target | str, ns: Sequence[int] = (1, 2, 4, 8), max_tokens: int = 32, prompt: str = PROMPT,
          interval_ms: float = 20.0) -> list[Load]:
    """For each N: N greedy streams at once while ``/health`` is probed. ``server``: a ``Target`` (ours
    or a shared one) or our server's URL."""
    server = as_target(server)
    server.concurrent(1, 2, prompt)  # warm-up, the same path as below
    loads = []
    for n in ns:
        with HealthProbe(server.url, interval_ms=interval_ms) as probe:
            start = time.perf_counter()
            traces = server.concurrent(n, max_tokens, prompt)
            wall_s = time.perf_counter() - start
        failed = [t.error for t in traces if not t.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} streams failed: {failed[0]}")
        loads.append(Load(n, traces, probe, wall_s))
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


def prefill_budget() -> int:
    """The batched policy's budget of tokens per forward (its default, as the server uses)."""
    from ..engine.scheduler import Batched

    return Batched().max_num_batched_tokens


def tokens_per_step(load: Load) -> float:
    """All streams' tokens per second, in units of the server's median step: how many tokens the server
    delivered per step-time (taking turns, one at most, whatever N)."""
    return load.tokens_per_s * load.step_p50_ms / 1000


def health_p50_ms(load: Load) -> float:
    return load.probe.summary()["p50_ms"]


def e2e_p50_ms(load: Load) -> float:
    return statistics.median(t.e2e_ms for t in load.traces)


def prefill_forwards(load: Load) -> list[tuple[int, float]]:
    """(prompts, ms) of each prefill forward of the batched server, in order.

    Read from each stream's first event: ``batch`` (sequences that shared the forward that finished its prompt) and
    its ``step_ms``, the time of that forward, the same for every prompt in it.
    """
    firsts: dict[tuple, list[float]] = {}
    for trace in load.traces:
        key = (trace.batch[0] or 1, trace.step_ms[0])
        firsts.setdefault(key, []).append(trace.sent_s + trace.arrival_ms[0] / 1000)
    return [key for key, _ in sorted(firsts.items(), key=lambda item: min(item[1]))]


def joined_while_running(load: Load) -> tuple[float, float]:
    """(ms from the first request's send to the last stream's first token, to the first stream's last
    token): the first is smaller when every prompt joined a batch that was still decoding."""
    t0 = min(t.sent_s for t in load.traces)
    last_first = max(t.sent_s + t.arrival_ms[0] / 1000 for t in load.traces)
    first_last = min(t.sent_s + t.arrival_ms[-1] / 1000 for t in load.traces)
    return (last_first - t0) * 1000, (first_last - t0) * 1000


def prefill_groups(load: Load) -> list[int]:
    """How many prompts each prefill forward of the batched server carried, in order."""
    return [size for size, _ in prefill_forwards(load)]


def decode_tokens_per_s(load: Load, min_steps: int = 2) -> float | None:
    """Tokens per second that all streams together received while every one of them was decoding: from
    the last stream's first token to the first stream's last token (None if that window holds fewer than
    ``min_steps`` tokens per stream)."""
    first = max(t.sent_s + t.arrival_ms[0] / 1000 for t in load.traces)
    last = min(t.sent_s + t.arrival_ms[-1] / 1000 for t in load.traces)
    inside = sum(first < t.sent_s + a / 1000 <= last for t in load.traces for a in t.arrival_ms)
    if last <= first or inside < min_steps * load.n:
        return None
    return inside / (last - first)


def engine_timing(engine, prompt: str = PROMPT, max_tokens: int = 8) -> tuple[float, float]:
    """(prefill ms, mean decode step ms) of one short greedy generation on the calling thread."""
    timings = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                     ignore_eos=True)).finish.timings
    return timings["prefill_time_ms"], timings["mean_step_ms"]


def batch_step_ms(engine, batches: Sequence[int] = (1, 2, 4, 8), repeats: int = 5,
                  prompt: str = PROMPT) -> dict[int, float]:
    """Median time (ms) of one decode step for B sequences, for each B in ``batches``.

    The sizes take turns (1, 2, 4, 8, 1, 2, ...), so a moment when other programs slow the machine down
    slows every size alike instead of one of them. Runs the engine on the calling thread: no server may
    use this engine meanwhile.
    """
    params = SamplingParams(max_tokens=repeats * len(batches) + 2, temperature=0.0, ignore_eos=True)
    seqs = [engine.begin(prompt, params) for _ in range(max(batches))]
    times: dict[int, list[float]] = {b: [] for b in batches}
    try:
        engine.prefill_steps(seqs)
        for _ in range(repeats):
            for b in batches:
                start = time.perf_counter()
                engine.decode_step(seqs[:b], batched=True)
                times[b].append((time.perf_counter() - start) * 1000)
    finally:
        for seq in seqs:
            engine.end(seq)
    return {b: round(statistics.median(v), 2) for b, v in times.items()}
