"""Notebook 2's experiments (streaming with SSE): the raw event stream as ``curl -N`` shows it, and a
table comparing ways of serving over repeated runs. The notebook reaches these names as ``lab.NAME``.

Left out: parsing SSE (the client uses httpx-sse; parsing one line is the notebook's exercise).
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import httpx

from ..measure.stats import summarize
from ..measure.tables import format_table
from ..measure.trace import Trace
from .display import PROMPT, median
from .target import Target, as_target

from .sizing import measure_speed, probe_interval_ms, tokens_for

__all__ = ["PROMPT", "median", "measure_speed", "tokens_for", "probe_interval_ms", "compare_table", "raw_sse",
           "raw_spread", "predicted_gain"]


def compare_table(traces_by_label: Mapping[str, Sequence[Trace]]) -> str:
    """Medians over repeated runs: TTFT, E2E and tokens/s per way of serving, and TTFT relative to the first."""
    rows, first = [], None
    for label, traces in traces_by_label.items():
        s = summarize(traces)
        first = first or s["p50_ttft_ms"]
        rows.append([label, len(traces), s["p50_ttft_ms"], s["p50_e2e_ms"],
                     median(t.tokens_per_s for t in traces), s["p50_ttft_ms"] / first])
    return format_table(["server", "runs", "TTFT p50 ms", "E2E p50 ms", "tokens/s", "TTFT vs first"], rows)


def raw_sse(server: Target | str, prompt: str = PROMPT, max_tokens: int = 6, *, show: bool = True,
            width: int = 150) -> list[tuple[float, str]]:
    """Stream one greedy request and return each raw line with its arrival time, as ``curl -N`` shows them.

    ``server`` is a ``Target`` (a shared server gets its own wire format, /v1/completions) or our URL.
    With ``show`` the status, the content type and every line are printed as they arrive (long lines cut
    at ``width``); the blank lines are the SSE event separators.
    """
    server = as_target(server)
    body = server.protocol.request(prompt, max_tokens, 0.0, True, **server.extra)
    headers = getattr(server.protocol, "headers", {})
    lines = []
    with httpx.Client(timeout=120) as http:
        start = time.perf_counter()
        with http.stream("POST", server.url + server.protocol.path, json=body, headers=headers) as response:
            if show:
                print(f"HTTP {response.status_code}  content-type: {response.headers.get('content-type')}")
            for line in response.iter_lines():
                t_ms = (time.perf_counter() - start) * 1000
                lines.append((t_ms, line))
                if show:
                    text = line if len(line) <= width else line[:width - 3] + "..."
                    print(f"{t_ms:7.1f} ms | {text}")
    return lines


def raw_spread(lines: Sequence[tuple[float, str]]) -> tuple[float, float]:
    """(ms between the first and the last token line's arrival, the server's step_ms summed between them)."""
    import json

    tokens = [(t, json.loads(line[5:])) for t, line in lines if line.startswith('data: {"token"')]
    return tokens[-1][0] - tokens[0][0], sum(event["step_ms"] for _, event in tokens[1:])


def predicted_gain(streamed: Sequence[Trace], blocked: Sequence[Trace], max_tokens: int) -> float:
    """How many times sooner streaming shows the first token: ``1 + (n - 1) * step / prefill``.

    The step and the prefill are the blocking server's own (``step_ms``, ``prefill_time_ms``); a server
    that reports neither (a shared OpenAI-compatible one) is read from the client's side instead: the
    streams' TPOT for the step and their TTFT for the prefill.

    >>> t = Trace(arrival_ms=[100.0, 110.0], tokens=[" a", " b"], step_ms=[None, None])  # no server timings
    >>> predicted_gain([t], [t], max_tokens=11)     # 1 + 10 * 10 ms / 100 ms
    2.0
    """
    st, bl = summarize(streamed), summarize(blocked)
    step, prefill = bl["p50_step_ms"], bl["p50_prefill_ms"]
    if not step or not prefill:
        step, prefill = st["p50_tpot_ms"], st["p50_ttft_ms"]
    return 1 + (max_tokens - 1) * step / prefill
