"""Where the exercise checkers run the server code a student wrote: on the fake engine, in a real server.

A student's SSE endpoint (notebook 2) or bridge from the engine's blocking generator to the event loop
(notebook 3) is served by uvicorn in a background thread of this process, on ``fake_engine``, whose
steps are sleeps of a known length. What a client sees is then a property of the student's code, not of
how busy the machine is: tokens of a stream that really streams arrive at least a step apart; a bridge
that keeps the event loop free answers ``/health`` in far less than a step.

    serve_student_app(app)                     # a BackgroundServer, replaced on re-runs (one name)
    read_sse(url, body, timeout_s)             # every line of one streamed response, with its arrival time
    bridge_app(engine, bridge)                 # /generate and /health around a student's bridge
    watch_bridge(bridge, step_ms, max_tokens)  # one stream through it while /health is probed

Left out: the real model (too slow and too noisy for a verdict in seconds) and any parsing beyond
``data:`` lines (the client in ``measure.client`` parses the full contract).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from ..config import SamplingParams
from ..engine.sequence import TokenEvent
from ..engine.fake import fake_engine
from ..measure.probes import HealthProbe
from ..serve.background import UvicornServer, start_server, stop
from .display import median

STUDENT_SERVER = "student-server"  # one name: a re-run (or the next check) replaces the last one


def serve_student_app(app) -> UvicornServer:
    """Serve ``app`` with uvicorn on a free port in a background thread, stopping the previous one."""
    return start_server(STUDENT_SERVER, UvicornServer(app))


def stop_student_app() -> None:
    stop(STUDENT_SERVER)


@dataclass
class SSEReading:
    """One streamed response as the client saw it: each line with its arrival (ms after sending)."""
    status: int | None = None
    content_type: str = ""
    lines: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None  # a timeout (the stream never ended) or a refused connection

    @property
    def data(self) -> list[tuple[float, str]]:
        """``(arrival_ms, payload)`` of every ``data:`` line (one leading space stripped, as SSE does)."""
        out = []
        for t, line in self.lines:
            if line.startswith("data:"):
                payload = line[5:]
                out.append((t, payload[1:] if payload.startswith(" ") else payload))
        return out

    @property
    def tokens(self) -> list[tuple[float, str]]:
        """``(arrival_ms, token text)`` of every ``data:`` line whose payload is a JSON object with a token."""
        out = []
        for t, payload in self.data:
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if isinstance(event, dict) and "token" in event:
                out.append((t, event["token"]))
        return out


def read_sse(url: str, body: dict, timeout_s: float = 10.0, path: str = "/generate") -> SSEReading:
    """POST ``body`` and read the response line by line until it ends or ``timeout_s`` passes."""
    reading, start = SSEReading(), time.perf_counter()
    try:
        with httpx.Client(timeout=timeout_s) as http:
            with http.stream("POST", url.rstrip("/") + path, json=body) as response:
                reading.status, reading.content_type = response.status_code, response.headers.get("content-type", "")
                for line in response.iter_lines():
                    reading.lines.append(((time.perf_counter() - start) * 1000, line))
                    if time.perf_counter() - start > timeout_s:
                        raise httpx.ReadTimeout("the stream did not end")
    except httpx.HTTPError as exc:
        reading.error = f"{type(exc).__name__} after {time.perf_counter() - start:.1f} s: {exc}"
    return reading


def one_by_one(times: list[float], step_ms: float) -> tuple[bool, str]:
    """Did tokens made ``step_ms`` apart arrive apart? The sleeps between the first token and the last
    add up to ``(n - 1) * step_ms``; the client may see the first token late (a busy machine), which
    shortens the spread, so half of it is required: a buffered answer has a spread of ~0."""
    spread, needed = times[-1] - times[0], 0.5 * (len(times) - 1) * step_ms
    return spread >= needed, (f"first token at {times[0]:.0f} ms, last at {times[-1]:.0f} ms: {spread:.0f} ms "
                              f"apart, and the server slept {(len(times) - 1) * step_ms:.0f} ms between them "
                              f"(streamed: at least {needed:.0f} ms)")


def bridge_app(engine, bridge):
    """A FastAPI app whose ``/generate`` streams ``bridge(engine.generate_stream(...))`` as SSE, with ``/health``.

    ``bridge`` is the student's ``async def bridge(gen)``: it must yield every item of the blocking
    generator ``gen`` without running ``next(gen)`` on the event loop, and finish after the last one.
    """
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(body: dict):
        gen = engine.generate_stream(str(body.get("prompt", "")), SamplingParams(int(body.get("max_tokens", 8)), 0.0))

        async def frames():
            async for item in bridge(gen):
                if isinstance(item, TokenEvent):
                    yield f"data: {json.dumps({'token': item.token})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    return app


@dataclass
class BridgeRun:
    reading: SSEReading
    health_ms: list[float]  # latency of each /health probe sent while the stream ran

    @property
    def health_p50_ms(self) -> float | None:
        return median(self.health_ms)


def watch_bridge(bridge, step_ms: float = 100.0, max_tokens: int = 6, timeout_s: float = 5.0) -> BridgeRun:
    """Stream ``max_tokens`` tokens of ``fake_engine`` through ``bridge`` while ``/health`` is probed every 10 ms."""
    server = serve_student_app(bridge_app(fake_engine(prefill_ms=step_ms, step_ms=step_ms), bridge))
    try:
        with HealthProbe(server.url, interval_ms=10, timeout_s=timeout_s) as probe:
            reading = read_sse(server.url, {"prompt": "go", "max_tokens": max_tokens}, timeout_s)
        return BridgeRun(reading, [latency for _, latency in probe.samples])
    finally:
        stop_student_app()
