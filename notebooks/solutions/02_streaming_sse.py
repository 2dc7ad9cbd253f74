"""Reference solutions for notebook 2, streaming with Server-Sent Events.

    python notebooks/solutions/02_streaming_sse.py    # runs every checker against the default model
"""
import asyncio
import json
import time

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from labserver import SamplingParams, TokenEvent


def parse_sse_line(line):
    if not line.startswith("data:"):
        return None  # the blank separator line, comments (":"), other fields
    data = line[len("data:"):]
    data = data[1:] if data.startswith(" ") else data  # SSE strips one leading space
    if not data.startswith("{"):
        return None  # [DONE]
    return json.loads(data)


def my_stream(url, prompt, max_tokens):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    tokens = []
    with httpx.Client(timeout=120) as client:
        start = time.perf_counter()
        with client.stream("POST", url + "/generate", json=body) as response:
            for line in response.iter_lines():
                event = parse_sse_line(line)
                if event is not None and "token" in event:
                    tokens.append(((time.perf_counter() - start) * 1000, event["token"]))
    return tokens


def make_sse_app(engine):
    app = FastAPI()

    @app.post("/generate")
    async def generate(body: dict):
        params = SamplingParams(max_tokens=int(body.get("max_tokens", 16)), temperature=0)
        tokens = engine.generate_stream(body["prompt"], params)

        async def frames():  # each blocking step runs on a worker thread; the loop stays free meanwhile
            while (item := await asyncio.to_thread(next, tokens, None)) is not None:
                if isinstance(item, TokenEvent):
                    yield f"data: {json.dumps({'token': item.token})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    return app


def run_checks(engine) -> bool:
    from labserver.lab import checks
    from labserver.serve.background import start_fastapi, stop

    fastapi = start_fastapi(engine, name="solutions-02")
    try:
        return all([checks.check_parse_sse_line(parse_sse_line, fastapi.url),
                    checks.check_my_stream(my_stream, fastapi.url),
                    checks.check_sse_endpoint(make_sse_app)])
    finally:
        stop("solutions-02")


if __name__ == "__main__":
    from labserver import Engine, EngineConfig

    raise SystemExit(0 if run_checks(Engine.from_config(EngineConfig())) else 1)
