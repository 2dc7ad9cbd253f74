"""`make bench`: how much the web layer costs, measured on one engine, in one process, in one run.

    python -m labserver.measure.bench [--out out/bench.json] [--max-tokens 64] [--runs 3]

Steps, each warmed up first, greedy (temperature 0), one fixed prompt so runs compare:
  (a) the engine alone on one thread: median decode step_ms;
  (b) FastAPI streaming, the server's default backend (the batched scheduler on the engine thread):
      server step_ms, client ITL, TTFT vs prefill_time_ms; then the same with the engine in a process
      of its own (backend "process": token ids over ZMQ, text made in the API process);
  (c) the same with backend "executor" (each `next(gen)` sent to a thread pool with
      `run_in_executor`, the pattern of the first streaming version);
  (d) the Flask baseline, blocking: TTFT is the whole response;
  (e) /health probed while `concurrency` generations run on each server;
  (f-h) the speed figures of ``bench_speed.py`` (skipped for engines without a model runner);
  (i) the default backend again at stream intervals 4 and 16 (``--stream-interval``): the server step
      while streaming against the engine alone (P0), and the whole streamed answer against Flask's;
  (j) the KV cache (``bench_kv.py``): resident memory after one 3.75k-token request against its own K/V,
      and the long-prompt trade-off of chunked prefill for a few token budgets.

The engine runs without its prefix cache, so every fresh prompt's TTFT holds a whole prefill.

The figures (P0-P3 ratios of medians; P5, P6_hf of best-of-3 steps, see ``bench_speed.py``), with a
goal where the project commits to one (``GOALS``, ``SPEED_GOALS``: they decide ``all_pass``); the
others are printed to compare:
  P0  server step_ms while streaming / engine step alone on one thread     goal <= 1.05
      (P0_executor: the same for backend "executor")
  P1  client ITL / server step_ms                                           goal <= 1.02
  P2  client TTFT / server prefill_time_ms                                  goal <= 1.05
  P3  Flask TTFT / streaming TTFT (grows with the length: ~1 + (max_tokens - 1) * step / prefill)
  P4  /health p99 while `concurrency` streams run: FastAPI (goal <= 10 ms), Flask alongside
      (P0_process, P1_process, P2_process, P4_process_p99_ms: (b) with the engine in its own process,
      backend "process", against the same goals)
  P5  engine decode step / memory floor of its weight format                goal <= 1.5
  P6  our client ITL / llama.cpp's on the same GGUF: ``bench_peer.py`` (with the prefill and
      concurrency figures against llama.cpp); here P6_hf = step / transformers' generate() step, goal <= 0.5
  P7  tokens/s of 8 concurrent streams / one stream (batched scheduler; P7_w4a8, the spread of
      per-stream rates and /health p99 alongside)
  P8  seconds from `python -m labserver serve` to a /health answer          goal <= 3 s
      (P8_first_token_s alongside)
  P9  the streamed answer's E2E / Flask's, at stream interval 1 (P9_interval_4, P9_interval_16 and
      P0_interval_4, P0_interval_16 alongside: what the knob buys)
  P10 RSS growth after one 3.75k-token request / that request's own K/V     goal <= 1.5
  P11 longest gap of 4 running streams while a 1.5k-token prompt is prefilled / that prompt's TTFT, at
      the default max_num_batched_tokens (the trade-off for other budgets in the table; make bench-peer
      holds it to <= 0.2 beside llama-server)

With `--url URL` it measures a server that is already running instead (ours, or any OpenAI-compatible
one with `--openai` / `--openai-chat`: vLLM, SGLang, llama.cpp): sequential streams, then `concurrency`
streams at once while /health is probed, client-side figures only; written to out/bench_url.json.

Left out: throughput sweeps and request-rate schedules (`vllm bench serve` does those), other models.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from .bench_backends import (sequential, engine_alone, fresh_prompt, measure_fastapi,  # noqa: F401 (API)
                             measure_flask, measure_url)
from .bench_kv import chunk_tradeoff, rss_growth
from .bench_kv import report as kv_report
from .bench_speed import run_speed, speed_tables
from .tables import format_table
from .client import DEFAULT_PROMPT
from .peer import this_cpu
from .protocols import LABSERVER, openai_protocol
from ..config import EngineConfig
from ..model import kernels

# figure -> (comparison, target): the goals the project commits to (see the module docstring).
GOALS = {
    "P0": ("<=", 1.05),
    "P1": ("<=", 1.02),
    "P2": ("<=", 1.05),
    "P4_fastapi_p99_ms": ("<=", 10.0),
}
# The same goals for the engine in its own process (backend "process"), measured beside the thread's.
PROCESS_GOALS = {"P0_process": ("<=", 1.05), "P1_process": ("<=", 1.02), "P2_process": ("<=", 1.05),
                 "P4_process_p99_ms": ("<=", 10.0)}
SPEED_GOALS = {
    "P5": ("<=", 1.5),
    "P6_hf": ("<=", 0.5),
    "P8_ready_s": ("<=", 3.0),
    "P10_kv_rss": ("<=", 1.5),
}
STREAM_INTERVALS = (4, 16)
# Printed beside the goals, to compare; no target.
INFORMATIVE = ("P0_executor", "P3", "P4_flask_p99_ms", "P7", "P7_w4a8", "P7_per_stream_spread",
               "P7_health_p99_ms", "P8_first_token_s", "P9", *(f"P{p}_interval_{n}" for n in STREAM_INTERVALS
                                                               for p in ("P9", "P0")), "P11")


def _ratio(a, b) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def backend_figures(served: dict | None, alone: dict, suffix: str = "") -> dict:
    """P0, P1, P2 and P4 of one FastAPI backend (``measure_fastapi``'s result, None if it could not be
    measured); ``suffix`` names its column."""
    names = (f"P0{suffix}", f"P1{suffix}", f"P2{suffix}", f"P4_{suffix[1:] or 'fastapi'}_p99_ms")
    if served is None:
        return dict.fromkeys(names)
    fast = served["stream"]
    return dict(zip(names, (_ratio(fast["p50_step_ms"], alone["p50_step_ms"]),
                            _ratio(fast["p50_itl_ms"], fast["p50_step_ms"]),
                            _ratio(fast["p50_ttft_ms"], fast["p50_prefill_ms"]), served["health"]["p99_ms"])))


def run_bench(engine, max_tokens: int = 64, runs: int = 3, concurrency: int = 4, prompt: str = DEFAULT_PROMPT,
              out: str | Path | None = None, log=print, speed: bool = True, process: bool = True) -> dict:
    """Measure (a)-(e) on `engine`; return (and write to `out`, if given) the figures and goals.

    `process`: also measure (b) with the engine in its own process (backend "process", which rebuilds
    the engine there from its config or fake delays: not for a model that exists only in memory)."""
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    if load_before > 0.5:  # other processes on these cores skew every figure below
        log(f"note: 1-minute load average is {load_before:.1f} before starting; figures may be noisy")
    log("(a) engine alone ...")
    alone = engine_alone(engine, prompt, max_tokens, runs)
    log("(b) FastAPI, default backend ...")
    thread = measure_fastapi(engine, "auto", prompt, max_tokens, runs, concurrency)
    if process:
        log("(b') FastAPI, backend 'process' ...")
        try:
            proc = measure_fastapi(engine, "process", prompt, max_tokens, runs, concurrency)
        except RuntimeError as exc:  # no engine process (it failed to start): its goals fail, unmeasured
            log(f"(b') not measured: {exc}")
            proc = None
    log("(c) FastAPI, backend 'executor' ...")
    executor = measure_fastapi(engine, "executor", prompt, max_tokens, runs)
    log("(d, e) Flask baseline ...")
    flask = measure_flask(engine, prompt, max_tokens, runs, concurrency)

    fast = thread["stream"]
    result = {
        **backend_figures(thread, alone),
        "P0_executor": _ratio(executor["stream"]["p50_step_ms"], alone["p50_step_ms"]),
        "P3": _ratio(flask["blocking"]["p50_ttft_ms"], fast["p50_ttft_ms"]),
        "P4_flask_p99_ms": flask["health"]["p99_ms"],
    }
    goals = dict(GOALS)
    if process:
        result.update(backend_figures(proc, alone, "_process"))
        goals.update(PROCESS_GOALS)
    result["P9"] = _ratio(fast["p50_e2e_ms"], flask["blocking"]["p50_e2e_ms"])
    intervals = {}
    for n in STREAM_INTERVALS:
        log(f"(i) FastAPI, default backend, stream interval {n} ...")
        intervals[n] = measure_fastapi(engine, "auto", prompt, max_tokens, runs, stream_interval=n)["stream"]
        result[f"P9_interval_{n}"] = _ratio(intervals[n]["p50_e2e_ms"], flask["blocking"]["p50_e2e_ms"])
        result[f"P0_interval_{n}"] = _ratio(intervals[n]["p50_step_ms"], alone["p50_step_ms"])
    if speed and engine.source is not None:  # the speed figures measure a model's weights; a fake has none
        result.update(run_speed(engine, log))
        log("(j) the KV cache: memory of one long request, chunked prefill's trade-off ...")
        kv = {"rss": rss_growth(engine), "chunks": chunk_tradeoff(engine, log=log)}
        result["P10_kv_rss"] = kv["rss"]["growth_over_own_kv"]
        default = next((r for r in kv["chunks"] if r["max_num_batched_tokens"] == engine.config.max_num_batched_tokens), {})
        result["P11"] = default.get("gap_over_ttft")
        result["raw_kv"] = kv
        goals.update(SPEED_GOALS)
    result["goals"], result["all_pass"] = judge(result, goals)
    result["raw"] = {"engine_alone": alone, "fastapi": thread, "fastapi_executor": executor, "flask": flask,
                     "stream_intervals": intervals}
    if process:
        result["raw"]["fastapi_process"] = proc
    result["setup"] = {"model": engine.config.model, "runner": engine.runner.name,
                       "backend": thread["backend"], "threads": engine.config.threads, "max_tokens": max_tokens,
                       "runs": runs, "concurrency": concurrency, "prompt": prompt, "temperature": 0.0,
                       "machine": platform.machine(), "cpu": this_cpu().describe(), "python": platform.python_version(),
                       "kernels": " ".join(filter(None, (kernels.path(), kernels.features()))) or None,
                       "route": engine.route if engine.source is not None else None,
                       "loadavg_1m_before": round(load_before, 2),
                       "loadavg_1m_after": round(os.getloadavg()[0], 2),
                       "duration_s": round(time.perf_counter() - start, 1)}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def judge(figures: dict, goals: dict) -> tuple[dict, bool]:
    """Each goal's value, target and verdict, and whether all of them hold. A figure that was not
    measured (missing or None) fails its goal: it shows nothing."""
    verdicts = {}
    for name, (op, target) in goals.items():
        value = figures.get(name)
        met = value is not None and (value <= target if op == "<=" else value >= target)
        verdicts[name] = {"value": value, "goal": f"{op} {target:g}", "pass": met}
    return verdicts, all(v["pass"] for v in verdicts.values())


def report(result: dict) -> str:
    raw = result["raw"]
    flask, kind = raw["flask"]["blocking"], raw["fastapi"]["backend"]
    served = [raw["fastapi"], raw.get("fastapi_process")]  # the engine on a thread, in its own process

    def both(key: str) -> list:
        return [None if s is None else (s["health"]["p99_ms"] if key == "health" else s["stream"][key]) for s in served]

    rows = [
        ["engine alone: decode step", raw["engine_alone"]["p50_step_ms"], None],
        ["FastAPI: server step", *both("p50_step_ms")],
        ["FastAPI: client ITL", *both("p50_itl_ms")],
        ["FastAPI: server prefill", *both("p50_prefill_ms")],
        ["FastAPI: client TTFT", *both("p50_ttft_ms")],
        ["FastAPI: /health p99 under load", *both("health")],
        ["FastAPI executor: server step", raw["fastapi_executor"]["stream"]["p50_step_ms"], None],
        ["Flask: client TTFT (whole response)", flask["p50_ttft_ms"], None],
        ["Flask: /health p99 under load", result["P4_flask_p99_ms"], None],
    ]
    sections = [format_table(["figure (p50, ms)", f"engine thread ({kind})", "engine process"], rows)]
    intervals = raw.get("stream_intervals") or {}
    if intervals:
        sections.append(format_table(["stream interval", "server step p50 ms", "client ITL p50 ms", "E2E p50 ms",
                                      "E2E / Flask's"],
                                     [[1, raw["fastapi"]["stream"]["p50_step_ms"], raw["fastapi"]["stream"]["p50_itl_ms"],
                                       raw["fastapi"]["stream"]["p50_e2e_ms"], result.get("P9")]] +
                                     [[n, s["p50_step_ms"], s["p50_itl_ms"], s["p50_e2e_ms"],
                                       result.get(f"P9_interval_{n}")] for n, s in intervals.items()]))
    if "raw_speed" in result:
        sections += speed_tables(result["raw_speed"])
    if "raw_kv" in result:
        sections.append(kv_report(result["raw_kv"]))
    sections.append(format_table(["goal", "value", "target", "result"], [
        [name, g["value"], g["goal"], g["pass"]] for name, g in result["goals"].items()
    ] + [[name, result[name], "(compare)", None] for name in INFORMATIVE if name in result]))
    setup = result["setup"]
    route = setup.get("route") or {}
    sections.append(f"CPU: {setup['cpu']}; kernels: {setup['kernels']}; weights: {route.get('quant')} "
                    f"({route.get('why')})")
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m labserver.measure.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench.json")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="measured requests per step, after one warm-up")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--url", help="measure this running server instead of starting our own")
    parser.add_argument("--openai", action="store_true", help="with --url: speak /v1/completions")
    parser.add_argument("--openai-chat", action="store_true", help="with --url: speak /v1/chat/completions")
    args = parser.parse_args(argv)
    if args.url:
        return _main_url(args)
    from ..engine.engine import Engine

    # No prefix cache: each fresh prompt is then prefilled whole, so that P2's server prefill is a prefill.
    # Reusing to the token, the cache would leave only the words after the chat template's opening and
    # the fresh tag (llama.cpp's side of make bench-peer likewise runs with cache_prompt off).
    engine = Engine.from_config(EngineConfig.from_env(prefix_caching=False))
    result = run_bench(engine, args.max_tokens, args.runs, args.concurrency, args.prompt, out=args.out)
    print(report(result))
    print(f"\nwrote {args.out} in {result['setup']['duration_s']} s")
    return result


def _main_url(args) -> dict:
    chat = args.openai_chat
    protocol = openai_protocol(args.url, chat=chat) if (args.openai or chat) else LABSERVER
    result = measure_url(args.url, protocol, args.prompt, args.max_tokens, args.runs, args.concurrency)
    out = Path(args.out if args.out != "out/bench.json" else "out/bench_url.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s, c, h = result["stream"], result["concurrent"], result["health"]
    print(format_table(["figure", "alone", f"x{args.concurrency}"], [
        [f"p50 {m} ms", s[f"p50_{m}_ms"], c[f"p50_{m}_ms"]] for m in ("ttft", "itl", "tpot", "e2e")
    ] + [["p50 ttft ms, the same prompt again", result["stream_repeated"]["p50_ttft_ms"], None],
         ["/health p99 ms", None, h["p99_ms"]]]))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
