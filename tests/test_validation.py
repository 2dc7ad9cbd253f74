"""Bad input gets a 4xx with a readable message from both apps, never a 500, and the server keeps serving."""

import httpx
import pytest

from labserver import EngineConfig, SamplingParams, fake_engine
from labserver.serve.app import create_app
from labserver.serve.flask_app import create_flask_app
from labserver.serve.generate_api import GenerateRequest, check_limits
from labserver.serve.background import FlaskServer, UvicornServer

LIMITS = EngineConfig(model="fake", threads=1, max_tokens_limit=64, max_prompt_chars=200, max_prompt_tokens=10)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", params=["fastapi", "flask"])
def url(request):
    engine = fake_engine(prefill_ms=0, step_ms=0, config=LIMITS)
    if request.param == "fastapi":
        server = UvicornServer(create_app(engine))
    else:
        server = FlaskServer(create_flask_app(engine))
    with server:
        yield server.url


def post(url, **kwargs) -> httpx.Response:
    return httpx.post(url + "/generate", timeout=10, **kwargs)


def messages(response: httpx.Response) -> str:
    """All human-readable text of an error body (FastAPI's detail list or a detail string)."""
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " | ".join(f"{e['loc']}: {e['msg']}" for e in detail)


BAD_BODIES = {
    "prompt is a number": ({"prompt": 123}, "prompt"),
    "prompt missing": ({"max_tokens": 5}, "prompt"),
    "prompt empty": ({"prompt": ""}, "at least 1 character"),
    "max_tokens a string": ({"prompt": "hi", "max_tokens": "10"}, "valid integer"),
    "max_tokens a float": ({"prompt": "hi", "max_tokens": 1.5}, "valid integer"),
    "max_tokens zero": ({"prompt": "hi", "max_tokens": 0}, "greater than or equal to 1"),
    "max_tokens negative": ({"prompt": "hi", "max_tokens": -3}, "greater than or equal to 1"),
    "max_tokens over the limit": ({"prompt": "hi", "max_tokens": 65}, "max_tokens must be <= 64"),
    "temperature a word": ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    "temperature negative": ({"prompt": "hi", "temperature": -0.1}, "greater than or equal to 0"),
    "temperature too high": ({"prompt": "hi", "temperature": 2.5}, "less than or equal to 2"),
    "top_p zero": ({"prompt": "hi", "top_p": 0}, "greater than 0"),
    "top_p above one": ({"prompt": "hi", "top_p": 1.5}, "less than or equal to 1"),
    "stream a string": ({"prompt": "hi", "stream": "yes"}, "valid boolean"),
    "seed a string": ({"prompt": "hi", "seed": "x"}, "seed"),
    "unknown field": ({"prompt": "hi", "max_new_tokens": 5}, "max_new_tokens"),
    "prompt over max_prompt_chars": ({"prompt": "x" * 201}, "max_prompt_chars"),
    "ignore_eos a string": ({"prompt": "hi", "ignore_eos": "yes"}, "valid boolean"),
    "min_tokens negative": ({"prompt": "hi", "min_tokens": -1}, "greater than or equal to 0"),
    "min_tokens over max_tokens": ({"prompt": "hi", "max_tokens": 3, "min_tokens": 4},
                                   "min_tokens must be <= max_tokens (3), got 4"),
    "a list, not an object": ([1, 2], "body"),
    "null": (None, "body"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_bad_body_is_422_with_a_message(url, case):
    body, expected = BAD_BODIES[case]
    response = post(url, json=body)
    assert response.status_code == 422, response.text
    assert expected in messages(response)


@pytest.mark.parametrize("content", [b"not json", b'{"prompt": "hi",', b""])
def test_non_json_body_is_422(url, content):
    response = post(url, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert messages(response)


def test_too_many_prompt_tokens_is_400_with_the_engine_message(url):
    # 12 words: under max_prompt_chars, over the fake engine's 10 prompt tokens; only the engine knows.
    response = post(url, json={"prompt": " ".join(["word"] * 12), "max_tokens": 2})
    assert response.status_code == 400
    assert "12 tokens" in response.json()["detail"]


def test_too_many_prompt_tokens_streamed_is_400_not_a_200_stream():
    engine = fake_engine(prefill_ms=0, step_ms=0, config=LIMITS)
    with UvicornServer(create_app(engine)) as server:
        response = post(server.url, json={"prompt": " ".join(["word"] * 12), "max_tokens": 2, "stream": True})
    assert response.status_code == 400
    assert "limit is 10" in response.json()["detail"]


def test_limits_are_inclusive_and_the_server_still_serves(url):
    for case in BAD_BODIES.values():  # a burst of bad requests first
        post(url, json=case[0])
    response = post(url, json={"prompt": "x" * 200, "max_tokens": 64, "temperature": 2, "top_p": 1, "seed": 0})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 64


def test_request_model_to_sampling_params():
    params = GenerateRequest(prompt="hi", max_tokens=5, temperature=0, seed=3).to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (5, 0.0, 1.0, 3)
    assert (params.ignore_eos, params.min_tokens) == (False, 0)
    params = GenerateRequest(prompt="hi", max_tokens=5, ignore_eos=True, min_tokens=5).to_sampling_params()
    assert (params.ignore_eos, params.min_tokens) == (True, 5)
    assert GenerateRequest(prompt="hi", top_p=0.5).to_sampling_params().top_p == 0.5
    check_limits(GenerateRequest(prompt="x" * 200, max_tokens=64), LIMITS)  # at the limits: no error


@pytest.mark.parametrize("fields, message", [
    ({"min_tokens": -1}, "min_tokens must be an integer >= 0"),
    ({"min_tokens": 1.5}, "min_tokens must be an integer >= 0"),
    ({"min_tokens": True}, "min_tokens must be an integer >= 0"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens must be <= max_tokens (4), got 5"),
    ({"ignore_eos": 1}, "ignore_eos must be true or false"),
])
def test_sampling_params_check_the_stopping_rules(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**fields)
    SamplingParams(max_tokens=4, min_tokens=4, ignore_eos=True)  # at the bound: fine
