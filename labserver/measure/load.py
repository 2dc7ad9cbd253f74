"""Open-loop load, as `vllm bench serve` runs it: requests sent at their arrival times, whatever the server does.

A closed loop (N users, each waiting for its answer before asking again) slows down with the server and
hides its queue. An open loop sends request k at its arrival time (`arrivals.py`: Poisson, gamma with a
burstiness, evenly spaced, or all at once) however many are still running, so a server slower than the
arrivals builds a queue that shows in the latencies. `max_concurrency` caps the requests in flight on the
client's side (vLLM's `--max-concurrency`); the wait for a free place is each request's `queue_ms`.
`rate=inf` with `max_concurrency=C` is a fixed concurrency of C.

    result = run_load(url, random_requests(64, 128, 64), rate=4.0, slo=parse_slo("ttft:500 tpot:50"))
    result.summary["p99_ttft_ms"], result.summary["request_goodput"]

The summary uses `vllm bench serve`'s key names (`completed`, `failed`, `request_throughput`,
`output_throughput`, `mean/median/std/pNN_{ttft,tpot,itl,e2el}_ms`, `request_goodput`, `duration`,
`max_concurrency`); `records` has one JSON-ready line per request. A failed request is one that errored
(an HTTP error such as a 429, an error event, a cut stream); one that ended early is complete.

Left out: retrying refused requests (a 429 is counted as failed, as vLLM does), multi-turn sessions,
the CLI (`load_cli.py`) and sweeps over rates (`sweep.py`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import httpx
import numpy as np

from .arrivals import arrival_times
from .client import DEFAULT_TIMEOUT, astream_generate, run_sync
from .datasets import RequestSpec
from .goodput import meets_slo
from .protocols import LABSERVER, OpenAIProtocol, Protocol
from .stats import percentiles
from .trace import Trace

QUANTILES = (50, 90, 95, 99)


class LoadError(RuntimeError):
    """The server refused the warm-up request: nothing would be measured."""


@dataclass
class LoadResult:
    records: list[dict]          # one per request, in arrival order
    summary: dict                # vLLM's key names
    traces: list[Trace] = field(repr=False, default_factory=list)

    def write(self, summary_path, records_path=None) -> None:
        """The summary as JSON; the records as JSON lines (one request a line)."""
        Path(summary_path).write_text(json.dumps(self.summary, indent=2) + "\n")
        if records_path is not None:
            Path(records_path).write_text("".join(json.dumps(r) + "\n" for r in self.records))


def record(index: int, spec: RequestSpec, trace: Trace, arrival_ms: float, start_ms: float, slo: dict) -> dict:
    """One request as a JSON line: when it arrived and was sent (ms after the run began), its metrics."""
    usage = trace.usage or {}
    row = {"index": index, "arrival_ms": round(arrival_ms, 3), "queue_ms": round(start_ms - arrival_ms, 3),
           "ttft_ms": trace.ttft_ms, "tpot_ms": trace.tpot_ms, "e2el_ms": trace.e2e_ms,
           "itl_ms": [round(g, 3) for g in trace.itl_ms], "chunks": trace.n_tokens,
           "input_tokens": usage.get("prompt_tokens", spec.input_tokens),
           "output_tokens": trace.output_tokens if trace.ok else 0, "asked_output_tokens": spec.output_tokens,
           "finish_reason": trace.finish_reason, "error": trace.error}
    row["good"] = bool(trace.ok and meets_slo(row, slo)) if slo else None
    return row


def _stats(out: dict, name: str, values: list[float]) -> None:
    out[f"mean_{name}_ms"] = float(np.mean(values)) if values else None
    out[f"median_{name}_ms"] = float(np.median(values)) if values else None
    out[f"std_{name}_ms"] = float(np.std(values)) if values else None
    for q, v in percentiles(values, QUANTILES).items():
        out[f"p{q:g}_{name}_ms"] = v


def summarize_load(records: Sequence[dict], duration_s: float, *, rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, slo: dict | None = None) -> dict:
    """The run in `vllm bench serve`'s terms. Per-request metrics over the completed requests with output;
    ITL pools every gap. `last_arrival_s` is when the last request was due (the sweep compares the
    duration with it)."""
    done = [r for r in records if not r["error"]]
    timed = [r for r in done if r["ttft_ms"] is not None]
    inputs = sum(r["input_tokens"] or 0 for r in done)
    outputs = sum(r["output_tokens"] for r in done)
    out = {"duration": duration_s, "completed": len(done), "failed": len(records) - len(done),
           "request_rate": rate if math.isfinite(rate) else "inf", "burstiness": burstiness,
           "max_concurrency": max_concurrency, "total_input_tokens": inputs, "total_output_tokens": outputs,
           "request_throughput": len(done) / duration_s, "output_throughput": outputs / duration_s,
           "total_token_throughput": (inputs + outputs) / duration_s,
           "last_arrival_s": max((r["arrival_ms"] for r in records), default=0.0) / 1000,
           "goodput_slo": dict(slo) if slo else None,
           "request_goodput": sum(bool(r["good"]) for r in done) / duration_s if slo else None}
    statuses = [r["error"].get("status") for r in records if r["error"]]
    out["failed_429"] = statuses.count(429)
    _stats(out, "ttft", [r["ttft_ms"] for r in timed])
    _stats(out, "tpot", [r["tpot_ms"] for r in timed if r["tpot_ms"] is not None])
    _stats(out, "itl", [g for r in timed for g in r["itl_ms"]])
    _stats(out, "e2el", [r["e2el_ms"] for r in timed])
    _stats(out, "queue", [r["queue_ms"] for r in records])
    return out


async def _warm_up(url, specs, protocol, http, params) -> Protocol:
    """Send the warm-up requests one by one; a server that refuses vLLM's `continuous_usage_stats` gets
    the same protocol without it. Raises LoadError when the server refuses the request itself."""
    for spec in specs:
        trace = await astream_generate(url, spec.prompt, spec.output_tokens, client=http, protocol=protocol, **params)
        status = (trace.error or {}).get("status")
        if status in (400, 422) and isinstance(protocol, OpenAIProtocol) and protocol.continuous_usage:
            protocol = protocol.without_continuous_usage()
            trace = await astream_generate(url, spec.prompt, spec.output_tokens, client=http, protocol=protocol,
                                           **params)
        if not trace.ok:
            raise LoadError(f"the warm-up request failed: {trace.error}")
    return protocol


async def arun_load(url: str, requests: Sequence[RequestSpec], *, protocol: Protocol = LABSERVER,
                    rate: float = math.inf, burstiness: float = 1.0, max_concurrency: int | None = None,
                    warmup: int = 1, slo: dict | None = None, ignore_eos: bool = True, temperature: float = 0.0,
                    seed: int | None = 0, count_tokens: Callable[[str], int] | None = None, progress: bool = False,
                    extra_body: dict | None = None, timeout_s: float = DEFAULT_TIMEOUT.read) -> LoadResult:
    """`run_load` on the caller's event loop."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    params = {"temperature": temperature, **({"ignore_eos": True} if ignore_eos else {}), **(extra_body or {})}
    arrivals = arrival_times(len(requests), rate, burstiness, seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # No pool limit: the open loop decides how many requests are in flight, not the connection pool.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max_concurrency or len(requests) or 1)
    timeout = httpx.Timeout(timeout_s, connect=10.0, pool=None)
    bar = _progress(len(requests), progress)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        protocol = await _warm_up(url, list(requests[:warmup]) or [], protocol, http, params)
        t0 = time.perf_counter()

        async def one(spec: RequestSpec, arrival_s: float) -> tuple[Trace, float]:
            async with gate or contextlib.nullcontext():
                trace = await astream_generate(url, spec.prompt, spec.output_tokens, client=http, protocol=protocol,
                                               **params)
            bar.update(1)
            return trace, arrival_s

        tasks = []
        for spec, arrival_s in zip(requests, arrivals):
            delay = t0 + arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec, arrival_s)))
        results = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - t0
    bar.close()
    rows = []
    for i, (spec, (trace, arrival_s)) in enumerate(zip(requests, results)):
        if count_tokens is not None and trace.ok and not isinstance((trace.usage or {}).get("completion_tokens"), int):
            trace.counted_tokens = count_tokens(trace.text)
        rows.append(record(i, spec, trace, arrival_s * 1000, (trace.sent_s - t0) * 1000, slo or {}))
    summary = summarize_load(rows, duration_s, rate=rate, burstiness=burstiness, max_concurrency=max_concurrency,
                             slo=slo)
    return LoadResult(rows, summary, [trace for trace, _ in results])


def run_load(url: str, requests: Sequence[RequestSpec], **kwargs) -> LoadResult:
    """Send `requests` to `url` at `rate` requests/s (Poisson; gamma with `burstiness`; `inf` = all at once),
    at most `max_concurrency` in flight, after `warmup` requests that are not measured (the first ones
    of `requests`, sent again in the run). `ignore_eos` (on by default) makes every answer exactly its
    asked length; `slo` (`goodput.parse_slo`) adds `request_goodput`; `extra_body` goes into every request
    (vLLM's `--extra-body`). Works from a notebook cell too."""
    return run_sync(lambda: arun_load(url, requests, **kwargs))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, on: bool):
    if not on:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="req", dynamic_ncols=True)
