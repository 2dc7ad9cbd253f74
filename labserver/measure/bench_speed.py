"""Speed figures for `make bench`: how close the engine runs to the memory floor, what batching buys.

    P5     = engine decode step / memory floor of its weight format
             (floor = bytes a step reads / read bandwidth measured here, in this run; both best-of-N);
    P6_hf  = engine decode step / decode step of transformers' own ``generate()``, same prompt, greedy;
    P7     = aggregate tokens/s of 8 concurrent streams / tokens/s of one stream (batched scheduler; the
             interleaving 'thread' backend and the w4a8 route alongside), with the spread of per-stream
             rates and /health p99;
    P8     = seconds from ``python -m labserver serve`` to a /health answer, model already cached
             (and to the first token of a request sent at that moment).
``routes`` repeats the step and P5 for every weight format of the lean runner, with the prompt's prefill
and a step of 8 sequences (where arithmetic, not bytes, sets the time), and its quality: greedy
agreement with the float32 route over a prompt set (teacher-forced: the share of steps whose argmax is the
float32 token when both see the float32 prefix; free-run: the share of prompts whose 32 tokens are equal).

P6 against llama.cpp needs its own environment: ``bench_peer.py`` (``make bench-peer``).
Left out: prompts longer than a chat turn, batch sizes other than 1 and 8, other models.
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

from .client import DEFAULT_PROMPT, run_concurrent
from .probes import HealthProbe
from .stats import aggregate_tokens_per_s, summarize
from .tables import format_table
from ..config import SamplingParams
from ..engine.engine import Engine
from ..engine.loading import off_thread
from ..engine.runners import LeanRunner
from ..serve.app import create_app
from ..serve.background import UvicornServer

AGREEMENT_PROMPTS = [
    "Write a haiku about the sea.", "What is the capital of France? Answer in one sentence.",
    "Explain recursion to a ten-year-old.", "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.", "Write a Python function that reverses a string.",
    "Why is the sky blue?", "Give me a short motivational quote about learning.",
]
ROUTES = [("float32", "none"), ("float32", "q4_1"), ("float32", "w4a8"), ("float32", "fp16"),
          ("bfloat16", "none")]


def on_one_thread(threads: int, fn, *args):
    """Run ``fn`` on a fresh thread (``off_thread``) with ``threads`` torch threads, as the engine thread does."""
    def work():
        torch.set_num_threads(threads)  # per calling thread
        return fn(*args)
    return off_thread(work)


def read_bandwidth_gbs(mbytes: int = 512, repeats: int = 7) -> float:
    """Best of ``repeats`` sums over a buffer far larger than the caches: the rate a decode step can read."""
    x = torch.ones(mbytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def weight_bytes(engine) -> int:
    if isinstance(engine.runner, LeanRunner):
        return engine.runner.lean.weight_bytes()
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())  # tied weights count once


def decode_step_ms(engine, prompt: str = DEFAULT_PROMPT, max_tokens: int = 64, runs: int = 3) -> float:
    """Decode step of one sequence: the best of ``runs`` generations' median steps, after a warm-up.

    Best-of, as the floor's bandwidth and transformers' step are measured: on a shared machine noise
    only ever adds time, and the ratios compare what each side can do.
    """
    def work():
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        engine.generate(prompt, params)
        return min(statistics.median(e.step_ms for e in engine.generate(prompt, params).events[1:])
                   for _ in range(runs))
    return on_one_thread(engine.config.threads, work)


def prefill_and_batch_ms(engine, prompt: str = DEFAULT_PROMPT, batch: int = 8, steps: int = 16) -> tuple[float, float]:
    """The prompt's prefill, and a decode step of ``batch`` sequences at once (best of 3 / median of
    ``steps``): where a route's arithmetic, rather than its bytes, sets the time."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0)

    def work():
        seqs, prefills = [], []
        try:
            for _ in range(batch):
                seqs.append(engine.begin(prompt, params))
                t0 = time.perf_counter()
                seqs[-1].tokens.append(int(engine.forward([(seqs[-1], seqs[-1].remaining)])[0].argmax()))
                prefills.append((time.perf_counter() - t0) * 1000)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                logits = engine.forward([(s, 1) for s in seqs])
                times.append((time.perf_counter() - t0) * 1000)  # the forward alone
                for s, token in zip(seqs, logits.argmax(-1).tolist()):
                    s.tokens.append(token)
        finally:
            for s in seqs:
                engine.end(s)
        return min(prefills[-3:]), statistics.median(times)
    return on_one_thread(engine.config.threads, work)


def hf_generate_step_ms(engine, prompt: str = DEFAULT_PROMPT, n: int = 64) -> float:
    """transformers' ``generate()`` per decode step: (time for n+1 new tokens - time for 1) / n."""
    ids = torch.tensor([engine.encode(prompt)])

    def timed(k):
        t0 = time.perf_counter()
        with torch.inference_mode():
            engine.model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - t0

    def work():
        timed(4)  # warm-up
        return min((timed(n + 1) - timed(1)) * 1000 / n for _ in range(2))
    return on_one_thread(engine.config.threads, work)


def agreement(reference: Engine, route: Engine, prompts=AGREEMENT_PROMPTS, n: int = 32) -> dict:
    """Greedy agreement of ``route`` with ``reference`` (see the module docstring)."""
    params = SamplingParams(max_tokens=n, temperature=0.0)

    def work():
        forced, total, equal = 0, 0, 0
        for prompt in prompts:
            ref = reference.generate(prompt, params).token_ids
            equal += route.generate(prompt, params).token_ids == ref
            seq = route.begin(prompt, params)
            logits = route.forward([(seq, seq.remaining)])[0]
            for i, token in enumerate(ref):
                forced += int(torch.argmax(logits)) == token
                total += 1
                if i + 1 < len(ref):
                    seq.tokens.append(token)
                    logits = route.forward([(seq, 1)])[0]
            route.end(seq)
        return {"teacher_forced_pct": round(100 * forced / total, 1), "free_run_equal_pct": round(100 * equal / len(prompts), 1)}
    return on_one_thread(route.config.threads, work)


def routes(engine: Engine, bandwidth_gbs: float, log=print) -> dict:
    """Step, memory floor, P5 and quality of each lean weight format, built from the engine's model."""
    out = {}
    if not isinstance(engine.runner, LeanRunner):
        return out
    reference = None
    for dtype, quant in ROUTES:
        config = dataclasses.replace(engine.config, dtype=dtype, quant=quant, max_batch=8)
        route = Engine(engine.source, engine.tokenizer, config)
        name = route.runner.name
        if name in out:  # q4_1 on a model whose weights no block reproduces is the fp16 route again
            continue
        log(f"    route {name} ...")
        floor = weight_bytes(route) / bandwidth_gbs / 1e6
        step = decode_step_ms(route)
        prefill, batch8 = prefill_and_batch_ms(route)
        figures = {"step_ms": round(step, 2), "weight_mb": round(weight_bytes(route) / 1e6, 1),
                   "floor_ms": round(floor, 2), "P5": round(step / floor, 3),
                   "prefill_ms": round(prefill, 1), "batch8_step_ms": round(batch8, 2)}
        if reference is None:
            reference = route
        else:
            figures.update(agreement(reference, route))
        out[name] = figures
    return out


def _spread(traces) -> float | None:
    rates = [1000 / t.tpot_ms for t in traces if t.ok and t.tpot_ms]
    return round(max(rates) / min(rates), 3) if rates else None


def concurrency_gain(engine, backend: str, streams: int = 8, max_tokens: int = 64,
                     prompt: str = DEFAULT_PROMPT) -> dict:
    """One stream, then ``streams`` at once while /health is probed, on a FastAPI server with ``backend``."""
    kw = dict(prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True)
    with UvicornServer(create_app(engine, backend=backend)) as server:
        run_concurrent(server.url, 1, **kw)  # warm-up
        one = run_concurrent(server.url, 1, **kw)
        with HealthProbe(server.url, interval_ms=20) as probe:
            many = run_concurrent(server.url, streams, **kw)
    failed = [t.error for t in one + many if not t.ok]
    if failed:
        raise RuntimeError(f"concurrent streams failed: {failed[0]}")
    single, aggregate = aggregate_tokens_per_s(one), aggregate_tokens_per_s(many)
    return {"backend": backend, "streams": streams, "tokens_per_s_1": round(single, 2),
            f"tokens_per_s_{streams}": round(aggregate, 2), "gain": round(aggregate / single, 3),
            "per_stream_rate_spread": _spread(many), "health": probe.summary(), "concurrent": summarize(many)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start(timeout_s: float = 120.0) -> dict:
    """Start ``python -m labserver serve`` in a new process; seconds until /health, then until a first token."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "labserver", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = None
        while ready is None and time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    ready = time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.02)
        if ready is None:
            raise RuntimeError(f"no /health answer within {timeout_s} s")
        with httpx.stream("POST", url + "/generate", json={"prompt": "Hi", "max_tokens": 2, "stream": True},
                          timeout=timeout_s) as response:
            next(response.iter_lines())
        first_token = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    return {"ready_s": round(ready, 2), "first_token_s": round(first_token, 2)}


def run_speed(engine, log=print) -> dict:
    log("(f) memory bandwidth, lean routes, transformers generate() ...")
    bandwidth = on_one_thread(engine.config.threads, read_bandwidth_gbs)
    step = decode_step_ms(engine)
    floor = weight_bytes(engine) / bandwidth / 1e6
    hf_step = hf_generate_step_ms(engine)
    all_routes = routes(engine, bandwidth, log)
    log("(g) 8 concurrent streams: batched scheduler, then the interleaving thread backend ...")
    batched = concurrency_gain(engine, "batched")
    interleaved = concurrency_gain(engine, "thread")
    fast = None
    if engine.runner.name.startswith("lean-q4_1"):  # the same blocks with 8-bit activations, for comparison
        log("    ... and the batched scheduler on the w4a8 route")
        fast = concurrency_gain(Engine(engine.source, engine.tokenizer,
                                       dataclasses.replace(engine.config, quant="w4a8")), "batched")
    log("(h) cold start of `python -m labserver serve` (twice: the first also warms the disk cache) ...")
    starts = [cold_start(), cold_start()]
    return {
        "P5": round(step / floor, 3), "P6_hf": round(step / hf_step, 3), "P7": batched["gain"],
        "P7_per_stream_spread": batched["per_stream_rate_spread"], "P7_health_p99_ms": batched["health"]["p99_ms"],
        **({"P7_w4a8": fast["gain"]} if fast else {}),
        "P8_ready_s": starts[-1]["ready_s"], "P8_first_token_s": starts[-1]["first_token_s"],
        "raw_speed": {"runner": engine.runner.name, "read_bandwidth_gbs": round(bandwidth, 2),
                      "weight_mb": round(weight_bytes(engine) / 1e6, 1), "floor_ms": round(floor, 2),
                      "engine_step_ms": round(step, 2), "hf_generate_step_ms": round(hf_step, 2),
                      "routes": all_routes, "concurrency_batched": batched, "concurrency_thread": interleaved,
                      **({"concurrency_w4a8": fast} if fast else {}),
                      "cold_starts": starts},
    }


def speed_tables(speed: dict) -> list[str]:
    """``run_speed``'s raw figures as two text tables: the speed figures, then one row per route."""
    rows = [[f"{speed['runner']}: decode step ms", speed["engine_step_ms"]],
            ["transformers generate(): decode step ms", speed["hf_generate_step_ms"]],
            [f"memory floor ms ({speed['weight_mb']} MB at {speed['read_bandwidth_gbs']} GB/s)", speed["floor_ms"]]]
    for name in ("batched", "thread", "w4a8"):
        c = speed.get(f"concurrency_{name}")
        if c is not None:
            many = c["tokens_per_s_" + str(c["streams"])]
            rows.append([f"{name}: tokens/s, 1 stream -> {c['streams']} streams",
                         f"{c['tokens_per_s_1']:.1f} -> {many:.1f}"])
    rows += [[f"cold start {i + 1}: /health, first token (s)", f"{c['ready_s']}, {c['first_token_s']}"]
             for i, c in enumerate(speed["cold_starts"])]
    routes = format_table(
        ["route", "step ms", "floor ms", "P5", "prefill ms", "8-seq step ms", "forced %", "free-run %"], [
            [name, r["step_ms"], r["floor_ms"], r["P5"], r.get("prefill_ms"), r.get("batch8_step_ms"),
             r.get("teacher_forced_pct"), r.get("free_run_equal_pct")] for name, r in speed["routes"].items()])
    return [format_table(["speed", "value"], rows), routes]

