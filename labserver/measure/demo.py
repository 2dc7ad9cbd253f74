"""`make demo`: one prompt, one engine, two servers: the blocking Flask baseline, then FastAPI streaming.

    python -m labserver.measure.demo [--prompt "..."] [--max-tokens 64] [--out out/demo.png]

Both servers run in background threads of this process and share the loaded model. The Flask answer
appears all at once after a wait; the FastAPI answer appears token by token. /health is probed during
each generation, then a table compares TTFT, total time, tokens/s and /health latency, and
`out/demo.png` shows the same in pictures. Two more rows stream the same answer with `--stream-interval`
4 and 16 (tokens sent in groups): what that knob does to the total against Flask's.

The engine runs without its prefix cache: the same prompt goes to every server, and each one's TTFT must
hold a whole prefill. Left out: sampling (greedy, so both servers print the same text), concurrency (see
`bench`), and any other server configuration.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from .tables import format_table
from .client import DEFAULT_PROMPT, blocking_generate, stream_generate
from .probes import HealthProbe
from .trace import Trace
from ..config import EngineConfig
from ..serve.app import create_app
from ..serve.limits import ServerLimits
from ..serve.flask_app import create_flask_app
from .plotting import plot_demo
from ..serve.background import FlaskServer, UvicornServer


def _row(name: str, trace: Trace, probe: HealthProbe) -> list:
    health = probe.summary()
    return [name, trace.ttft_ms, trace.e2e_ms, trace.tokens_per_s, health["p50_ms"], health["max_ms"]]


def reading(blocking: Trace, streamed: Trace, probes: dict[str, HealthProbe], cores: int | None = None) -> str:
    """What the table says, in this run's numbers: the first token and /health, then the whole answer,
    whichever way it went (the streaming server's extra work shares the cores with the model)."""
    cores = cores or os.cpu_count() or 1
    flask, fast = probes["Flask"].summary(), probes["FastAPI"].summary()
    first = (f"Streaming showed its first token {blocking.ttft_ms / streamed.ttft_ms:.1f}x sooner "
             f"({streamed.ttft_ms:.0f} ms against {blocking.ttft_ms:.0f}), and /health kept answering "
             f"(longest wait {fast['max_ms']:.0f} ms against Flask's {flask['max_ms']:.0f}).")
    total = streamed.e2e_ms / blocking.e2e_ms
    if total <= 1.0:
        return first + f" The whole answer took {total:.2f}x Flask's time."
    return first + (f" The whole answer took {total:.2f}x Flask's time: while the model ran, the streaming "
                    f"server also woke its event loop for each of {streamed.n_tokens} events and answered "
                    f"{fast['n']} /health probes (Flask answered {flask['n']}), work that shares the {cores} "
                    f"cores with the model.")


def run_demo(engine, prompt: str = DEFAULT_PROMPT, max_tokens: int = 64, out: str | None = "out/demo.png",
             file=None, intervals: tuple[int, ...] = (4, 16)) -> dict:
    """Run the comparison on `engine`, printing to `file` (stdout); return traces, probes and table."""
    file = file or sys.stdout

    def say(*parts, end="\n"):
        print(*parts, end=end, file=file, flush=True)

    say(f"Prompt: {prompt!r}  ({max_tokens} tokens at most, greedy)\n")
    # One server at a time: each runs the model on a thread of its own, and two live threads that both
    # run torch slow each other down (OpenMP worker teams; notebook 3). A stopped server's thread ends.
    with FlaskServer(create_flask_app(engine)) as flask:
        blocking_generate(flask.url, prompt, 2, 0.0)  # warm-up: first connection and first steps
        say(f"[Flask, blocking]  {flask.url}/generate\nwaiting...", end=" ")
        with HealthProbe(flask.url) as flask_probe:
            blocking = blocking_generate(flask.url, prompt, max_tokens, 0.0)
        say(f"({blocking.ttft_ms / 1000:.1f} s)\n{blocking.text.strip()}\n")

    with UvicornServer(create_app(engine)) as fastapi:
        stream_generate(fastapi.url, prompt, 2, 0.0)  # warm-up
        say(f"[FastAPI, streaming]  {fastapi.url}/generate")
        with HealthProbe(fastapi.url) as fastapi_probe:
            streamed = stream_generate(fastapi.url, prompt, max_tokens, 0.0,
                                       on_token=lambda text: say(text, end=""))
        say("\n")
    # The same stream with --stream-interval N: tokens sent N at a time, the host work per send paid once
    # per group (the first token still at once). The tokens are the same; the totals say what it buys.
    grouped = {}
    for n in intervals:
        with UvicornServer(create_app(engine, limits=ServerLimits(stream_interval=n))) as server:
            stream_generate(server.url, prompt, 2, 0.0)  # warm-up
            with HealthProbe(server.url) as probe:
                grouped[n] = (stream_generate(server.url, prompt, max_tokens, 0.0), probe)

    for trace in (blocking, streamed, *(t for t, _ in grouped.values())):
        if not trace.ok:
            raise RuntimeError(f"a request failed: {trace.error}")
    table = format_table(
        ["server", "TTFT ms", "total ms", "tokens/s", "/health p50 ms", "/health max ms"],
        [_row("Flask (blocking)", blocking, flask_probe), _row("FastAPI (streaming)", streamed, fastapi_probe)]
        + [_row(f"FastAPI (--stream-interval {n})", t, p) for n, (t, p) in grouped.items()])
    probes = {"FastAPI": fastapi_probe, "Flask": flask_probe}
    say(table + "\n\n" + textwrap.fill(reading(blocking, streamed, probes), 100))
    if out is not None:
        plot_demo(streamed, blocking, out, probes)
        say(f"\nwrote {out}")
    return {"stream": streamed, "blocking": blocking, "probes": probes, "table": table}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m labserver.measure.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="out/demo.png")
    args = parser.parse_args(argv)
    from ..engine.engine import Engine

    print("Loading the model (the first run converts it once; later runs take about a second) ...", flush=True)
    # No prefix cache: both servers get the same prompt, and the second would find it cached (its TTFT a
    # one-token forward instead of the prefill the comparison is about).
    engine = Engine.from_config(EngineConfig.from_env(prefix_caching=False))
    return run_demo(engine, args.prompt, args.max_tokens, args.out)


if __name__ == "__main__":
    main()
