"""/health answers during a FastAPI stream, but waits behind a generation on the Flask baseline."""

import contextlib
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import fake_engine
from labserver.serve.app import create_app
from labserver.serve.flask_app import create_flask_app
from labserver.serve.background import FlaskServer, UvicornServer

PROMPT = "Tell me about the sea."


def timed_health(client: httpx.Client) -> tuple[float, dict]:
    start = time.perf_counter()
    response = client.get("/health")
    assert response.status_code == 200
    return time.perf_counter() - start, response.json()


@contextlib.contextmanager
def health_client(url: str):
    """A client whose connection is already open: building one costs 30-60 ms of client CPU (its TLS
    context), which would be timed as if the server were slow."""
    with httpx.Client(base_url=url, timeout=300) as client:
        client.get("/health").raise_for_status()
        yield client


def health_during_fastapi_stream(engine, max_tokens: int) -> dict:
    """Ask /health after the first token of a stream; report its latency, and how many tokens the
    engine generated after it was answered."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with UvicornServer(create_app(engine)) as server, httpx.Client(timeout=300) as client, \
            health_client(server.url) as health:
        with connect_sse(client, "POST", server.url + "/generate", json=body) as source:
            events = source.iter_sse()
            next(events)  # the first token: the generation is under way
            health_s, answer = timed_health(health)
            generated_at_answer = engine.tokens_generated
            rest = [e.data for e in events]
    assert rest[-1] == "[DONE]"
    return {"health_s": health_s, "health": answer,
            "tokens_after_answer": engine.tokens_generated - generated_at_answer}


def health_during_flask_generation(engine, max_tokens: int) -> dict:
    """Ask /health once the engine is running a Flask request; report its latency and the request's."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    result = {}
    with FlaskServer(create_flask_app(engine)) as server, health_client(server.url) as health:
        def generate():
            result["status"] = httpx.post(server.url + "/generate", json=body, timeout=300).status_code

        thread = threading.Thread(target=generate)
        thread.start()
        while engine.running == 0 and thread.is_alive():  # wait until the engine is busy with it
            time.sleep(0.001)
        generated_at_ask = engine.tokens_generated
        result["health_s"], result["health"] = timed_health(health)
        result["tokens_while_waiting"] = engine.tokens_generated - generated_at_ask
        generated_at_answer = engine.tokens_generated
        thread.join()
        result["tokens_after_answer"] = engine.tokens_generated - generated_at_answer
    assert result["status"] == 200
    return result


def check_fastapi_answers_and_flask_waits(engine, max_tokens: int) -> None:
    fast = health_during_fastapi_stream(engine, max_tokens)
    slow = health_during_flask_generation(engine, max_tokens)
    # Told by the order of events, not by durations: FastAPI answered while the generation ran (it
    # saw it running, and tokens kept coming after the answer) ...
    assert fast["health"]["running"] == 1, fast
    assert fast["tokens_after_answer"] >= max_tokens // 4, fast
    # ... Flask answered only once the generation was over: it saw nothing running, most of the
    # tokens were made while the question waited, and none after its answer.
    assert slow["health"]["running"] == 0, slow
    assert slow["tokens_while_waiting"] >= max_tokens // 2 and slow["tokens_after_answer"] == 0, slow
    assert slow["health_s"] > fast["health_s"], (fast, slow)


@pytest.mark.timeout(60)
def test_health_with_a_fake_engine():
    check_fastapi_answers_and_flask_waits(fake_engine(prefill_ms=20, step_ms=20), max_tokens=25)


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
    assert body["backend"] == ("batched" if app == "fastapi" else "flask")
    assert fake_engine.tokens_generated == 0  # /health never runs the engine
