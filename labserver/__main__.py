"""Command line: ``python -m labserver serve | flask | demo | bench | load``.

``serve`` runs the streaming FastAPI server in the foreground, ``flask`` the blocking baseline; both bind
127.0.0.1 unless ``--host`` says otherwise. ``demo`` and ``bench`` are the scripts behind ``make demo``
and ``make bench``; ``load`` sends open-loop load to any OpenAI-compatible server (``measure/load_cli.py``).
This module only parses arguments; each command lives in its own module.
"""

from __future__ import annotations

import argparse
import sys
import time

from .config import IMPLS, QUANTS


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="'default' (SmolLM2-135M-Instruct), a Hugging Face id, a folder or a .gguf "
                                   "(env LABSERVER_MODEL)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (env LABSERVER_DTYPE)")
    p.add_argument("--impl", choices=list(IMPLS), help="forward pass: 'auto' (lean llama when it applies), "
                                                       "'lean' or 'transformers' (env LABSERVER_IMPL)")
    p.add_argument("--quant", choices=list(QUANTS), help="weight format of the lean runner: auto (the default: "
                                                         "the fastest exact one measured on this machine), q4_1 "
                                                         "(GGUF blocks, exact), w4a8 (those blocks "
                                                         "times 8-bit activations: faster, not exact), fp16, "
                                                         "none (env LABSERVER_QUANT)")
    p.add_argument("--threads", type=int, help="threads of the model's steps (env LABSERVER_THREADS; default: the "
                                               "fastest of the physical cores, all but one and half, measured at "
                                               "the first start)")
    p.add_argument("--kv-cache-memory", help="the KV cache's pool: 'auto' (a quarter of this machine's memory, at "
                                             "most what max_batch whole contexts need), bytes ('2GiB', '500MB') or "
                                             "a fraction of memory ('0.2'); touched only as it fills "
                                             "(env LABSERVER_KV_CACHE_MEMORY)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="compute every prompt whole, even a prefix the KV cache holds already")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens one forward may carry: decode tokens first, then chunks of prompts (default 256)")


def _server_args(p: argparse.ArgumentParser, port: int) -> None:
    from .serve.limits import ServerLimits

    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes,
                   help="largest request body; larger gets a 413 (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=ServerLimits.idle_timeout_s,
                   help="seconds a connection may stay open with no request in progress (default %(default)s)")
    p.add_argument("--header-timeout", type=float, default=ServerLimits.header_timeout_s,
                   help="seconds from a request's first byte to its last header line, else a 408 "
                        "(default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=ServerLimits.body_timeout_s,
                   help="seconds from a request's headers to the end of its body, else a 408 (default %(default)s)")


def _engine_fields(args) -> dict:
    names = ("model", "dtype", "impl", "quant", "threads", "kv_cache_memory", "prefix_caching", "max_num_batched_tokens")
    return {name: getattr(args, name) for name in names}


def _load_engine(args):
    from .config import EngineConfig
    from .engine.engine import Engine
    from .engine.loading import ModelNotFound

    try:
        return Engine.from_config(EngineConfig.from_env(**_engine_fields(args)))
    except (ModelNotFound, ValueError) as exc:
        sys.exit(f"error: {exc}")


def _limits(args, **fields):
    from .serve.limits import ServerLimits

    try:
        return ServerLimits(max_body_bytes=args.max_body_bytes, idle_timeout_s=args.idle_timeout,
                            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, **fields)
    except ValueError as exc:
        sys.exit(f"error: {exc}")


def serve(args) -> None:
    from .serve.app import create_app
    from .serve.drain import serve_app

    limits = _limits(args, max_concurrent=args.max_concurrent, send_timeout_s=args.send_timeout,
                     stream_interval=args.stream_interval, max_connections=args.max_connections,
                     drain_timeout_s=args.drain_timeout)
    if args.backend == "process":
        return serve_processes(args, limits)
    if args.api_servers != 1:
        sys.exit("error: --api-servers needs --backend process (API processes share one engine process)")
    app = create_app(_load_engine(args), backend=args.backend, limits=limits)
    print(f"labserver (FastAPI, streaming) on http://{args.host}:{args.port}  page: /  docs: /docs  "
          f"OpenAI API: /v1  metrics: /metrics", flush=True)
    sys.exit(serve_app(app, limits, host=args.host, port=args.port, log_level="info"))


def serve_processes(args, limits) -> None:
    """The engine in its own process, ``--api-servers`` API processes in front of it; the model is loaded
    there only (this process supervises: it restarts the engine process if it dies, and drains every API
    process on SIGTERM or Ctrl-C)."""
    from .config import EngineConfig
    from .serve.api_servers import ApiServers
    from .serve.background import ServerStartError
    from .serve.process.core_proc import EngineSpec
    from .serve.process.supervisor import EngineStartError

    try:
        spec = EngineSpec(EngineConfig.from_env(**_engine_fields(args)))
        servers = ApiServers(spec, args.api_servers, args.host, args.port, limits, log_level="info").start()
    except (ValueError, EngineStartError, ServerStartError) as exc:
        sys.exit(f"error: {exc}")

    print(f"labserver (FastAPI, streaming) on {servers.url}: {args.api_servers} API process(es) "
          f"{servers.api_pids}, engine process {servers.engine_pid}", flush=True)
    code = servers.run_foreground()
    if servers.failed:
        sys.exit(f"error: {servers.failed}")
    sys.exit(code)


def flask(args) -> None:
    from .serve.flask_app import create_flask_app
    from .serve.background import FlaskServer, ServerStartError

    limits = _limits(args)
    server = FlaskServer(create_flask_app(_load_engine(args), limits=limits), host=args.host, port=args.port,
                         limits=limits)
    try:
        server.start()
    except ServerStartError as exc:
        sys.exit(f"error: {exc}")
    print(f"labserver baseline (Flask, blocking, one request at a time) on {server.url}", flush=True)
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    from .serve.limits import ServerLimits

    parser = argparse.ArgumentParser(prog="python -m labserver", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="the streaming FastAPI server (SSE)")
    _server_args(p, 5000)
    p.add_argument("--backend", default="auto",
                   choices=["auto", "batched", "thread", "process", "executor", "blocking"],
                   help="where inference runs: 'auto' = the batched scheduler on the engine thread (or "
                        "'thread', streams interleaved one step at a time), 'process' = the batched "
                        "scheduler in an engine process of its own (over ZMQ), or the lab's variants")
    p.add_argument("--api-servers", type=int, default=1,
                   help="with --backend process: API server processes sharing the one engine process "
                        "(default %(default)s)")
    p.add_argument("--max-concurrent", type=int, default=ServerLimits.max_concurrent,
                   help="generations at once; one more gets a 429 (default %(default)s)")
    p.add_argument("--send-timeout", type=float, default=ServerLimits.send_timeout_s,
                   help="seconds a stream's client may read nothing before it is dropped (default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=ServerLimits.drain_timeout_s,
                   help="on SIGTERM or Ctrl-C: seconds open requests may finish before they end with an error "
                        "event and [DONE]; new ones get a 503 meanwhile (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=ServerLimits.max_connections,
                   help="open connections per API server; a request beyond them gets a 503 (default %(default)s)")
    p.add_argument("--stream-interval", type=int, default=ServerLimits.stream_interval,
                   help="tokens per write of a stream: the first at once, then every N, the rest with the "
                        "finish (vLLM's --stream-interval; default %(default)s)")
    _server_args(sub.add_parser("flask", help="the blocking Flask baseline"), 5001)
    sub.add_parser("demo", help="blocking vs streaming on one prompt, live tokens, table and plot", add_help=False)
    sub.add_parser("bench", help="measure the overhead ratios and write out/bench.json", add_help=False)
    sub.add_parser("load", help="open-loop load at a request rate, goodput, rate sweeps (as vllm bench serve)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("demo", "bench", "load"):
        from importlib import import_module

        module = {"load": "load_cli"}.get(args.command, args.command)
        return import_module(f"labserver.measure.{module}").main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    {"serve": serve, "flask": flask}[args.command](args)


if __name__ == "__main__":
    main()
