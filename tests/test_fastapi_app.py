"""The FastAPI app over real HTTP: non-streaming body, stream order and text, docs, failures, concurrency."""

import json
import threading

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import fake_engine, SamplingParams
from labserver.serve.app import create_app
from labserver.serve.background import UvicornServer

pytestmark = pytest.mark.timeout(60)


def stream_events(url: str, body: dict) -> list:
    """Parsed data of every SSE event (the final "[DONE]" kept as the string)."""
    with httpx.Client(timeout=120) as client:  # generous: the machine may be busy
        with connect_sse(client, "POST", url + "/generate", json={**body, "stream": True}) as source:
            assert source.response.status_code == 200
            return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in source.iter_sse()]


def generate(url: str, body: dict) -> dict:
    response = httpx.post(url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_non_streaming_body_by_hand(fake_engine):
    with UvicornServer(create_app(fake_engine)) as server:
        body = generate(server.url, {"prompt": "a b c", "max_tokens": 2})
    assert body["text"] == " one two"
    first, second = body["tokens"]
    # The engine times each forward of the fake runner: at least its sleep (30 ms prefill, 10 ms a step).
    assert first.pop("step_ms") == first.pop("prefill_time_ms") >= 30 and second.pop("step_ms") >= 10
    assert [first, second] == [
        {"token": " one", "token_id": 0, "index": 0, "batch": 1},  # the batched backend's forwards say how many
        {"token": " two", "token_id": 1, "index": 1, "batch": 1},
    ]
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert set(body["timings"]) == {"prefill_time_ms", "decode_time_ms", "mean_step_ms", "total_ms", "tokens_per_s",
                                    "cached_tokens"}


def test_stream_and_body_carry_the_same_information(fake_engine):
    with UvicornServer(create_app(fake_engine)) as server:
        events = stream_events(server.url, {"prompt": "a b c", "max_tokens": 4})
        body = generate(server.url, {"prompt": "a b c", "max_tokens": 4})
    tokens, finish, done = events[:-2], events[-2], events[-1]
    assert done == "[DONE]"
    untimed = [[{k: v for k, v in t.items() if k not in ("step_ms", "prefill_time_ms")} for t in ts]
               for ts in (tokens, body["tokens"])]  # two runs: the same tokens, their own measured times
    assert untimed[0] == untimed[1] and all("step_ms" in t for t in tokens + body["tokens"])
    assert "".join(t["token"] for t in tokens) == body["text"]
    # The second run finds all but the last of the first's prompt tokens in the prefix cache.
    cached = [u.pop("prompt_tokens_details")["cached_tokens"] for u in (finish["usage"], body["usage"])]
    assert cached == [0, body["usage"]["prompt_tokens"] - 1]
    assert (finish["finish_reason"], finish["usage"]) == (body["finish_reason"], body["usage"])
    assert set(finish["timings"]) == set(body["timings"])


@pytest.mark.model
@pytest.mark.timeout(300)
def test_stream_order_and_text_with_the_real_model(default_engine):
    request = {"prompt": "Name three colours.", "max_tokens": 16, "temperature": 0}
    with UvicornServer(create_app(default_engine)) as server:
        events = stream_events(server.url, request)
        body = generate(server.url, request)
    tokens, finish = events[:-2], events[-2]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["token"] for t in tokens) == body["text"]  # greedy: the same output both ways
    assert [t["token_id"] for t in tokens] == [t["token_id"] for t in body["tokens"]]
    assert finish["usage"]["completion_tokens"] == len(tokens) > 0
    assert "prefill_time_ms" in tokens[0] and all("prefill_time_ms" not in t for t in tokens[1:])


@pytest.mark.model
def test_health_names_the_route_that_runs_and_why(default_engine):
    from labserver.model import formats, kernels

    with UvicornServer(create_app(default_engine)) as server:
        health = httpx.get(server.url + "/health", timeout=30).json()
    route = health["route"]
    # auto picks an exact format, says why, and shows the step times it measured for the candidates
    assert route["quant"] == default_engine.route["quant"] and formats.get(route["quant"]).exact
    assert route["quant"] in route["why"] and route["measured_ms"][route["quant"]] > 0
    assert route["kernels"] == kernels.path() and route["kernels"] in ("avx512", "avx2", "neon", "portable")


def test_health_of_a_fake_engine_says_it_is_fake(fake_engine):
    with UvicornServer(create_app(fake_engine)) as server:
        route = httpx.get(server.url + "/health", timeout=30).json()["route"]
    assert route["quant"] == "fake" and route["measured_ms"] == {}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["thread", "executor"])
def test_streamed_text_equals_the_engine_output_on_a_random_model(tiny_engine, backend):
    # Random weights pick odd tokens (byte pieces, lone spaces): a hard case for streamed text.
    request = {"prompt": "Hello", "max_tokens": 40, "temperature": 0}
    expected = tiny_engine.generate(request["prompt"], SamplingParams(max_tokens=40, temperature=0))
    with UvicornServer(create_app(tiny_engine, backend)) as server:
        events = stream_events(server.url, request)
    assert "".join(t["token"] for t in events[:-2]) == expected.text
    assert [t["token_id"] for t in events[:-2]] == expected.token_ids


def test_concurrent_streams_both_complete():
    engine = fake_engine(prefill_ms=10, step_ms=10)
    results = {}
    with UvicornServer(create_app(engine)) as server:
        def run(name, n):
            results[name] = stream_events(server.url, {"prompt": "hi", "max_tokens": n})

        threads = [threading.Thread(target=run, args=(name, n)) for name, n in (("a", 6), ("b", 9))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [e["index"] for e in results["a"][:-2]] == list(range(6))
    assert [e["index"] for e in results["b"][:-2]] == list(range(9))
    assert results["a"][-1] == results["b"][-1] == "[DONE]"


def test_failure_without_streaming_is_500_with_an_error_body_and_the_server_lives():
    engine = fake_engine(prefill_ms=1, step_ms=1, fail_at=3)
    with UvicornServer(create_app(engine)) as server:
        failed = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 10}, timeout=10)
        assert failed.status_code == 500
        assert failed.json() == {"error": {"message": "injected fault", "type": "RuntimeError"}}
        assert generate(server.url, {"prompt": "hi", "max_tokens": 3})["text"] == " one two three"


def test_docs_and_openapi(fake_engine):
    with UvicornServer(create_app(fake_engine)) as server:
        docs = httpx.get(server.url + "/docs")
        schema = httpx.get(server.url + "/openapi.json").json()
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {"/generate", "/health"} <= set(schema["paths"])
    request_schema = schema["components"]["schemas"]["GenerateRequest"]
    assert request_schema["additionalProperties"] is False
    assert {"prompt", "max_tokens", "temperature", "stream", "top_p", "seed", "ignore_eos", "min_tokens"} == set(
        request_schema["properties"])
    assert "text/event-stream" in schema["paths"]["/generate"]["post"]["responses"]["200"]["content"]


def test_unknown_backend_is_rejected_when_the_app_is_made(fake_engine):
    with pytest.raises(ValueError, match="backend"):
        create_app(fake_engine, "fastest")


@pytest.mark.model
@pytest.mark.timeout(300)
def test_ignore_eos_and_min_tokens_on_generate(default_engine):
    # The default model answers this in one token ("No") and ends; ignore_eos must run to max_tokens.
    prompt = "Reply with one word: yes or no. Is the sky blue?"
    natural = default_engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0))
    assert natural.finish.finish_reason == "stop" and len(natural.token_ids) < 4  # the premise
    expected = {name: default_engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, **extra))
                for name, extra in (("ignore_eos", {"ignore_eos": True}), ("min_tokens", {"min_tokens": 4}))}
    with UvicornServer(create_app(default_engine)) as server:
        plain = generate(server.url, {"prompt": prompt, "max_tokens": 20, "temperature": 0})
        events = stream_events(server.url, {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
        least = generate(server.url, {"prompt": prompt, "max_tokens": 20, "temperature": 0, "min_tokens": 4})
    assert plain["text"] == natural.text and plain["finish_reason"] == "stop"
    tokens, finish = events[:-2], events[-2]
    assert [t["index"] for t in tokens] == list(range(20))  # exactly max_tokens, the EOS among them
    assert finish["finish_reason"] == "length" and finish["usage"]["completion_tokens"] == 20
    assert [t["token_id"] for t in tokens] == expected["ignore_eos"].token_ids
    assert [t["token_id"] for t in tokens[:len(natural.token_ids)]] == natural.token_ids
    assert set(default_engine.eos_ids) & {t["token_id"] for t in tokens}  # it went past an EOS
    assert [t["token_id"] for t in least["tokens"]] == expected["min_tokens"].token_ids
    assert len(least["tokens"]) >= 4
