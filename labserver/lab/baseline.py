"""Notebook 1's experiments (the blocking baseline): what the engine computes against what the client
receives. The notebook reaches these names as ``lab.NAME``; ``PROMPT`` and ``median`` come from ``display``,
``measure_speed``, ``tokens_for`` and ``probe_interval_ms`` from ``sizing``.

Left out: the servers (``serve``) and the measurements every notebook shares (``measure``).
"""
from __future__ import annotations

from ..measure.plotting import LabFigure
from ..measure.trace import Trace
from .display import PROMPT, median
from .sizing import measure_speed, probe_interval_ms, tokens_for

__all__ = ["PROMPT", "median", "measure_speed", "tokens_for", "probe_interval_ms", "plot_engine_steps",
           "produced_trace"]


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
