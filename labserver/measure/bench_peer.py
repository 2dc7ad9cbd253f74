"""`make bench-peer`: labserver against llama.cpp's own `llama-server`, same GGUF file, same client.

    python -m labserver.measure.bench_peer [--repeats 3] [--runs 5] [--out out/bench_peer.json]

llama.cpp's C++ server, built natively for this CPU (`peer.py`), is what a CPU user runs instead. Both
servers get the same prompt tokens (our chat template, sent to `/completion` as ids), greedy, a fresh
prompt per request, `cache_prompt: false` on llama.cpp and no prefix cache on ours (no prefix-cache
hits: every TTFT is a whole prefill), the same number of output tokens (`n_predict` + `ignore_eos` there). Each figure comes from
one client (`client.py`); the servers run side by side but only one is busy at a time, in rounds that
alternate between them so that the load of other processes on the machine falls on both alike.

    P6         = our decode step (client ITL p50) / llama-server -t 2 -np 1's      (goal <= 1.0)
    P6_prefill = our TTFT p50 with a fresh prompt / llama-server -np 1's           (goal <= 1.0)
    P7_peer    = tokens/s of 8 concurrent streams through us / through -np 8       (goal >= 1.0)

and the KV cache (``bench_kv.against_peer``, llama-server's prompt cache on as by default, -np 8):

    P12_prefix_ttft = later requests' TTFT with a shared 1.3k-token opening, ours / theirs   (goal <= 1.0)
    P13_gap_over_ttft = the longest gap of 4 running streams while a 1.5k-token prompt is
                      prefilled, as a fraction of that prompt's TTFT (ours)                (goal <= 0.2)
    P14_long_ttft   = that prompt's TTFT, ours / theirs                                    (goal <= 1.0)

(`make bench`'s P7 is another ratio: 8 streams / one stream through us.)

llama.cpp's threads spin at their barriers: on a CPU that other processes keep busy its step time
collapses far more than ours (OpenMP threads sleep after a short spin), so the figures mean something
only on an otherwise idle machine; the rounds show how steady they were.

Our client is checked against llama-server's own per-response `timings` (`prompt_ms`,
`predicted_per_token_ms`). The greedy text of each route is compared with llama.cpp's and float32's.
Left out: other quantizations, llama.cpp's OpenAI endpoints, speculative decoding, GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Callable

from .bench_backends import fresh_prompt
from .bench_kv import against_peer, peer_report
from .tables import format_table
from .client import DEFAULT_PROMPT
from .peer import PeerServer, free_port, ensure_server, this_cpu
from .protocols import LABSERVER, LLAMA_CPP
from .stats import aggregate_tokens_per_s, percentiles
from .targets import OURS_EXTRA, PEER_EXTRA, Target
from .trace import Trace

MAX_TOKENS = 64
STREAMS = 8
# One SSE event's trip from the server's write to our parse on loopback: well under 1 ms when the CPU is
# free, up to one scheduler time slice (a few ms) when the 2 cores are busy (see `timings_agreement`).
DELIVERY_MS = 5.0
# ---- pure parts: what the tests check -------------------------------------------------------------

def _p50(values) -> float | None:
    values = [v for v in values if v is not None]
    return percentiles(values, (50,))[50] if values else None


def figures(single: list[Trace], rounds: list[list[Trace]]) -> dict:
    """Client p50s of the 1-stream requests (and the server's own, where it says), and tokens/s."""
    rates = [aggregate_tokens_per_s(r) for r in rounds]
    return {"step_ms": _p50([g for t in single for g in t.itl_ms]),
            "prefill_ms": _p50([t.ttft_ms for t in single]),
            "tokens_per_s_1": _p50([t.tokens_per_s for t in single]),
            f"tokens_per_s_{STREAMS}": _p50(rates), f"tokens_per_s_{STREAMS}_rounds": rates,
            "server_step_ms": _p50([t.timings.get("predicted_per_token_ms") for t in single]
                                   + [s for t in single for s in t.decode_step_ms]),
            "server_prefill_ms": _p50([t.timings.get("prompt_ms", t.prefill_time_ms) for t in single]),
            "requests": len(single) + sum(len(r) for r in rounds)}


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(ours: dict, peer_1: dict, peer_n: dict) -> dict:
    return {"P6": ratio(ours["step_ms"], peer_1["step_ms"]),
            "P6_prefill": ratio(ours["prefill_ms"], peer_1["prefill_ms"]),
            "P6_prefill_server": ratio(ours["server_prefill_ms"], peer_1["server_prefill_ms"]),
            "P7_peer": ratio(ours[f"tokens_per_s_{STREAMS}"], peer_n[f"tokens_per_s_{STREAMS}"])}


def timings_agreement(traces: list[Trace], delivery_ms: float = DELIVERY_MS) -> dict:
    """Our client's TTFT and TPOT against llama-server's own `timings`, by what its timers span.

    llama-server's prompt timer starts when its loop takes up the prompt, and stops when it samples the
    first token; `predicted_ms` runs from there to the last token's sampling (server-common.h). What
    comes before, the HTTP parse, tokenization, saving the previous prompt to its RAM cache and the
    task queue, is in no timer: O, tens of ms, which neither side can split off. So with d_first and
    d_last each chunk's trip to our parser:

        TTFT - prompt_ms                      = O + d_first  >= 0       (causality, every request)
        E2E  - prompt_ms - predicted_ms       = O + d_last   >= 0
        (E2E - TTFT) - predicted_ms           = d_last - d_first

    A trip is two hand-offs (the loop to the HTTP thread, the socket to our reader), each at most
    `delivery_ms` (scaled by the caller for the load). The first chunk may also wait one decode step:
    llama-server's compute threads, one per core, go straight on to the next step and spin at their
    barriers, so the HTTP thread may get a core only when that step ends; after the last token no step
    follows. Hence d_last - d_first lies in [-(2 delivery + step), 2 delivery], i.e. TPOT - the
    server's per-token time lies in that range / (tokens - 1): where our client puts the first token
    against the last is what the server's timers can check, not O."""
    rows = [{"ttft": t.ttft_ms - t.timings["prompt_ms"],  # O + d_first
             "outside": t.e2e_ms - t.timings["prompt_ms"] - t.timings["predicted_ms"],  # O + d_last
             "span": (t.e2e_ms - t.ttft_ms) - t.timings["predicted_ms"],  # d_last - d_first
             "step": t.timings["predicted_per_token_ms"]}
            for t in traces if t.ok and t.n_tokens > 1 and "prompt_ms" in t.timings and "predicted_ms" in t.timings]
    step_ms = _p50([r["step"] for r in rows]) or 0.0
    low, high = -(2 * delivery_ms + step_ms), 2 * delivery_ms
    return {"requests": len(rows), "p50_ttft_minus_prompt_ms": _p50([r["ttft"] for r in rows]),
            "p50_outside_timers_ms": _p50([r["outside"] for r in rows]),
            "p50_span_minus_predicted_ms": _p50([r["span"] for r in rows]),
            "causal": sum(r["ttft"] >= 0.0 and r["outside"] >= 0.0 for r in rows),
            "span_within": sum(low <= r["span"] <= high for r in rows), "span_bounds_ms": (low, high),
            "tolerance": f"TTFT >= prompt_ms and E2E >= prompt_ms + predicted_ms; (E2E - TTFT) - predicted_ms in "
                         f"[-(2 x {delivery_ms:g} + one step {step_ms:g}), 2 x {delivery_ms:g}] ms"}


def problems(name: str, traces: list[Trace], max_tokens: int, prompt_tokens: Callable | None = None) -> list[str]:
    """Failed requests, answers cut short, a server reusing a cached prefix, a prompt tokenized otherwise."""
    out = [f"{name}: {t.error}" for t in traces if not t.ok]
    short = [t.n_tokens for t in traces if t.ok and t.n_tokens < max_tokens]
    if short:
        out.append(f"{name}: {len(short)} answers shorter than {max_tokens} tokens ({min(short)})")
    if any(t.timings.get("cache_n") or t.timings.get("cached_tokens") for t in traces):  # theirs, ours
        out.append(f"{name}: prefix-cache hits (timings.cache_n or cached_tokens > 0)")
    if prompt_tokens and any(t.usage.get("prompt_tokens") not in (None, prompt_tokens(t.prompt)) for t in traces):
        out.append(f"{name}: the server counted other prompt tokens than we sent")
    return out


# ---- the run ----------------------------------------------------------------------------------------

def run_peer(prompt: str = DEFAULT_PROMPT, repeats: int = 3, runs: int = 5, max_tokens: int = MAX_TOKENS,
             routes: tuple[str, ...] = ("w4a8", "float32"), threads: int = 2, peer_binary: str | None = None,
             log=print, kv: bool = True, kv_only: bool = False) -> dict:
    from ..config import EngineConfig
    from ..engine.engine import Engine
    from ..engine.loading import default_gguf_path
    from ..serve.app import create_app
    from ..serve.background import UvicornServer

    gguf = default_gguf_path()
    binary, build_note, extra = (Path(peer_binary), "given", ()) if peer_binary else ensure_server(gguf, log=log)
    # The KV experiments need the prefix cache; the rest runs without, as llama-server with cache_prompt
    # off: each fresh prompt is prefilled whole on both sides (ours reuses the template's opening).
    cached = Engine.from_config(EngineConfig.from_env(threads=threads))
    if kv_only:
        log("the KV cache against llama-server ...")
        return {"kv": against_peer(cached, binary, gguf, threads, extra=extra, log=log), "cpu": this_cpu().describe(),
                "kernels": kernels_note(), "peer": {"binary": str(binary), "build": build_note, "args": list(extra)}}
    engine = Engine(cached.source, cached.tokenizer, dataclasses.replace(cached.config, prefix_caching=False))
    ids = engine.encode  # the chat template's ids; llama-server gets exactly these tokens
    count = iter(range(10**9))

    def fresh(n):
        return [fresh_prompt(prompt, next(count)) for _ in range(n)]

    with PeerServer(binary, gguf, free_port(), threads, parallel=1, ctx=2048, extra=extra) as p1, \
         PeerServer(binary, gguf, free_port(), threads, parallel=STREAMS, ctx=1024 * STREAMS, extra=extra) as pn, \
         UvicornServer(create_app(engine)) as ours_server:
        ours = Target(f"labserver {engine.runner.name}", ours_server.url, LABSERVER, lambda t: t, OURS_EXTRA)
        peer_1 = Target("llama-server -np 1", p1.url, LLAMA_CPP, ids, PEER_EXTRA)
        peer_n = Target(f"llama-server -np {STREAMS}", pn.url, LLAMA_CPP, ids, PEER_EXTRA)
        for target in (ours, peer_1, peer_n):  # warm-up: connections, first steps, a first batch of 8
            target.one(prompt, 8)
            if target is not peer_1:
                target.many([prompt] * STREAMS, 8)
        texts = {t.name: t.one(prompt, max_tokens).text for t in (ours, peer_1)}
        for r in range(repeats):
            log(f"round {r + 1}/{repeats}: 1 stream x {runs} and {STREAMS} streams on each server")
            for target in (ours, peer_1, peer_n):
                target.single += [target.one(p, max_tokens) for p in fresh(runs)]
                if target is not peer_1:
                    target.rounds.append(target.many(fresh(STREAMS), max_tokens))
                f = figures(target.single[-runs:], target.rounds[-1:])
                log(f"  {target.name}: step {f['step_ms']} ms, prefill {f['prefill_ms']} ms, "
                    f"{STREAMS} streams {f[f'tokens_per_s_{STREAMS}']} tokens/s")
        targets = [ours, peer_1, peer_n]
        for route in routes:  # further routes: 1 stream and the greedy text only
            log(f"labserver, {route} route ...")
            quant = "none" if route == "float32" else route
            other = Engine.from_config(EngineConfig.from_env(quant=quant, threads=threads, prefix_caching=False))
            with UvicornServer(create_app(other)) as server:
                target = Target(f"labserver {route} ({other.runner.name})", server.url, LABSERVER, lambda t: t,
                                OURS_EXTRA)
                target.one(prompt, 8)
                texts[target.name] = target.one(prompt, max_tokens).text
                target.single = [target.one(p, max_tokens) for p in fresh(runs * repeats)]
            targets.append(target)
    kv_result = None
    if kv:
        log("the KV cache against llama-server ...")
        kv_result = against_peer(cached, binary, gguf, threads, extra=extra, log=log)
    setup = {"prompt": prompt, "prompt_tokens": len(ids(prompt)), "max_tokens": max_tokens, "repeats": repeats,
             "runs": runs, "streams": STREAMS, "threads": threads, "gguf": str(gguf), "peer_extra": PEER_EXTRA,
             "ours_extra": OURS_EXTRA}
    return {**outcome(targets, routes, runs, max_tokens), "texts": texts, "cpu": this_cpu().describe(), "kv": kv_result,
            "kernels": kernels_note(), "peer": {"binary": str(binary), "build": build_note, "args": list(extra)}, "setup": setup}


def outcome(targets: list[Target], routes, runs: int, max_tokens: int) -> dict:
    """Ratios, per-round ratios, figures, timings agreement and problems: targets are ours, -np 1, -np N,
    then one per further route."""
    ours, peer_1, peer_n = targets[:3]
    figs = {t.name: figures(t.single, t.rounds) for t in targets}
    n = f"tokens_per_s_{STREAMS}"

    def step(t, i):  # the client ITL p50 of round i's single requests
        return _p50([g for trace in t.single[i * runs:(i + 1) * runs] for g in trace.itl_ms])

    return {**ratios(figs[ours.name], figs[peer_1.name], figs[peer_n.name]),
            **{f"P6_{r}": ratio(figs[t.name]["step_ms"], figs[peer_1.name]["step_ms"])
               for r, t in zip(routes, targets[3:])},
            "P6_rounds": [ratio(step(ours, i), step(peer_1, i)) for i in range(len(ours.rounds))],
            "P7_peer_rounds": [ratio(a, b) for a, b in zip(figs[ours.name][f"{n}_rounds"],
                                                      figs[peer_n.name][f"{n}_rounds"])],
            "timings_agreement": timings_agreement(peer_1.single + peer_n.single), "figures": figs,
            "problems": [p for t in targets for p in problems(t.name, t.single + [x for r in t.rounds for x in r],
                                                              max_tokens, len if t.protocol is LLAMA_CPP else None)]}


def kernels_note() -> str:
    """Which vector path our C kernels were built for, e.g. "avx2 (avxvnni fma openmp) kernels"."""
    from ..model import kernels
    ok, why = kernels.available()
    return f"{kernels.path()} ({kernels.features()}) kernels" if ok else f"no C kernels: {why}"


def report(result: dict) -> str:
    figs, texts = result["figures"], result["texts"]
    f32 = next((k for k in texts if k.startswith("labserver float32")), None)
    n = f"tokens_per_s_{STREAMS}"

    def same(name, ref):  # blank for the reference itself, for a server without a greedy text
        return None if name == ref or ref not in texts or name not in texts else \
            ("yes" if texts[name] == texts[ref] else "no")

    rows = [[name, f["step_ms"], f["prefill_ms"], f["server_step_ms"], f["server_prefill_ms"], f["tokens_per_s_1"],
             f[n], same(name, "llama-server -np 1"), same(name, f32)] for name, f in figs.items()]
    a, s = result["timings_agreement"], result["setup"]
    lines = [f"CPU: {result['cpu']}", f"labserver: {result['kernels']}; llama-server: {result['peer']['build']}",
             f"{s['prompt_tokens']}-token prompt, {s['max_tokens']} tokens out, greedy, {s['threads']} threads, "
             f"{s['repeats']} rounds of {s['runs']} single requests and {STREAMS} concurrent streams", "",
             format_table(["server", "step ms", "prefill ms", "server step", "server prefill", "1-stream tok/s",
                           f"{STREAMS}-stream tok/s", "text = llama.cpp", "text = float32"], rows), "",
             f"P6 = {result['P6']} (per round {result['P6_rounds']}), P6_prefill = {result['P6_prefill']} "
             f"(server-side {result['P6_prefill_server']}), P7_peer = {result['P7_peer']} (per round {result['P7_peer_rounds']})"
             + "".join(f", {k} = {v}" for k, v in result.items() if k.startswith("P6_") and k[3:] not in
                       ("rounds", "prefill", "prefill_server")),
             "goals: P6 <= 1, P6_prefill <= 1, P7_peer >= 1. The machine may be shared: compare the rounds.",
             f"client vs llama-server timings, {a['requests']} requests: TTFT - prompt_ms p50 "
             f"{a['p50_ttft_minus_prompt_ms']} ms, of which outside llama-server's timers p50 "
             f"{a['p50_outside_timers_ms']} ms ({a['causal']} causal); first-to-last token - predicted_ms p50 "
             f"{a['p50_span_minus_predicted_ms']} ms ({a['span_within']} within); tolerance: {a['tolerance']}"]
    lines += [f"warning: {p}" for p in result["problems"]]
    if result.get("kv"):
        lines += ["", peer_report(result["kv"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m labserver.measure.bench_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench_peer.json")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all servers")
    parser.add_argument("--runs", type=int, default=5, help="single-stream requests per server and round")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--routes", default="w4a8,float32", help="further labserver routes ('' for none)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--peer-binary", help="a llama-server to use as it is (default: build one, cached)")
    parser.add_argument("--kv-only", action="store_true", help="only the KV cache's figures (P12-P14)")
    args = parser.parse_args(argv)
    result = run_peer(args.prompt, args.repeats, args.runs, args.max_tokens,
                      tuple(r for r in args.routes.split(",") if r), peer_binary=args.peer_binary, kv_only=args.kv_only)
    if args.kv_only:
        out = Path(args.out).with_name("bench_peer_kv.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"CPU: {result['cpu']}; labserver: {result['kernels']}\n" + peer_report(result["kv"]))
        return result
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bench = out.parent / "bench.json"
    if bench.exists():  # the P figures join the others of `make bench`
        merged = json.loads(bench.read_text())
        merged.update({k: v for k, v in result.items() if k.startswith(("P6", "P7_peer")) and "rounds" not in k})
        merged.update({k: v for k, v in (result.get("kv") or {}).items() if k.startswith("P1")})
        bench.write_text(json.dumps(merged, indent=2) + "\n")
    print(report(result))
    print(f"Wrote {out}")
    return result


if __name__ == "__main__":
    main()
