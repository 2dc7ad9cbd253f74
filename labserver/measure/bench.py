"""`make bench`: how much the web layer costs, measured on one engine, in one process, in one run.

    python -m labserver.measure.bench [--out out/bench.json] [--max-tokens 64] [--runs 3]

Steps, each warmed up first, greedy (temperature 0), one fixed prompt so runs compare:
  (a) the engine alone on one thread: median decode step_ms;
  (b) FastAPI streaming, the server's default backend (the batched scheduler on the engine thread):
      server step_ms, client ITL, TTFT vs prefill_time_ms;
  (c) the same with backend "executor" (each `next(gen)` sent to a thread pool with
      `run_in_executor`, the pattern of the first streaming version);
  (d) the Flask baseline, blocking: TTFT is the whole response;
  (e) /health probed while `concurrency` generations run on each server;
  (f-h) the speed figures of ``bench_speed.py`` (skipped for engines without a model runner).

The figures (P0-P3 ratios of medians; P5, P6_hf of best-of-3 steps, see ``bench_speed.py``), with a
goal where the project commits to one (``GOALS``, ``SPEED_GOALS``: they decide ``all_pass``); the
others are printed to compare:
  P0  server step_ms while streaming / engine step alone on one thread     goal <= 1.05
      (P0_executor: the same for backend "executor")
  P1  client ITL / server step_ms                                           goal <= 1.02
  P2  client TTFT / server prefill_time_ms                                  goal <= 1.05
  P3  Flask TTFT / streaming TTFT (grows with the length: ~1 + (max_tokens - 1) * step / prefill)
  P4  /health p99 while `concurrency` streams run: FastAPI (goal <= 10 ms), Flask alongside
  P5  engine decode step / memory floor of its weight format                goal <= 1.5
  P6  our client ITL / llama.cpp's on the same GGUF: ``bench_peer.py`` (with the prefill and
      concurrency figures against llama.cpp); here P6_hf = step / transformers' generate() step, goal <= 0.5
  P7  tokens/s of 8 concurrent streams / one stream (batched scheduler; P7_w4a8, the spread of
      per-stream rates and /health p99 alongside)
  P8  seconds from `python -m labserver serve` to a /health answer          goal <= 3 s
      (P8_first_token_s alongside)

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
import statistics
import time
from pathlib import Path

import httpx

from .bench_speed import run_speed, speed_tables
from .tables import format_table
from .client import DEFAULT_PROMPT, DEFAULT_TIMEOUT, blocking_generate, run_concurrent, stream_generate
from .peer import this_cpu
from .probes import HealthProbe
from .protocols import LABSERVER, openai_protocol
from .stats import summarize
from ..config import EngineConfig, SamplingParams
from ..engine.engine import Finish, off_thread
from ..model import kernels
from ..serve.app import create_app
from ..serve.flask_app import create_flask_app
from ..serve.background import FlaskServer, UvicornServer

# figure -> (comparison, target): the goals the project commits to (see the module docstring).
GOALS = {
    "P0": ("<=", 1.05),
    "P1": ("<=", 1.02),
    "P2": ("<=", 1.05),
    "P4_fastapi_p99_ms": ("<=", 10.0),
}
SPEED_GOALS = {
    "P5": ("<=", 1.5),
    "P6_hf": ("<=", 0.5),
    "P8_ready_s": ("<=", 3.0),
}
# Printed beside the goals, to compare; no target.
INFORMATIVE = ("P0_executor", "P3", "P4_flask_p99_ms", "P7", "P7_w4a8", "P7_per_stream_spread",
               "P7_health_p99_ms", "P8_first_token_s")


def engine_alone(engine, prompt: str, max_tokens: int, runs: int) -> dict:
    """Warm-up plus `runs` generations, all on one fresh long-lived thread, as the engine thread does."""
    def work():
        import torch
        torch.set_num_threads(engine.config.threads)  # per calling thread, as in worker.py
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        engine.generate(prompt, params)  # warm-up
        steps, prefills, n_tokens = [], [], []
        for _ in range(runs):
            events = list(engine.generate_stream(prompt, params))
            tokens = [e for e in events if not isinstance(e, Finish)]
            steps += [e.step_ms for e in tokens[1:]]
            prefills += [e.prefill_time_ms for e in tokens[:1]]
            n_tokens.append(len(tokens))
        return {"p50_step_ms": statistics.median(steps), "mean_step_ms": statistics.fmean(steps),
                "p50_prefill_ms": statistics.median(prefills), "n_tokens": n_tokens}
    return off_thread(work)


def _sequential(generate, url: str, prompt: str, max_tokens: int, runs: int, fresh: bool = False) -> list:
    """Warm-up plus `runs` requests one after another; with `fresh`, each prompt opens with its own tag."""
    # One keep-alive connection for all requests, as `vllm bench serve` keeps one session: TTFT then
    # measures the server, not a TCP handshake and a new client per request.
    with httpx.Client(timeout=DEFAULT_TIMEOUT) as http:
        generate(url, prompt, max_tokens, 0.0, client=http)  # warm-up: the connection, the first step
        traces = [generate(url, fresh_prompt(prompt, i) if fresh else prompt, max_tokens, 0.0, client=http)
                  for i in range(runs)]
    failed = [t.error or "no tokens (the model stopped at once, or the server cut the stream)"
              for t in traces if not t.ok or not t.n_tokens]
    if failed:
        raise RuntimeError(f"requests to {url} failed: {failed[0]}")
    return traces


def fresh_prompt(prompt: str, i: int) -> str:
    """`prompt` with a tag in front that no earlier request had.

    Servers with a prefix cache (llama.cpp, vLLM, SGLang) keep the KV of earlier prompts: sent the same
    prompt again, they run one token's forward instead of a prefill, and TTFT measures the cache. A new
    first word makes them compute the prompt again (past a chat template's fixed opening, which they may
    still reuse).
    """
    return f"Request {i + 1}. {prompt}"


def _under_load(url: str, prompt: str, max_tokens: int, concurrency: int, stream: bool,
                protocol=LABSERVER) -> tuple[dict, dict]:
    """Probe /health while `concurrency` requests run at once (on Flask they queue one behind another)."""
    with HealthProbe(url, interval_ms=20) as probe:
        traces = run_concurrent(url, concurrency, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                stream=stream, protocol=protocol)
    return probe.summary(), summarize(traces)


def measure_url(url: str, protocol=LABSERVER, prompt: str = DEFAULT_PROMPT, max_tokens: int = 64, runs: int = 3,
                concurrency: int = 4) -> dict:
    """Client-side figures for a running server: TTFT/ITL/TPOT/E2E alone and under load, /health.

    "stream" sends a fresh prompt each time (`fresh_prompt`), so its TTFT includes a prefill on any
    server; "stream_repeated" sends the same prompt each time, which a prefix cache answers from memory.
    """
    def one(u, p, n, t, client=None):
        return stream_generate(u, p, n, t, protocol=protocol, client=client)

    alone = summarize(_sequential(one, url, prompt, max_tokens, runs, fresh=True))
    repeated = summarize(_sequential(one, url, prompt, max_tokens, runs))
    health, loaded = _under_load(url, prompt, max_tokens, concurrency, True, protocol)
    return {"url": url, "protocol": type(protocol).__name__, "model": getattr(protocol, "model", None),
            "stream": alone, "stream_repeated": repeated, "concurrent": loaded, "health": health,
            "setup": {"max_tokens": max_tokens, "runs": runs, "concurrency": concurrency, "prompt": prompt}}


def measure_fastapi(engine, backend: str, prompt: str, max_tokens: int, runs: int, concurrency: int = 0) -> dict:
    app = create_app(engine, backend=backend)
    with UvicornServer(app) as server:
        out = {"backend": app.state.backend.kind, "stream": summarize(_sequential(stream_generate, server.url, prompt, max_tokens, runs))}
        if concurrency:
            out["health"], out["concurrent"] = _under_load(server.url, prompt, max_tokens, concurrency, True)
    return out


def measure_flask(engine, prompt: str, max_tokens: int, runs: int, concurrency: int) -> dict:
    with FlaskServer(create_flask_app(engine)) as server:
        out = {"blocking": summarize(_sequential(blocking_generate, server.url, prompt, max_tokens, runs))}
        out["health"], out["concurrent"] = _under_load(server.url, prompt, max_tokens, concurrency, False)
    return out


def _ratio(a, b) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def run_bench(engine, max_tokens: int = 64, runs: int = 3, concurrency: int = 4, prompt: str = DEFAULT_PROMPT,
              out: str | Path | None = None, log=print, speed: bool = True) -> dict:
    """Measure (a)-(e) on `engine`; return (and write to `out`, if given) the figures and goals."""
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    if load_before > 0.5:  # other processes on these cores skew every figure below
        log(f"note: 1-minute load average is {load_before:.1f} before starting; figures may be noisy")
    log("(a) engine alone ...")
    alone = engine_alone(engine, prompt, max_tokens, runs)
    log("(b) FastAPI, default backend ...")
    thread = measure_fastapi(engine, "auto", prompt, max_tokens, runs, concurrency)
    log("(c) FastAPI, backend 'executor' ...")
    executor = measure_fastapi(engine, "executor", prompt, max_tokens, runs)
    log("(d, e) Flask baseline ...")
    flask = measure_flask(engine, prompt, max_tokens, runs, concurrency)

    fast = thread["stream"]
    result = {
        "P0": _ratio(fast["p50_step_ms"], alone["p50_step_ms"]),
        "P0_executor": _ratio(executor["stream"]["p50_step_ms"], alone["p50_step_ms"]),
        "P1": _ratio(fast["p50_itl_ms"], fast["p50_step_ms"]),
        "P2": _ratio(fast["p50_ttft_ms"], fast["p50_prefill_ms"]),
        "P3": _ratio(flask["blocking"]["p50_ttft_ms"], fast["p50_ttft_ms"]),
        "P4_fastapi_p99_ms": thread["health"]["p99_ms"],
        "P4_flask_p99_ms": flask["health"]["p99_ms"],
    }
    goals = dict(GOALS)
    if speed and engine.source is not None:  # the speed figures measure a model's weights; a fake has none
        result.update(run_speed(engine, log))
        goals.update(SPEED_GOALS)
    result["goals"], result["all_pass"] = judge(result, goals)
    result["raw"] = {"engine_alone": alone, "fastapi": thread, "fastapi_executor": executor, "flask": flask}
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
    fast, flask, kind = raw["fastapi"]["stream"], raw["flask"]["blocking"], raw["fastapi"]["backend"]
    rows = [
        ["engine alone: decode step", raw["engine_alone"]["p50_step_ms"]],
        [f"FastAPI {kind}: server step", fast["p50_step_ms"]],
        ["FastAPI executor: server step", raw["fastapi_executor"]["stream"]["p50_step_ms"]],
        [f"FastAPI {kind}: client ITL", fast["p50_itl_ms"]],
        [f"FastAPI {kind}: server prefill", fast["p50_prefill_ms"]],
        [f"FastAPI {kind}: client TTFT", fast["p50_ttft_ms"]],
        ["Flask: client TTFT (whole response)", flask["p50_ttft_ms"]],
        ["/health p99 under load: FastAPI", result["P4_fastapi_p99_ms"]],
        ["/health p99 under load: Flask", result["P4_flask_p99_ms"]],
    ]
    sections = [format_table(["figure (p50, ms)", "value"], rows)]
    if "raw_speed" in result:
        sections += speed_tables(result["raw_speed"])
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

    engine = Engine.from_config(EngineConfig.from_env())
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
