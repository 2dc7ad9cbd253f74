"""The /v1 routes with the official `openai` client: chat and completions, streaming and not, usage, stops.

The fake engine gives outputs that can be written down by hand (" one two three ..."); the real model
checks that the streamed text, the non-streamed text and the engine's own greedy output agree.
"""

import json
import time

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from labserver import fake_engine, SamplingParams
from labserver.serve.app import create_app
from labserver.serve.stop_strings import StopMatcher
from labserver.serve.background import UvicornServer

pytestmark = pytest.mark.timeout(120)

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def fake_server():
    engine = fake_engine(prefill_ms=5, step_ms=2)
    with UvicornServer(create_app(engine)) as server:
        yield server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw_events(url: str, path: str, body: dict) -> list:
    """Every SSE data payload of one streamed POST, parsed ("[DONE]" kept as the string)."""
    with httpx.Client(timeout=120) as http, connect_sse(http, "POST", url + path, json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in source.iter_sse()]


def test_models_list_and_retrieve(fake_server):
    models = client(fake_server).models.list().data
    assert [m.id for m in models] == ["fake"] and models[0].object == "model"
    assert client(fake_server).models.retrieve("fake").id == "fake"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(fake_server).models.retrieve("gpt-4")


def test_chat_without_streaming(fake_server):
    reply = client(fake_server).chat.completions.create(model="fake", messages=CHAT, max_tokens=3)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == " one two three"
    assert reply.choices[0].finish_reason == "length"
    # The fake engine counts prompt words: "You are brief. Name a colour." is 6.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (6, 3, 9)


def test_chat_stream_with_usage(fake_server):
    stream = client(fake_server).chat.completions.create(
        model="fake", messages=CHAT, max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, content, last = chunks[0], chunks[1:-1], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in content] == [" one", " two", " three", " four"]
    # finish_reason on the last content chunk only, then the usage chunk with no choices.
    assert [c.choices[0].finish_reason for c in content] == [None, None, None, "length"]
    assert last.choices == [] and last.usage.completion_tokens == 4 and last.usage.prompt_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_wire_format_ends_with_done(fake_server):
    events = raw_events(fake_server.url, "/v1/chat/completions",
                        {"messages": CHAT, "max_tokens": 2, "stream": True})
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [
        {"role": "assistant", "content": ""}, {"content": " one"}, {"content": " two"}]
    assert all("usage" not in e for e in events[:-1])  # no include_usage: no usage key at all


def test_completions_without_and_with_streaming(fake_server):
    api = client(fake_server)
    body = api.completions.create(model="fake", prompt="a b c", max_tokens=3)
    assert body.object == "text_completion" and body.choices[0].text == " one two three"
    assert body.choices[0].finish_reason == "length" and body.usage.prompt_tokens == 3
    chunks = list(api.completions.create(model="fake", prompt="a b c", max_tokens=3, stream=True,
                                         stream_options={"include_usage": True}))
    assert [c.choices[0].text for c in chunks[:-1]] == [" one", " two", " three"]
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, None, "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6


def test_model_may_be_omitted_in_raw_requests(fake_server):
    response = httpx.post(fake_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
    assert response.status_code == 200 and response.json()["model"] == "fake"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_the_generation(stream):
    engine = fake_engine(prefill_ms=5, step_ms=20)
    with UvicornServer(create_app(engine)) as server:
        api = client(server)
        kwargs = dict(model="fake", prompt="hi", max_tokens=200, stop=[" thr", "zzz"], stream=stream)
        if stream:
            chunks = list(api.completions.create(**kwargs))
            text = "".join(c.choices[0].text for c in chunks)
            reasons = [c.choices[0].finish_reason for c in chunks]
            assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
        else:
            reply = api.completions.create(**kwargs)
            text = reply.choices[0].text
            assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 3
        assert text == " one two"  # " three" starts with the stop string: nothing of it is sent
        time.sleep(0.2)
        assert engine.running == 0 and engine.tokens_generated <= 5  # stopped, not run to 200


def test_stop_matcher_holds_back_a_possible_start():
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)  # "E" might begin "END": held back
    assert m.feed("N") == ("", False)
    assert m.feed("D!") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("E") == ("", False) and m.feed("x") == ("Ex", False) and m.flush() == ""


def test_errors_are_openai_errors(fake_server):
    api = client(fake_server)
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model="fake", messages=CHAT, n=2)
    assert bad.value.body["param"] == "n" and "only 1" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.completions.create(model="fake", prompt="hi", temperature=5)


def test_fault_mid_stream_is_an_error_event_and_the_next_request_works():
    engine = fake_engine(prefill_ms=2, step_ms=2, fail_at=2)
    with UvicornServer(create_app(engine)) as server:
        events = raw_events(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "stream": True})
        assert [e["choices"][0]["delta"].get("content") for e in events[:3]] == ["", " one", " two"]
        assert events[3] == {"error": {"message": "injected fault", "type": "server_error", "param": None,
                                       "code": None}}
        assert events[4:] == ["[DONE]"]
        with pytest.raises(openai.APIError, match="injected fault"):
            list(client(server).chat.completions.create(model="fake", messages=CHAT, max_tokens=5, stream=True))
        assert client(server).completions.create(model="fake", prompt="hi", max_tokens=2).choices[0].text == " one two"


def test_leaving_a_v1_stream_cancels_the_generation():
    engine = fake_engine(prefill_ms=5, step_ms=20)
    with UvicornServer(create_app(engine)) as server:
        stream = client(server).chat.completions.create(model="fake", messages=CHAT, max_tokens=1000, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 2
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0 and engine.tokens_generated < 10
        assert server.app.state.admission.active == 0


@pytest.mark.model
@pytest.mark.timeout(300)
def test_real_model_stream_body_and_engine_agree(default_engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = default_engine.generate(default_engine.encode_messages(messages),
                                       SamplingParams(max_tokens=24, temperature=0))
    raw_prompt = "The three primary colours are"
    expected_raw = default_engine.generate(default_engine.encode(raw_prompt, chat=False),
                                           SamplingParams(max_tokens=12, temperature=0))
    with UvicornServer(create_app(default_engine)) as server:
        api = client(server)
        model = api.models.list().data[0].id
        body = api.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        chunks = list(api.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
        completion = api.completions.create(model=model, prompt=raw_prompt, max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert body.choices[0].message.content == streamed == expected.text
    assert body.choices[0].finish_reason == chunks[-2].choices[0].finish_reason
    assert body.choices[0].finish_reason == ("stop" if expected.finish.finish_reason == "stop" else "length")
    assert chunks[-1].usage.completion_tokens == body.usage.completion_tokens == len(expected.token_ids)
    assert body.usage.prompt_tokens == expected.finish.usage["prompt_tokens"]
    assert completion.choices[0].text == expected_raw.text


# -- vLLM's request extensions, as benchmark clients (guidellm, vllm bench serve) send them ---------------
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(fake_server):
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "a b c"})):
        events = raw_events(fake_server.url, path, {**body, "max_tokens": 3, "stream": True, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}})
        chunks, usage_chunk = events[:-2], events[-2]
        assert events[-1] == "[DONE]" and usage_chunk["choices"] == []
        prompt = usage_chunk["usage"]["prompt_tokens"]
        # One chunk per token (after the chat stream's role chunk): the count so far is the chunk's place.
        first = 0 if "chat" in path else 1
        expected = [{"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
                    for n in range(first, 4)]
        assert [c["usage"] for c in chunks] == expected
        # The last usage adds what the engine knows only at the end: the prompt tokens the cache held
        # (a prompt this server has seen before finds all but its last token there).
        held = usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert usage_chunk["usage"] == {**expected[-1], "prompt_tokens_details": {"cached_tokens": held}}
        assert 0 <= held < prompt


def test_continuous_usage_stats_without_include_usage_send_none(fake_server):
    # vLLM's rule: continuous_usage_stats only adds to include_usage.
    events = raw_events(fake_server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True,
                                                             "stream_options": {"continuous_usage_stats": True}})
    assert len(events) == 3 and all("usage" not in e for e in events[:-1])


def test_what_guidellm_sends_is_served(fake_server):
    """guidellm 0.8.1's chat request body, field for field (its openai_http backend)."""
    body = {"model": "fake", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": 5, "stop": None, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a b"},
                                                      {"type": "text", "text": " c"}]}]}
    events = raw_events(fake_server.url, "/v1/chat/completions", body)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == " one two three four five"
    # The two parts are one message "a b c": the fake engine counts 3 words.
    held = events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"]  # what earlier tests' prompts share
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                                   "prompt_tokens_details": {"cached_tokens": held}} and 0 <= held < 3
    text = {"model": "fake", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 4, "stop": None, "ignore_eos": True, "prompt": "a b"}
    events = raw_events(fake_server.url, "/v1/completions", text)
    assert events[-2]["usage"]["completion_tokens"] == 4 and events[-1] == "[DONE]"


def test_max_completion_tokens_is_max_tokens(fake_server):
    api = client(fake_server)
    for kwargs in ({"max_completion_tokens": 2}, {"max_tokens": 2}, {"max_tokens": 2, "max_completion_tokens": 2}):
        reply = api.chat.completions.create(model="fake", messages=CHAT, **kwargs)
        assert reply.usage.completion_tokens == 2, kwargs
    assert api.completions.create(model="fake", prompt="hi", extra_body={"max_completion_tokens": 3}).usage \
        .completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as both:
        api.chat.completions.create(model="fake", messages=CHAT, max_tokens=2, max_completion_tokens=3)
    assert both.value.body["param"] == "max_completion_tokens" and "same limit" in both.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_wait_for_min_tokens(fake_server, stream):
    # The fake engine says " one two three four five six seven eight one two ...". Without min_tokens the
    # stop string " two" ends the text after " one"; with min_tokens=3 it is looked for from the 3rd token
    # on, so the next " two" (the 10th token) ends it.
    api = client(fake_server)
    texts = []
    for min_tokens in (0, 3):
        kwargs = dict(model="fake", prompt="hi", max_tokens=30, stop=" two", stream=stream,
                      extra_body={"min_tokens": min_tokens})
        if stream:
            chunks = list(api.completions.create(**kwargs))
            texts.append(("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason))
        else:
            reply = api.completions.create(**kwargs)
            texts.append((reply.choices[0].text, reply.choices[0].finish_reason))
    assert texts == [(" one", "stop"), (" one two three four five six seven eight one", "stop")]


@pytest.mark.parametrize("body, fragment", [
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens (4), got 5"),
    ({"min_tokens": 5, "max_completion_tokens": 4}, "min_tokens must be <= max_completion_tokens (4), got 5"),
    ({"min_tokens": -1}, "greater than or equal to 0"),
    ({"ignore_eos": "true"}, "valid boolean"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": 1}}, "valid boolean"),
    ({"stop_token_ids": [2]}, "Extra inputs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     'text parts only, got a part of type "image_url"'),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_audio"}]}]},
     'text parts only, got a part of type "input_audio"'),
])
def test_extensions_reject_what_they_cannot_do(fake_server, body, fragment):
    response = httpx.post(fake_server.url + "/v1/chat/completions", json={"messages": CHAT, **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


# The default model answers this in one token ("No") and then ends: without ignore_eos the output is short.
SHORT_ANSWER = [{"role": "user", "content": "Reply with one word: yes or no. Is the sky blue?"}]


@pytest.mark.model
@pytest.mark.timeout(300)
def test_ignore_eos_and_min_tokens_on_the_real_model(default_engine):
    ids = default_engine.encode_messages(SHORT_ANSWER)
    natural = default_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0))
    at_least_5 = default_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, min_tokens=5))
    assert natural.finish.finish_reason == "stop" and len(natural.token_ids) < 5  # the premise
    assert len(at_least_5.token_ids) >= 5
    parts = [{"role": "user", "content": [{"type": "text", "text": "Reply with one word: yes or no."},
                                          {"type": "text", "text": " Is the sky blue?"}]}]
    with UvicornServer(create_app(default_engine)) as server:
        api = client(server)
        plain = api.chat.completions.create(model="default", messages=SHORT_ANSWER, max_tokens=24, temperature=0)
        chunks = list(api.chat.completions.create(
            model="default", messages=parts, max_completion_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
        body = api.chat.completions.create(model="default", messages=SHORT_ANSWER, max_tokens=24, temperature=0,
                                           extra_body={"ignore_eos": True})
        least = api.chat.completions.create(model="default", messages=SHORT_ANSWER, max_tokens=24, temperature=0,
                                            extra_body={"min_tokens": 5})
    assert plain.choices[0].message.content == natural.text and plain.choices[0].finish_reason == "stop"
    # ignore_eos: exactly max_tokens tokens, one content chunk each, the usage counting along.
    content = chunks[1:-1]
    assert len(content) == 24 and content[-1].choices[0].finish_reason == "length"
    assert [c.usage.completion_tokens for c in content] == list(range(1, 25))
    assert chunks[-1].usage.completion_tokens == body.usage.completion_tokens == 24
    streamed = "".join(c.choices[0].delta.content or "" for c in content)
    assert streamed == body.choices[0].message.content and streamed.startswith(natural.text)
    assert len(streamed) > len(natural.text)
    assert least.choices[0].message.content == at_least_5.text
    assert least.usage.completion_tokens == len(at_least_5.token_ids)
