"""Figures for `client.Trace`s and `client.HealthProbe`s: each function returns a matplotlib Figure
and, given `path`, also writes it (PNG, or any format matplotlib knows from the suffix).

Figures are built on `matplotlib.figure.Figure`, not pyplot: no global figure list, no GUI backend,
safe in a script, a thread or a headless CI. Jupyter shows pyplot's figures by itself but not these,
so they carry a `_repr_png_`: a returned figure still displays inline.
Left out: interactive plots, styling themes, and any statistics beyond what `client` computes.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .probes import HealthProbe
from .stats import summarize
from .trace import Trace

STREAM_COLOR, BLOCK_COLOR = "tab:blue", "tab:red"


class LabFigure(Figure):
    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def _save(fig: Figure, path) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _ttft_e2e(value: Trace | Sequence[Trace]) -> tuple[float, float]:
    if isinstance(value, Trace):
        return value.ttft_ms or 0.0, value.e2e_ms or 0.0
    s = summarize(value)  # several runs: their medians
    return s["p50_ttft_ms"] or 0.0, s["p50_e2e_ms"] or 0.0


def _color(label: str, i: int) -> str:
    lowered = label.lower()
    if "flask" in lowered or "block" in lowered:
        return BLOCK_COLOR
    if "fastapi" in lowered or "stream" in lowered:
        return STREAM_COLOR
    return f"C{i + 2}"


def draw_token_timeline(ax, trace: Trace) -> None:
    """Token i >= 1: the server's step_ms next to the gap the client saw before that token."""
    idx = list(range(1, trace.n_tokens))
    steps = [s if s is not None else float("nan") for s in trace.step_ms[1:]]
    # Drawn wide and pale underneath, so the client's line stays visible where the two coincide.
    ax.plot(idx, steps, "-", color="tab:gray", linewidth=5, alpha=0.4, label="server step_ms")
    ax.plot(idx, trace.itl_ms, ".-", color=STREAM_COLOR, linewidth=1, label="client gap (ITL)")
    ax.set_ylim(0, 1.3 * max([s for s in steps if s == s] + trace.itl_ms + [1.0]))  # s == s drops NaN
    ax.set_xlabel("token index")
    ax.set_ylabel("ms")
    prefill = f"{trace.prefill_time_ms:.0f}" if trace.prefill_time_ms is not None else "?"
    ax.set_title(f"Per token: TTFT {trace.ttft_ms or 0:.0f} ms (server prefill {prefill} ms)")
    ax.legend(loc="lower right")


def draw_ttft_bars(ax, traces_by_label: Mapping[str, Trace | Sequence[Trace]]) -> None:
    labels = list(traces_by_label)
    width, top = 0.38, 1.0
    for i, label in enumerate(labels):
        ttft, e2e = _ttft_e2e(traces_by_label[label])
        top = max(top, ttft, e2e)
        color = _color(label, i)
        for x, value, alpha in ((i - width / 2, ttft, 1.0), (i + width / 2, e2e, 0.45)):
            ax.bar(x, value, width, color=color, alpha=alpha)
            ax.annotate(f"{value:.0f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms after the request was sent")
    ax.set_title("Time to first token and to the last one")
    keys = [Patch(color="tab:gray", label="TTFT"), Patch(color="tab:gray", alpha=0.45, label="E2E (last token)")]
    ax.legend(handles=keys, loc="upper center", ncols=2, fontsize=8)


def draw_health(ax, probes_by_label: Mapping[str, HealthProbe]) -> None:
    """/health latency against when the probe was sent; log scale, since a blocked server takes seconds."""
    for i, (label, probe) in enumerate(probes_by_label.items()):
        if not probe.samples:
            continue
        t_s = [t / 1000 for t, _ in probe.samples]
        lat = [max(latency, 1e-3) for _, latency in probe.samples]
        ax.plot(t_s, lat, ".-", color=_color(label, i), label=f"{label} (max {max(lat):.0f} ms)")
    ax.set_yscale("log")
    ax.set_xlabel("probe sent at (s since probing started)")
    ax.set_ylabel("/health latency (ms)")
    ax.set_title("Is the server still answering during a generation?")
    ax.legend(loc="upper right", fontsize=8)


def draw_arrivals(ax, traces_by_label: Mapping[str, Trace], title: str = "What the user sees",
                  common_start: bool = False) -> None:
    """Tokens received so far against time: a staircase when streaming, one cliff when blocking.

    Each trace starts at 0 (its own send), or with ``common_start`` at its send time after the first
    trace's, for requests sent together (``Trace.sent_s`` is one clock for all of them).
    """
    first = min((t.sent_s for t in traces_by_label.values()), default=0.0)
    for i, (label, trace) in enumerate(traces_by_label.items()):
        offset_s = trace.sent_s - first if common_start else 0.0
        t_s = [offset_s] + [offset_s + t / 1000 for t in trace.arrival_ms]
        ax.step(t_s, range(len(t_s)), where="post", color=_color(label, i), label=label)
    ax.set_xlabel("s after the first request was sent" if common_start else "s after the request was sent")
    ax.set_ylabel("tokens received")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, ncols=2 if len(traces_by_label) > 4 else 1)


def plot_arrivals(traces_by_label: Mapping[str, Trace], title: str = "What the user sees", path=None,
                  common_start: bool = False) -> Figure:
    fig = LabFigure(figsize=(7, 3.6), layout="constrained")
    draw_arrivals(fig.add_subplot(), traces_by_label, title, common_start)
    return _save(fig, path)


def plot_token_timeline(trace: Trace, path=None) -> Figure:
    fig = LabFigure(figsize=(7, 3.8), layout="constrained")
    draw_token_timeline(fig.add_subplot(), trace)
    return _save(fig, path)


def plot_ttft_bars(traces_by_label: Mapping[str, Trace | Sequence[Trace]], path=None) -> Figure:
    fig = LabFigure(figsize=(6, 3.8), layout="constrained")
    draw_ttft_bars(fig.add_subplot(), traces_by_label)
    return _save(fig, path)


def plot_health(probes_by_label: Mapping[str, HealthProbe], path=None) -> Figure:
    fig = LabFigure(figsize=(7, 3.8), layout="constrained")
    draw_health(fig.add_subplot(), probes_by_label)
    return _save(fig, path)


def plot_demo(stream_trace: Trace, blocking_trace: Trace, path=None,
              probes_by_label: Mapping[str, HealthProbe] | None = None,
              labels: tuple[str, str] = ("FastAPI streaming", "Flask blocking")) -> Figure:
    """The demo's one picture: arrivals, TTFT bars, /health during generation, per-token timing."""
    fig = LabFigure(figsize=(12, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    both = {labels[0]: stream_trace, labels[1]: blocking_trace}
    draw_arrivals(axes[0, 0], both)
    draw_ttft_bars(axes[0, 1], both)
    if probes_by_label:
        draw_health(axes[1, 0], probes_by_label)
    else:
        axes[1, 0].set_axis_off()
    draw_token_timeline(axes[1, 1], stream_trace)
    fig.suptitle(f"Same prompt, same engine, {stream_trace.n_tokens} tokens: streaming vs blocking")
    return _save(fig, path)


def draw_latency_vs_throughput(ax, summaries: Sequence[dict]) -> None:
    """TTFT and ITL percentiles (log scale) against the output tokens/s each run achieved."""
    x = [s["output_throughput"] for s in summaries]
    for metric, color in (("ttft", "tab:blue"), ("itl", "tab:orange")):
        for q, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(x, [s[f"{q}_{metric}_ms"] for s in summaries], style, color=color,
                    label=f"{metric.upper()} {q if q == 'p99' else 'p50'}")
    ax.set(xlabel="achieved output tokens/s", ylabel="ms (log)", yscale="log", title="Latency against load")
    ax.legend(fontsize=8)


def draw_goodput(ax, rates: Sequence[float], summaries: Sequence[dict], knee: float | None = None) -> None:
    """Requests/s within the SLO against requests/s completed, one point per offered rate: on the diagonal
    every completed request met the SLO; a server past its knee still completes, too late to count."""
    done = [s["request_throughput"] for s in summaries]
    good = [s.get("request_goodput") for s in summaries]
    top = max(done, default=1.0) * 1.05
    ax.plot([0, top], [0, top], ":", color="tab:gray", label="all within the SLO")
    if any(g is not None for g in good):
        ax.plot(done, [g or 0.0 for g in good], "s-", color="tab:green", label="goodput")
        for rate, x, y in zip(rates, done, good):
            ax.annotate(f"{rate:.3g}/s", (x, y or 0.0), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if knee in rates:
            i = list(rates).index(knee)
            ax.plot([done[i]], [good[i] or 0.0], "o", color="tab:red", markersize=10, fillstyle="none",
                    label=f"knee: offered {knee:.3g} req/s")
    ax.set(xlabel="achieved requests/s (offered rate at each point)", ylabel="requests/s within the SLO",
           title="Goodput against throughput")
    ax.legend(fontsize=8)


def plot_sweep(rates: Sequence[float], summaries: Sequence[dict], knee: float | None = None, path=None) -> Figure:
    """A rate sweep (`sweep.SweepResult`'s `rates`, `summaries`, `knee`): latency and goodput."""
    fig = LabFigure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    draw_latency_vs_throughput(left, summaries)
    draw_goodput(right, rates, summaries, knee)
    fig.tight_layout()
    return _save(fig, path)
