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

from .sizing import measure_speed, probe_interval_ms, tokens_for

__all__ = ["PROMPT", "median", "measure_speed", "tokens_for", "probe_interval_ms", "compare_table", "raw_sse",
           "raw_spread"]


def compare_table(traces_by_label: Mapping[str, Sequence[Trace]]) -> str:
    """Medians over repeated runs: TTFT, E2E and tokens/s per way of serving, and TTFT relative to the first."""
    rows, first = [], None
    for label, traces in traces_by_label.items():
        s = summarize(traces)
        first = first or s["p50_ttft_ms"]
        rows.append([label, len(traces), s["p50_ttft_ms"], s["p50_e2e_ms"],
                     median(t.tokens_per_s for t in traces), s["p50_ttft_ms"] / first])
    return format_table(["server", "runs", "TTFT p50 ms", "E2E p50 ms", "tokens/s", "TTFT vs first"], rows)


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


def raw_spread(lines: Sequence[tuple[float, str]]) -> tuple[float, float]:
    """(ms between the first and the last token line's arrival, the server's step_ms summed between them)."""
    import json

    tokens = [(t, json.loads(line[5:])) for t, line in lines if line.startswith('data: {"token"')]
    return tokens[-1][0] - tokens[0][0], sum(event["step_ms"] for _, event in tokens[1:])
