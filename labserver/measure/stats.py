"""Statistics over traces: percentiles, the `vllm bench serve`-style summary, aggregate tokens/s.

    >>> percentiles([10, 20, 30, 40, 50])
    {50: 30.0, 90: 46.0, 99: 49.6}

Left out: confidence intervals and outlier rejection (a run reports what it measured).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .trace import Trace


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict:
    """Linear-interpolated percentiles (numpy's default, as vllm uses); None for an empty list."""
    if len(values) == 0:
        return {q: None for q in qs}
    return {q: round(float(v), 9) for q, v in zip(qs, np.percentile(np.asarray(values, float), qs))}


def summarize(traces: Sequence[Trace], qs: Sequence[float] = (50, 90, 99)) -> dict:
    """`mean_X_ms` and `pQ_X_ms` for X in ttft, itl, tpot, e2e (client) and step, prefill (server).
    ITL pools the gaps of all requests; the others take one value per request. A failed request is one
    that errored (an HTTP error, an error event, a cut stream), not one that ended early: it is counted
    in `failed` and left out of the figures."""
    done = [t for t in traces if t.ok and t.n_tokens]
    series = {
        "ttft": [t.ttft_ms for t in done],
        "itl": [gap for t in done for gap in t.itl_ms],
        "tpot": [t.tpot_ms for t in done if t.tpot_ms is not None],
        "e2e": [t.e2e_ms for t in done],
        "step": [s for t in done for s in t.decode_step_ms],
        "prefill": [t.prefill_time_ms for t in done if t.prefill_time_ms is not None],
    }
    ok = sum(t.ok for t in traces)
    out = {"completed": ok, "failed": len(traces) - ok, "total_output_tokens": sum(t.output_tokens for t in done)}
    for name, values in series.items():
        out[f"mean_{name}_ms"] = float(np.mean(values)) if values else None
        for q, v in percentiles(values, qs).items():
            out[f"p{q:g}_{name}_ms"] = v
    return out


def aggregate_tokens_per_s(traces: Sequence[Trace]) -> float | None:
    """What N streams deliver together: the tokens of the completed traces over the wall time from the
    first request sent to the last token of any of them (None if none completed).

    >>> a = Trace(sent_s=10.0, arrival_ms=[100.0, 200.0, 300.0])
    >>> b = Trace(sent_s=10.25, arrival_ms=[150.0, 250.0])  # sent 250 ms later: its last token at 500 ms
    >>> aggregate_tokens_per_s([a, b])  # 5 tokens in 0.5 s
    10.0
    """
    done = [t for t in traces if t.ok and t.n_tokens]
    if not done:
        return None
    start = min(t.sent_s for t in traces)
    end = max(t.sent_s + t.e2e_ms / 1000 for t in done)
    return sum(t.output_tokens for t in done) / (end - start)

