"""The Flask baseline answers like the FastAPI app (same JSON), does not stream, and survives failures."""

import httpx
import pytest

from labserver import fake_engine, SamplingParams
from labserver.serve.app import create_app
from labserver.serve.flask_app import create_flask_app
from labserver.serve.limits import ServerLimits
from labserver.serve.background import FlaskServer, UvicornServer

pytestmark = pytest.mark.timeout(60)

APPS = {"fastapi": lambda engine, limits=None: UvicornServer(create_app(engine, limits=limits)),
        "flask": lambda engine, limits=None: FlaskServer(create_flask_app(engine, limits=limits))}


def post(url: str, body: dict, timeout: float = 10) -> httpx.Response:
    return httpx.post(url + "/generate", json=body, timeout=timeout)


def without_clock(body: dict) -> dict:
    """The body with wall-clock timings replaced by their key set (all else is deterministic here).

    A token's ``batch`` goes too: it says how the FastAPI server's batched backend ran the step, which
    the Flask baseline (the engine alone, in the request's thread) never does. So do the prompt tokens
    the prefix cache held: a second run of one prompt on the same engine finds all but its last one.
    """
    tokens = [{k: v for k, v in t.items() if k not in ("step_ms", "prefill_time_ms", "batch")}
              for t in body["tokens"]]
    usage = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return {**body, "tokens": tokens, "timings": sorted(body["timings"]), "usage": usage}


@pytest.mark.parametrize("app", APPS)
def test_body_is_the_engines_completion(app, fake_engine):
    expected = fake_engine.generate("a b c", SamplingParams(max_tokens=3)).to_dict()
    with APPS[app](fake_engine) as server:
        response = post(server.url, {"prompt": "a b c", "max_tokens": 3})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert without_clock(response.json()) == without_clock(expected)
    assert list(response.json()) == list(expected)  # same key order too


def test_both_apps_give_the_same_body(fake_engine):
    bodies = {}
    for name, make in APPS.items():
        with make(fake_engine) as server:
            bodies[name] = post(server.url, {"prompt": "x y", "max_tokens": 5}).json()
    assert without_clock(bodies["fastapi"]) == without_clock(bodies["flask"])
    cached = [bodies[name]["usage"]["prompt_tokens_details"]["cached_tokens"] for name in APPS]
    assert cached == [0, bodies["flask"]["usage"]["prompt_tokens"] - 1]  # the second finds the first's prompt


@pytest.mark.timeout(300)
def test_both_apps_give_the_same_greedy_text_on_a_random_model(tiny_engine):
    bodies = {}
    for name, make in APPS.items():
        with make(tiny_engine) as server:
            response = post(server.url, {"prompt": "Hello", "max_tokens": 20, "temperature": 0}, timeout=120)
            bodies[name] = response.json()
    assert bodies["fastapi"]["text"] == bodies["flask"]["text"]
    assert [t["token_id"] for t in bodies["fastapi"]["tokens"]] == [t["token_id"] for t in bodies["flask"]["tokens"]]


def test_stream_true_is_a_400_that_says_why(fake_engine):
    with FlaskServer(create_flask_app(fake_engine)) as server:
        response = post(server.url, {"prompt": "hi", "stream": True})
    assert response.status_code == 400
    assert "does not stream" in response.json()["detail"]
    assert fake_engine.tokens_generated == 0


def test_failure_is_500_with_an_error_body_and_the_server_lives():
    engine = fake_engine(prefill_ms=1, step_ms=1, fail_at=3)
    with FlaskServer(create_flask_app(engine)) as server:
        failed = post(server.url, {"prompt": "hi", "max_tokens": 10})
        assert failed.status_code == 500
        assert failed.json() == {"error": {"message": "injected fault", "type": "RuntimeError"}}
        ok = post(server.url, {"prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["text"] == " one two three"


def test_unknown_route_and_method_are_json_errors(fake_engine):
    with FlaskServer(create_flask_app(fake_engine)) as server:
        missing = httpx.get(server.url + "/nowhere")
        wrong_method = httpx.get(server.url + "/generate")
    assert missing.status_code == 404 and missing.json()["detail"]
    assert wrong_method.status_code == 405 and wrong_method.json()["detail"]


def test_never_in_debug_mode(fake_engine):
    app = create_flask_app(fake_engine)
    assert app.debug is False


LIMIT = 1000  # bytes


def padded(size: int) -> bytes:
    """A valid /generate body of exactly ``size`` bytes (JSON allows trailing spaces)."""
    body = b'{"prompt": "a b c", "max_tokens": 2}'
    return body + b" " * (size - len(body))


def chunked(data: bytes):  # a generator body: httpx sends it chunked, with no Content-Length
    for i in range(0, len(data), 300):
        yield data[i:i + 300]


@pytest.mark.parametrize("app", APPS)
def test_the_same_limits_give_the_same_answers(app, fake_engine):
    too_large = {"detail": f"the request body is larger than this server's limit of {LIMIT} bytes"}
    with APPS[app](fake_engine, ServerLimits(max_body_bytes=LIMIT)) as server:
        def send(content, content_type="application/json"):
            return httpx.post(server.url + "/generate", content=content, headers={"content-type": content_type},
                              timeout=10)

        at_limit, chunked_at_limit = send(padded(LIMIT)), send(chunked(padded(LIMIT)))
        over, chunked_over = send(padded(LIMIT + 1)), send(chunked(padded(LIMIT + 1)))
        far_over = send(padded(10 * LIMIT))
        not_json = send(padded(100), "text/plain")
    assert at_limit.status_code == chunked_at_limit.status_code == 200, (at_limit.text, chunked_at_limit.text)
    assert at_limit.json()["text"] == chunked_at_limit.json()["text"] == " one two"
    for response in (over, chunked_over, far_over):
        assert (response.status_code, response.json()) == (413, too_large)
    assert not_json.status_code == 415 and "application/json" in not_json.json()["detail"]
    assert fake_engine.tokens_generated == 4  # only the two bodies at the limit reached the engine


def test_flask_default_body_limit_is_the_servers(fake_engine):
    with FlaskServer(create_flask_app(fake_engine)) as server:
        over = httpx.post(server.url + "/generate", content=padded(ServerLimits().max_body_bytes + 1),
                          headers={"content-type": "application/json"}, timeout=10)
    assert over.status_code == 413 and str(ServerLimits().max_body_bytes) in over.json()["detail"]
