"""`python -m labserver load`: open-loop load against any OpenAI-compatible server, `vllm bench serve`'s way.

    python -m labserver load --url http://127.0.0.1:8000 --request-rate 4 --num-prompts 64 \\
        --input-len 128 --output-len 64 --goodput ttft:500 tpot:50 --out out/load
    python -m labserver load --url http://127.0.0.1:8000 --sweep            # capacity first, then rates to the knee

It prints vLLM's result table and writes `summary.json` (vLLM's key names), `requests.jsonl` (one request
a line) and, for a sweep, `sweep.json` and `sweep.png` (latency percentiles and goodput against load).
Left out: starting a server (run one first: `python -m labserver serve`, `vllm serve`, `llama-server`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .datasets import client_tokenizer, count_tokens, random_requests, shared_prefix_requests
from .goodput import parse_slo
from .load import LoadError, run_load
from .protocols import LABSERVER, LLAMA_CPP, OpenAIProtocol, served_model
from .sweep import sweep

ENDPOINTS = ("completions", "chat", "generate", "llama.cpp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labserver load", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the server's base URL (a trailing /v1 is fine)")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="completions",
                   help="/v1/completions (as vllm bench serve), /v1/chat/completions, labserver's /generate or "
                        "llama-server's native /completion (default %(default)s)")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key")
    p.add_argument("--tokenizer", help="a folder with tokenizer.json or a cached Hugging Face id, to build prompts "
                                       "of exact token lengths (default: the served model's if found here, else "
                                       "words)")
    p.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (shared-prefix: after the prefix)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="random lengths in len*(1 -/+ ratio); 0 = fixed")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens of the common prefix")
    p.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: groups of requests")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier, inf = even")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most; the rest wait on the client")
    p.add_argument("--warmup", type=int, default=1, help="requests sent first and not measured")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    p.add_argument("--sweep", nargs="*", type=float, metavar="RATE",
                   help="run at each rate until over-saturated (none given: fractions of the capacity, measured "
                        "first by a closed loop of --sweep-concurrency requests)")
    p.add_argument("--sweep-concurrency", type=int, default=16,
                   help="the server's concurrency limit, for the sweep's capacity (vLLM: --max-num-seqs; "
                        "llama-server: -np) (default %(default)s)")
    p.add_argument("--sweep-seconds", type=float, default=8.0,
                   help="seconds of arrivals at each rate of a sweep (default %(default)s)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let answers end at EOS (by default every answer is exactly its asked length)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/load", help="folder for summary.json, requests.jsonl (and the sweep's files)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _protocol(args):
    if args.endpoint == "generate":
        return LABSERVER, None
    if args.endpoint == "llama.cpp":
        return LLAMA_CPP, None
    model = args.model or served_model(args.url, args.api_key)
    return OpenAIProtocol(model, chat=args.endpoint == "chat", api_key=args.api_key, continuous_usage=True), model


def _requests(args, tokenizer, n: int | None = None) -> list:
    n = args.num_prompts if n is None else n
    if args.dataset == "shared-prefix":
        return shared_prefix_requests(n, args.prefix_len, args.input_len, args.output_len,
                                      args.num_prefixes, tokenizer=tokenizer, seed=args.seed)
    return random_requests(n, args.input_len, args.output_len, args.range_ratio,
                           tokenizer=tokenizer, seed=args.seed)


def report(s: dict, title: str = "Serving Benchmark Result") -> str:
    """`vllm bench serve`'s table."""
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Maximum request concurrency:", s["max_concurrency"]), ("Request rate (req/s):", s["request_rate"]),
            ("Benchmark duration (s):", s["duration"]), ("Total input tokens:", s["total_input_tokens"]),
            ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", s["request_throughput"])]
    if s.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s):", s["request_goodput"]))
    rows += [("Output token throughput (tok/s):", s["output_throughput"]),
             ("Total Token throughput (tok/s):", s["total_token_throughput"])]
    lines = [f"{' ' + title + ' ':=^50}"] + [f"{k:<40}{_fmt(v):<10}" for k, v in rows]
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"), ("queue", "Client Queue Time")):
        lines.append(f"{label:-^50}")
        lines += [f"{q.capitalize() + ' ' + name.upper() + ' (ms):':<40}{_fmt(s[f'{q}_{name}_ms']):<10}"
                  for q in ("mean", "median", "p99")]
    return "\n".join(lines + ["=" * 50])


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        slo = parse_slo(args.goodput)
        protocol, model = _protocol(args)
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    tokenizer = client_tokenizer(args.tokenizer or model)
    if tokenizer is None:
        print("prompts made of words (no tokenizer found: --tokenizer FOLDER for exact input lengths)",
              file=sys.stderr)
    requests = _requests(args, tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(protocol=protocol, slo=slo, ignore_eos=args.ignore_eos, temperature=args.temperature,
                  seed=args.seed, count_tokens=count_tokens(tokenizer), progress=args.progress,
                  max_concurrency=args.max_concurrency)
    try:
        if args.sweep is None:
            result = run_load(args.url, requests, rate=args.request_rate, burstiness=args.burstiness,
                              warmup=args.warmup, **common)
            result.write(out / "summary.json", out / "requests.jsonl")
            print(report(result.summary))
            return result.summary
        sized = {k: v for k, v in common.items() if k != "max_concurrency"}
        done = sweep(args.url, lambda n: _requests(args, tokenizer, n), args.sweep or None,
                     concurrency=args.sweep_concurrency, seconds=args.sweep_seconds, burstiness=args.burstiness,
                     warmup=args.warmup, on_result=lambda rate, r: print(report(r.summary, f" rate {rate:g} req/s ")),
                     **sized)
    except LoadError as exc:
        sys.exit(f"error: {exc}")
    from .plotting import plot_sweep

    (out / "sweep.json").write_text(json.dumps({"capacity": done.capacity, "one_request_ms": done.one_request_ms,
                                                "rates": done.rates, "knee": done.knee,
                                                "over_saturated": done.saturated, "summaries": done.summaries},
                                               indent=2) + "\n")
    plot_sweep(done.rates, done.summaries, done.knee, path=out / "sweep.png")
    if done.capacity is not None:
        print(f"capacity: {done.capacity:.2f} req/s (closed loop of {args.sweep_concurrency})")
    print(f"knee: {done.knee} req/s; wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return {"capacity": done.capacity, "rates": done.rates, "knee": done.knee, "summaries": done.summaries}

