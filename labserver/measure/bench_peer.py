"""`make bench-peer`: labserver against llama.cpp on the same GGUF file, measured by the same client.

    python -m labserver.measure.bench_peer --peer-python .venv-peer/bin/python [--out out/bench_peer.json]

llama.cpp is what a CPU user would run instead. Its Python server (llama-cpp-python, built by the
Makefile into its own environment) serves the very GGUF file our default model is converted from. Each
server runs alone on the machine in turn, and each is measured by URL over ``/v1/chat/completions`` with
the same prompt in the model's chat template (a raw prompt makes this instruct model stop at once),
greedy, by ``bench.measure_url``: TTFT, ITL, TPOT and E2E as the client sees them. TTFT is measured
twice: with a fresh prompt per request (a prefill on both servers) and with the same prompt again, where
llama.cpp reuses the KV of its previous request and runs one token's forward (we keep no prefix cache).

    P6 = our client ITL p50 / llama.cpp's client ITL p50 (goal <= 1.0), for the default runner and for
    the w4a8 and int4 routes, with the greedy text of each compared with llama.cpp's and with our float32
    route's (llama.cpp rounds activations to 8 bits, as w4a8 does: its text can part from float32's).

The figures go to ``out/bench_peer.json`` and, when ``out/bench.json`` exists, into it as ``P6``,
``P6_w4a8`` and ``P6_int4``. llama-cpp-python's server has no ``/health`` (its probe figures are 404s:
ignore them) and sends no usage chunk. Left out: llama.cpp's own C++ server (``llama-server``), other quantizations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from .bench import format_table, measure_url
from .bench_speed import free_port
from .client import DEFAULT_PROMPT, stream_generate
from .protocols import openai_protocol
from ..config import EngineConfig
from ..engine.loading import default_gguf_path

MAX_TOKENS = 64


def start_llama_cpp(python: str, gguf: Path, port: int, threads: int, timeout_s: float = 120.0):
    """llama-cpp-python's OpenAI-compatible server in a child process; returns it once /v1/models answers."""
    # Its log goes to a file: llama.cpp writes a lot while loading, and a full pipe would stall it.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048",
                             # Its default lets each new request cut off the one in progress.
                             "--interrupt_requests", "False"],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama.cpp's server exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"llama.cpp's server did not answer within {timeout_s} s")


def measure(url: str, prompt: str, runs: int) -> dict:
    protocol = openai_protocol(url, chat=True)
    figures = measure_url(url, protocol, prompt, MAX_TOKENS, runs, concurrency=2)
    figures["greedy_text"] = stream_generate(url, prompt, MAX_TOKENS, 0.0, protocol=protocol).text
    return figures


def measure_labserver(config: EngineConfig, prompt: str, runs: int) -> dict:
    from ..engine.engine import Engine
    from ..serve.background import start_fastapi, stop_all

    engine = Engine.from_config(config)
    server = start_fastapi(engine, name="bench-peer")
    try:
        out = measure(server.url, prompt, runs)
    finally:
        stop_all()
    out["runner"] = engine.runner.name
    return out


def run_peer(peer_python: str, prompt: str = DEFAULT_PROMPT, runs: int = 3, threads: int = 2, log=print) -> dict:
    gguf = default_gguf_path()
    log(f"llama.cpp server on {gguf.name} ...")
    proc, ready_s = start_llama_cpp(peer_python, gguf, free_port(), threads)
    try:
        port = proc.args[proc.args.index("--port") + 1]
        peer = measure(f"http://127.0.0.1:{port}", prompt, runs)
    finally:
        proc.terminate()
        proc.wait(10)
    peer["ready_s"] = round(ready_s, 2)
    ours = {}
    for name, quant in (("default", "auto"), ("float32", "none"), ("w4a8", "w4a8"), ("int4", "int4")):
        log(f"labserver, {name} route ...")
        ours[name] = measure_labserver(EngineConfig.from_env(quant=quant, threads=threads), prompt, runs)
    itl = peer["stream"]["p50_itl_ms"]
    return {"P6": round(ours["default"]["stream"]["p50_itl_ms"] / itl, 3),
            "P6_w4a8": round(ours["w4a8"]["stream"]["p50_itl_ms"] / itl, 3),
            "P6_int4": round(ours["int4"]["stream"]["p50_itl_ms"] / itl, 3),
            "raw_peer": {"llama_cpp": peer, "labserver": ours, "gguf": str(gguf), "prompt": prompt,
                         "max_tokens": MAX_TOKENS, "threads": threads}}


def _yes(same: bool) -> str:
    return "yes" if same else "no"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m labserver.measure.bench_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=".venv-peer/bin/python",
                        help="a Python with llama-cpp-python[server] installed")
    parser.add_argument("--out", default="out/bench_peer.json")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = parser.parse_args(argv)
    result = run_peer(args.peer_python, args.prompt, args.runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bench = out.parent / "bench.json"
    if bench.exists():  # P6 joins the other figures of `make bench`
        merged = json.loads(bench.read_text())
        merged.update({k: result[k] for k in ("P6", "P6_w4a8", "P6_int4")})
        bench.write_text(json.dumps(merged, indent=2) + "\n")
    peer, ours = result["raw_peer"]["llama_cpp"], result["raw_peer"]["labserver"]
    rows = [[name, r["stream"]["p50_ttft_ms"], r["stream_repeated"]["p50_ttft_ms"], r["stream"]["p50_itl_ms"],
             None if r is peer else _yes(r["greedy_text"] == peer["greedy_text"]),
             _yes(r["greedy_text"] == ours["float32"]["greedy_text"])]
            for name, r in [("llama.cpp", peer)] + [(f"labserver {r['runner']}", r) for r in ours.values()]]
    print(format_table(["server", "TTFT p50 ms", "same prompt again", "ITL p50 ms", "text = llama.cpp's",
                        "text = float32's"], rows))
    print(f"\nP6 = {result['P6']} (default runner), {result['P6_w4a8']} (w4a8), {result['P6_int4']} (int4); "
          f"goal <= 1.0. Wrote {out}")
    return result


if __name__ == "__main__":
    main()
