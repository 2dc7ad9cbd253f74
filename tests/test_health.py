"""/health answers during a FastAPI stream, but waits behind a generation on the Flask baseline."""

import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import FakeEngine
from labserver.fastapi_app import create_app
from labserver.flask_app import create_flask_app
from labserver.serving import FlaskServer, UvicornServer

PROMPT = "Tell me about the sea."


def timed_health(url: str) -> tuple[float, dict]:
    start = time.perf_counter()
    response = httpx.get(url + "/health", timeout=300)
    assert response.status_code == 200
    return time.perf_counter() - start, response.json()


def health_during_fastapi_stream(engine, max_tokens: int) -> dict:
    """Ask /health after the first token of a stream; report its latency and the stream's duration."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with UvicornServer(create_app(engine)) as server, httpx.Client(timeout=300) as client:
        start = time.perf_counter()
        with connect_sse(client, "POST", server.url + "/generate", json=body) as source:
            events = source.iter_sse()
            next(events)  # the first token: the generation is under way
            health_s, health = timed_health(server.url)
            health_done = time.perf_counter()
            rest = [e.data for e in events]
        end = time.perf_counter()
    assert rest[-1] == "[DONE]"
    return {"health_s": health_s, "health": health, "generation_s": end - start,
            "answered_before_end": health_done < end}


def health_during_flask_generation(engine, max_tokens: int) -> dict:
    """Ask /health once the engine is running a Flask request; report its latency and the request's."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    result = {}
    with FlaskServer(create_flask_app(engine)) as server:
        def generate():
            start = time.perf_counter()
            result["status"] = httpx.post(server.url + "/generate", json=body, timeout=300).status_code
            result["generation_s"] = time.perf_counter() - start

        thread = threading.Thread(target=generate)
        thread.start()
        while engine.running == 0 and thread.is_alive():  # wait until the engine is busy with it
            time.sleep(0.001)
        result["health_s"], result["health"] = timed_health(server.url)
        thread.join()
    assert result["status"] == 200
    return result


def check_fastapi_answers_and_flask_waits(engine, max_tokens: int) -> None:
    fast = health_during_fastapi_stream(engine, max_tokens)
    slow = health_during_flask_generation(engine, max_tokens)
    # FastAPI: answered mid-generation (it saw it running), in a small part of the generation's time.
    assert fast["health"]["running"] == 1 and fast["answered_before_end"]
    assert fast["health_s"] < fast["generation_s"] / 4, fast
    # Flask: the same question waited until the generation was over (it saw nothing running).
    assert slow["health"]["running"] == 0
    assert slow["health_s"] > slow["generation_s"] / 2, slow
    assert slow["health_s"] > fast["health_s"]


@pytest.mark.timeout(60)
def test_health_with_a_fake_engine():
    check_fastapi_answers_and_flask_waits(FakeEngine(prefill_ms=20, step_ms=20), max_tokens=25)


@pytest.mark.model
@pytest.mark.timeout(300)
def test_health_with_the_real_model(default_engine):
    check_fastapi_answers_and_flask_waits(default_engine, max_tokens=32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", ["fastapi", "flask"])
def test_health_when_idle(app, fake_engine):
    server = UvicornServer(create_app(fake_engine)) if app == "fastapi" else FlaskServer(create_flask_app(fake_engine))
    with server:
        body = httpx.get(server.url + "/health").json()
    assert body["status"] == "ok" and body["running"] == 0 and body["model"] == "fake"
    assert body["backend"] == ("thread" if app == "fastapi" else "flask")
    assert fake_engine.tokens_generated == 0  # /health never runs the engine
