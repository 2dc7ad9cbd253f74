"""The KV cache's figures, measured by the client against any server, ours or llama.cpp's.

    python -m labserver.measure.bench_kv [--out out/bench_kv.json]      (our server alone; make bench-peer
                                                                          measures llama-server beside it)

- ``shared_prefix``: requests one after another, each a long shared opening (a system prompt) and a
  question of its own; the first one's TTFT, the later ones' (a prefix cache computes only the question).
- ``long_prompt_gap``: a few streams decoding, then a long prompt arrives: its TTFT, and the longest gap
  any running stream saw while it was prefilled (bounded by one chunk with chunked prefill, by the whole
  prompt without).
- ``chunk_tradeoff``: ``long_prompt_gap`` on our server for several ``max_num_batched_tokens``: the
  long prompt's TTFT against the others' longest gap, from which the default is chosen.
- ``rss_growth``: the process's resident memory before and after one long request, against that
  request's own K/V (a pool touched only as blocks fill grows by about that; slots sized for the worst
  case of every sequence grew by gigabytes).

Every figure is the client's (``client.py``); prompts are the served model's tokens, the same ids on
both servers. Left out: multi-turn chats with real answers (a shared opening stands for the history),
memory of the other server.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

from .client import astream_generate
from .tables import format_table

QUESTIONS = ("What is a hash table?", "Why do CPUs have caches?", "What does a compiler do?",
             "How does a queue differ from a stack?", "What is recursion?", "Why is the sky blue?")
FILLER = ("A good teacher explains each idea with a small example, checks that the student follows, and "
          "names every term before using it. ")
# The long prompt's own text: were it FILLER too, its first ~1.3k tokens would be the shared prefix's, which
# both servers have cached by then, and its TTFT would time only the rest.
LONG_FILLER = ("Rivers carve valleys over thousands of years, carrying sand and stones from the mountains down "
               "to the sea. ")


def text_of_tokens(engine, n: int, filler: str = FILLER) -> str:
    """Plain text of about ``n`` tokens of the served model (the chat template adds its own)."""
    reps = max(1, n // max(1, len(engine.tokenizer(filler)["input_ids"])) + 1)
    ids = engine.tokenizer(filler * reps)["input_ids"][:n]
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def shared_prefix(target, prefix: str, questions=QUESTIONS, max_tokens: int = 4) -> dict:
    """TTFT of each request ``prefix + question``, one after another; the first fills the cache."""
    async def run():
        return [await astream_generate(target.url, target.encode(prefix + "\n\n" + q), max_tokens, 0.0,
                                       protocol=target.protocol, **target.extra) for q in questions]

    traces = asyncio.run(run())
    ttft = [round(t.arrival_ms[0], 1) if t.arrival_ms else None for t in traces]
    return {"ttft_ms": ttft, "first_ms": ttft[0], "later_p50_ms": _median(ttft[1:]),
            "prompt_tokens": traces[-1].usage.get("prompt_tokens"), "errors": [t.error for t in traces if t.error]}


def long_prompt_gap(target, long_text: str, streams: int = 4, warm_tokens: int = 3) -> dict:
    """``streams`` decode until ``long_text`` (one token asked) has its first token; the longest gap any of
    them saw from the long prompt's arrival to then, and the long prompt's TTFT."""
    async def run():
        done, started = asyncio.Event(), asyncio.Event()
        counts = [0] * streams

        def counter(i):
            def on_token(_):
                counts[i] += 1
                if min(counts) >= warm_tokens:
                    started.set()
            return on_token

        running = [asyncio.create_task(astream_generate(
            target.url, target.encode(f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"), 2000, 0.0, protocol=target.protocol,
            on_token=counter(i), stop_after=lambda _t: done.is_set(), **target.extra)) for i in range(streams)]
        waiting = asyncio.create_task(started.wait())
        await asyncio.wait([waiting, *running], timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():  # a stream ended (an error) or none got going: nothing to measure
            done.set()
            failed = [t.result().error for t in running if t.done()]
            raise RuntimeError(f"the streams did not start: {failed or 'no tokens within 120 s'}")
        long = await astream_generate(target.url, target.encode(long_text), 1, 0.0, protocol=target.protocol,
                                      **target.extra)
        done.set()
        return long, await asyncio.gather(*running)

    long, traces = asyncio.run(run())
    start = long.sent_s * 1000
    first = start + (long.arrival_ms[0] if long.arrival_ms else 0.0)
    gaps, before = [], []
    for t in traces:
        times = [t.sent_s * 1000 + a for a in t.arrival_ms]
        for a, b in zip(times, times[1:]):
            if b > start and a < first:  # a gap that overlaps the long prompt's prefill
                gaps.append(b - a)
            elif b <= start:
                before.append(b - a)
    ttft = long.arrival_ms[0] if long.arrival_ms else None
    longest = max(gaps) if gaps else None
    return {"long_ttft_ms": None if ttft is None else round(ttft, 1), "longest_gap_ms": None if longest is None else round(longest, 1),
            "gap_over_ttft": round(longest / ttft, 3) if longest and ttft else None,
            "itl_before_p50_ms": _median(before), "long_prompt_tokens": long.usage.get("prompt_tokens"),
            "errors": [t.error for t in [long, *traces] if t.error]}


def chunk_tradeoff(engine, budgets=(64, 128, 256, 512, 4096), long_tokens: int = 1500, streams: int = 4,
                   log=print) -> list[dict]:
    """``long_prompt_gap`` on our server once per token budget (the engine's config, restored after)."""
    from ..serve.app import create_app
    from ..serve.background import UvicornServer
    from .targets import OURS_EXTRA, Target
    from .protocols import LABSERVER

    long_text, rows, config = text_of_tokens(engine, long_tokens, LONG_FILLER), [], engine.config
    try:
        for budget in budgets:
            engine.config = dataclasses.replace(config, max_num_batched_tokens=budget)
            engine.kv.reset_prefix_cache()  # every run prefills the long prompt whole
            with UvicornServer(create_app(engine)) as server:
                target = Target("ours", server.url, LABSERVER, lambda t: t, OURS_EXTRA)
                target.one("Hello", 4)  # warm-up
                row = {"max_num_batched_tokens": budget, **long_prompt_gap(target, long_text, streams)}
            log(f"  budget {budget}: long prompt TTFT {row['long_ttft_ms']} ms, longest gap {row['longest_gap_ms']} ms")
            rows.append(row)
    finally:
        engine.config = config
    return rows


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_growth(engine, tokens: int = 3751, max_tokens: int = 8) -> dict:
    """Resident memory before and after one request of ``tokens`` prompt tokens, against its own K/V."""
    from ..config import SamplingParams

    ids = engine.tokenizer(text_of_tokens(engine, tokens + 64))["input_ids"][:tokens]
    engine.generate(ids[:32], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up: buffers, kernels
    before, t0 = rss_bytes(), time.perf_counter()
    engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    elapsed, after = time.perf_counter() - t0, rss_bytes()
    own = (len(ids) + max_tokens) * engine.runner.lean.cache.bytes_per_token
    return {"prompt_tokens": len(ids), "rss_before_mb": round(before / 2**20, 1), "rss_after_mb": round(after / 2**20, 1),
            "own_kv_mb": round(own / 2**20, 1), "growth_over_own_kv": round((after - before) / own, 3),
            "seconds": round(elapsed, 1)}


def report(result: dict) -> str:
    lines = []
    if "chunks" in result:
        lines.append(format_table(["max_num_batched_tokens", "long prompt TTFT ms", "longest gap ms", "gap / TTFT",
                                   "ITL before ms"],
                                  [[r["max_num_batched_tokens"], r["long_ttft_ms"], r["longest_gap_ms"],
                                    r["gap_over_ttft"], r["itl_before_p50_ms"]] for r in result["chunks"]]))
    if "rss" in result:
        r = result["rss"]
        lines.append(f"one {r['prompt_tokens']}-token request: RSS {r['rss_before_mb']} -> {r['rss_after_mb']} MB, "
                     f"its own K/V {r['own_kv_mb']} MB: growth / own K/V = {r['growth_over_own_kv']} (goal <= 1.5)")
    if "shared_prefix" in result:
        s = result["shared_prefix"]
        lines.append(f"shared {s['prompt_tokens']}-token prompts: first TTFT {s['first_ms']} ms, later p50 "
                     f"{s['later_p50_ms']} ms ({s['ttft_ms']})")
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from ..config import EngineConfig
    from ..engine.engine import Engine
    from .peer import this_cpu

    parser = argparse.ArgumentParser(prog="python -m labserver.measure.bench_kv", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench_kv.json")
    parser.add_argument("--budgets", default="64,128,256,512,4096")
    args = parser.parse_args(argv)
    engine = Engine.from_config(EngineConfig.from_env())
    result = {"cpu": this_cpu().describe(), "rss": rss_growth(engine)}
    result["chunks"] = chunk_tradeoff(engine, tuple(int(b) for b in args.budgets.split(",")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    return result


if __name__ == "__main__":
    main()


# Goals beside llama-server (make bench-peer): ours / theirs on the same machine, client and tokens.
PEER_GOALS = {"P12_prefix_ttft": ("<=", 1.0), "P13_gap_over_ttft": ("<=", 0.2), "P14_long_ttft": ("<=", 1.0)}


def against_peer(engine, binary, gguf, threads: int = 2, prefix_tokens: int = 1339, long_tokens: int = 1557,
                 streams: int = 4, parallel: int = 8, extra: tuple = (), log=print) -> dict:
    """The shared-prefix and long-prompt experiments on our server and on ``llama-server -np parallel``
    (its prompt cache on, as by default), one after the other: the P12-P14 ratios and both sides' figures."""
    from ..serve.app import create_app
    from ..serve.background import UvicornServer
    from .targets import OURS_EXTRA, Target
    from .peer import PeerServer, free_port
    from .protocols import LABSERVER, LLAMA_CPP

    prefix, long_text = text_of_tokens(engine, prefix_tokens), text_of_tokens(engine, long_tokens, LONG_FILLER)
    out = {}
    with PeerServer(binary, gguf, free_port(), threads, parallel=parallel, ctx=4096 * parallel, extra=extra) as peer, \
         UvicornServer(create_app(engine)) as server:
        targets = {"ours": Target("ours", server.url, LABSERVER, lambda t: t, OURS_EXTRA),
                   "llama-server": Target("llama-server", peer.url, LLAMA_CPP, engine.encode,
                                          {"ignore_eos": True, "cache_prompt": True})}
        for name, target in targets.items():
            target.one("Hello", 4)  # warm-up
            log(f"  {name}: shared {prefix_tokens}-token prefix, then a {long_tokens}-token prompt among {streams} streams")
            out[name] = {"shared_prefix": shared_prefix(target, prefix),
                         "long_prompt": long_prompt_gap(target, long_text, streams)}
    ours, theirs = out["ours"], out["llama-server"]

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    out["P12_prefix_ttft"] = ratio(ours["shared_prefix"]["later_p50_ms"], theirs["shared_prefix"]["later_p50_ms"])
    out["P13_gap_over_ttft"] = ours["long_prompt"]["gap_over_ttft"]
    out["P13_peer"] = theirs["long_prompt"]["gap_over_ttft"]
    out["P14_long_ttft"] = ratio(ours["long_prompt"]["long_ttft_ms"], theirs["long_prompt"]["long_ttft_ms"])
    return out


def peer_report(kv: dict) -> str:
    rows = []
    for name in ("ours", "llama-server"):
        s, g = kv[name]["shared_prefix"], kv[name]["long_prompt"]
        rows.append([name, s["first_ms"], s["later_p50_ms"], g["long_ttft_ms"], g["longest_gap_ms"], g["gap_over_ttft"],
                     g["itl_before_p50_ms"]])
    table = format_table(["server", "shared prefix: first TTFT ms", "later TTFT p50 ms", "long prompt TTFT ms",
                          "streams' longest gap ms", "gap / TTFT", "ITL before ms"], rows)
    goals = ", ".join(f"{k} = {kv.get(k)} (goal {op} {v})" for k, (op, v) in PEER_GOALS.items())
    return f"{table}\n{goals}; llama-server's gap / TTFT {kv.get('P13_peer')}"
