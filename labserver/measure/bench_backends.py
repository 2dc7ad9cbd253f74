"""How `make bench` measures each way of serving one engine: the engine alone on one thread, a FastAPI
server on a backend (the engine thread, or the engine in its own process), the Flask baseline, or any
running server by URL. Each returns the client-side summary (``stats.summarize``) of sequential greedy
streams and, given a concurrency, of that many at once while /health is probed.

Left out: the figures and goals computed from these (``bench``), and the speed figures (``bench_speed``).
"""
from __future__ import annotations

import statistics

import httpx

from .client import DEFAULT_PROMPT, DEFAULT_TIMEOUT, blocking_generate, run_concurrent, stream_generate
from .probes import HealthProbe
from .protocols import LABSERVER
from .stats import summarize
from ..config import SamplingParams
from ..engine.loading import off_thread
from ..engine.sequence import Finish
from ..serve.app import create_app
from ..serve.limits import ServerLimits
from ..serve.flask_app import create_flask_app
from ..serve.background import FlaskServer, UvicornServer


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


def sequential(generate, url: str, prompt: str, max_tokens: int, runs: int, fresh: bool = False) -> list:
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

    alone = summarize(sequential(one, url, prompt, max_tokens, runs, fresh=True))
    repeated = summarize(sequential(one, url, prompt, max_tokens, runs))
    health, loaded = _under_load(url, prompt, max_tokens, concurrency, True, protocol)
    return {"url": url, "protocol": type(protocol).__name__, "model": getattr(protocol, "model", None),
            "stream": alone, "stream_repeated": repeated, "concurrent": loaded, "health": health,
            "setup": {"max_tokens": max_tokens, "runs": runs, "concurrency": concurrency, "prompt": prompt}}


def fastapi_app(engine, backend: str, stream_interval: int = 1):
    """The FastAPI app for ``backend``, its backend started. A ``"process"`` backend starts its engine
    process now (loading a model there may take longer than a server may take to start), from a
    ``Frontend``: the engine's tokenizer and limits, for the API side."""
    if backend == "process":
        from ..serve.process.frontend import Frontend

        engine = Frontend.of(engine)
    app = create_app(engine, backend=backend, limits=ServerLimits(stream_interval=stream_interval))
    app.state.backend.start()
    return app


def measure_fastapi(engine, backend: str, prompt: str, max_tokens: int, runs: int, concurrency: int = 0,
                    stream_interval: int = 1) -> dict:
    app = fastapi_app(engine, backend, stream_interval)
    try:
        with UvicornServer(app) as server:
            out = {"backend": app.state.backend.kind,
                   "stream": summarize(sequential(stream_generate, server.url, prompt, max_tokens, runs))}
            if concurrency:
                out["health"], out["concurrent"] = _under_load(server.url, prompt, max_tokens, concurrency, True)
    finally:
        if app.state.backend is not None:  # the server's shutdown closes it; a failed start does not
            app.state.backend.close()
    return out


def measure_flask(engine, prompt: str, max_tokens: int, runs: int, concurrency: int) -> dict:
    with FlaskServer(create_flask_app(engine)) as server:
        out = {"blocking": summarize(sequential(blocking_generate, server.url, prompt, max_tokens, runs))}
        out["health"], out["concurrent"] = _under_load(server.url, prompt, max_tokens, concurrency, False)
    return out
