"""Reference solutions for notebook 4, cancellation.

    python notebooks/solutions/04_cancellation.py    # runs every checker against the default model
"""
import asyncio

import httpx
from httpx_sse import connect_sse


def hang_up_after(url, n):
    body = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 200, "temperature": 0,
            "stream": True}
    read = 0
    with httpx.Client(timeout=120) as client, connect_sse(client, "POST", url + "/generate", json=body) as source:
        for event in source.iter_sse():
            if "token" in event.json():
                read += 1
            if read == n:
                break
    # Leaving the `with` blocks closes the response and its connection: the server sees the client leave.
    return read


def stream_until(url, prompt, stop):
    body = {"prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True}
    text = ""
    with httpx.Client(timeout=120) as client, connect_sse(client, "POST", url + "/generate", json=body) as source:
        for event in source.iter_sse():
            if event.data == "[DONE]":
                break
            text += event.json().get("token", "")
            if stop in text:
                break
    cut = text.find(stop)
    return text if cut < 0 else text[:cut + len(stop)]


async def wait_or_cancel(request, work):
    async def client_left():
        # After the body has been read, the next ASGI message is http.disconnect, whenever the client goes.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(work), asyncio.ensure_future(client_left())
    done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in (answer, gone):
        task.cancel()  # cancelling the answer closes the engine's stream, which sets its cancel flag
    return answer.result() if answer in done else None


def run_checks(engine) -> bool:
    from labserver.lab import checks
    from labserver.measure.client import stream_generate
    from labserver.serve.background import start_fastapi, stop

    fastapi = start_fastapi(engine, name="solutions-04")
    try:
        stream_generate(fastapi.url, "Hi", 2, temperature=0)  # warm-up
        return all([checks.check_hang_up(hang_up_after, engine, fastapi.url),
                    checks.check_stop_string(stream_until, engine, fastapi.url),
                    checks.check_wait_or_cancel(wait_or_cancel)])
    finally:
        stop("solutions-04")


if __name__ == "__main__":
    from labserver import Engine, EngineConfig

    raise SystemExit(0 if run_checks(Engine.from_config(EngineConfig())) else 1)
