"""A server for a class: bad input, clients that vanish, faults, load and exposure.

Run with ``-s`` to see the figures (disconnect storm, /health latency under load).
"""

import asyncio
import inspect
import json
import random
import socket
import statistics
import struct
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import EngineConfig, fake_engine
from labserver.serve import background as serving
from labserver.__main__ import build_parser
from labserver.serve.app import create_app
from labserver.serve.flask_app import create_flask_app
from labserver.serve.limits import ServerLimits
from labserver.serve.background import FlaskServer, UvicornServer
from tests.waiting import seconds_until

pytestmark = pytest.mark.timeout(120)

CONFIG = EngineConfig(model="fake", threads=1, max_tokens_limit=64, max_prompt_chars=2000, max_prompt_tokens=50)
BODY_LIMIT = 64 * 1024
JSON = {"content-type": "application/json"}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def report(text: str) -> None:
    print(f"\n[robustness] {text}", flush=True)


# --------------------------------------------------------------------------------------------------------
# Bad input: every case a 4xx with a message, never a 500 or a hang; the server serves normally afterwards.
def big_chunks():  # a chunked body (no Content-Length) twice the limit
    for _ in range(16):
        yield b" " * (BODY_LIMIT // 8)


CASES = {  # id: (method, path, request kwargs, expected status, a fragment of the message)
    "gen non-JSON": ("POST", "/generate", {"content": b"not json", "headers": JSON}, 422, "JSON decode error"),
    "gen truncated JSON": ("POST", "/generate", {"content": b'{"prompt": "hi",', "headers": JSON}, 422, "JSON"),
    "gen empty body": ("POST", "/generate", {"content": b"", "headers": JSON}, 422, "Field required"),
    "gen text/plain": ("POST", "/generate", {"content": b'{"prompt": "hi"}', "headers": {"content-type": "text/plain"}},
                       415, "application/json"),
    "gen form encoded": ("POST", "/generate", {"data": {"prompt": "hi"}}, 415, "application/json"),
    "gen no content type": ("POST", "/generate", {"content": b'{"prompt": "hi"}'}, 415, "application/json"),
    "gen prompt a number": ("POST", "/generate", {"json": {"prompt": 1}}, 422, "valid string"),
    "gen prompt missing": ("POST", "/generate", {"json": {"max_tokens": 5}}, 422, "Field required"),
    "gen prompt empty": ("POST", "/generate", {"json": {"prompt": ""}}, 422, "at least 1 character"),
    "gen prompt over max chars": ("POST", "/generate", {"json": {"prompt": "x" * 2001}}, 422, "max_prompt_chars"),
    "gen prompt over the context": ("POST", "/generate", {"json": {"prompt": "w " * 60, "max_tokens": 2}}, 400,
                                    "limit is 50"),
    "gen max_tokens zero": ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": 0}}, 422, "or equal to 1"),
    "gen max_tokens over limit": ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": 65}}, 422, "<= 64"),
    "gen max_tokens a string": ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": "8"}}, 422, "integer"),
    "gen max_tokens a bool": ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": True}}, 422, "integer"),
    "gen temperature NaN": ("POST", "/generate", {"content": b'{"prompt": "hi", "temperature": NaN}', "headers": JSON},
                            422, "finite number"),
    "gen temperature 9": ("POST", "/generate", {"json": {"prompt": "hi", "temperature": 9}}, 422, "or equal to 2"),
    "gen top_p zero": ("POST", "/generate", {"json": {"prompt": "hi", "top_p": 0}}, 422, "greater than 0"),
    "gen seed negative": ("POST", "/generate", {"json": {"prompt": "hi", "seed": -1}}, 422, "or equal to 0"),
    "gen seed 2**70": ("POST", "/generate", {"json": {"prompt": "hi", "seed": 2**70}}, 422, "less than or equal"),
    "gen stream a string": ("POST", "/generate", {"json": {"prompt": "hi", "stream": "yes"}}, 422, "boolean"),
    "gen unknown field": ("POST", "/generate", {"json": {"prompt": "hi", "max_new_tokens": 5}}, 422, "Extra inputs"),
    "gen body a list": ("POST", "/generate", {"json": ["hi"]}, 422, "valid dictionary"),
    "gen deeply nested": ("POST", "/generate", {"content": b"[" * 50_000, "headers": JSON}, 400, "parsing the body"),
    "gen invalid UTF-8": ("POST", "/generate", {"content": b'{"prompt": "\xff\xfe"}', "headers": JSON}, 400, "body"),
    "gen huge body": ("POST", "/generate", {"content": b"x" * (BODY_LIMIT + 1), "headers": JSON}, 413, "limit"),
    "gen huge chunked body": ("POST", "/generate", {"content": big_chunks, "headers": JSON}, 413, "limit"),
    "gen GET": ("GET", "/generate", {}, 405, "Method Not Allowed"),
    "gen ignore_eos a string": ("POST", "/generate", {"json": {"prompt": "hi", "ignore_eos": "yes"}}, 422, "boolean"),
    "gen min_tokens over max_tokens": ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": 2,
                                                                      "min_tokens": 3}}, 422,
                                       "min_tokens must be <= max_tokens (2), got 3"),
    "cmpl prompt missing": ("POST", "/v1/completions", {"json": {"max_tokens": 2}}, 400, "prompt: Field required"),
    "cmpl batched prompt": ("POST", "/v1/completions", {"json": {"prompt": ["a", "b"]}}, 400, "valid string"),
    "cmpl prompt empty": ("POST", "/v1/completions", {"json": {"prompt": ""}}, 400, "at least 1 character"),
    "cmpl prompt over the context": ("POST", "/v1/completions", {"json": {"prompt": "w " * 60}}, 400, "limit is 50"),
    "cmpl max_tokens over limit": ("POST", "/v1/completions", {"json": {"prompt": "hi", "max_tokens": 100}}, 400,
                                   "max_tokens must be <= 64"),
    "cmpl n=3": ("POST", "/v1/completions", {"json": {"prompt": "hi", "n": 3}}, 400, "only 1"),
    "cmpl logprobs": ("POST", "/v1/completions", {"json": {"prompt": "hi", "logprobs": 2}}, 400, "logprobs"),
    "cmpl five stops": ("POST", "/v1/completions", {"json": {"prompt": "hi", "stop": list("abcde")}}, 400, "at most 4"),
    "cmpl empty stop": ("POST", "/v1/completions", {"json": {"prompt": "hi", "stop": ""}}, 400, "must not be empty"),
    "cmpl stream_options without stream": ("POST", "/v1/completions",
                                           {"json": {"prompt": "hi", "stream_options": {"include_usage": True}}},
                                           400, "stream=true"),
    "cmpl unknown model": ("POST", "/v1/completions", {"json": {"prompt": "hi", "model": "gpt-4"}}, 404,
                           "does not exist"),
    "cmpl temperature -1": ("POST", "/v1/completions", {"json": {"prompt": "hi", "temperature": -1}}, 400,
                            "greater than or equal to 0"),
    "cmpl unknown field": ("POST", "/v1/completions", {"json": {"prompt": "hi", "frobnicate": 1}}, 400, "Extra inputs"),
    "cmpl min_tokens over max_tokens": ("POST", "/v1/completions", {"json": {"prompt": "hi", "min_tokens": 17}}, 400,
                                        "min_tokens must be <= max_tokens (16), got 17"),
    "cmpl stop_token_ids": ("POST", "/v1/completions", {"json": {"prompt": "hi", "stop_token_ids": [2]}}, 400,
                            "Extra inputs"),
    "cmpl huge body": ("POST", "/v1/completions", {"content": b"x" * (BODY_LIMIT + 1), "headers": JSON}, 413, "limit"),
    "chat non-JSON": ("POST", "/v1/chat/completions", {"content": b"{oops", "headers": JSON}, 400, "not valid JSON"),
    "chat text/plain": ("POST", "/v1/chat/completions", {"content": b"{}", "headers": {"content-type": "text/plain"}},
                        415, "application/json"),
    "chat no messages": ("POST", "/v1/chat/completions", {"json": {"messages": []}}, 400, "at least 1 item"),
    "chat messages a string": ("POST", "/v1/chat/completions", {"json": {"messages": "hi"}}, 400, "valid list"),
    "chat unknown role": ("POST", "/v1/chat/completions",
                          {"json": {"messages": [{"role": "robot", "content": "hi"}]}}, 400, "role"),
    "chat image part": ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}}, 400, "Input should be 'text'"),
    "chat audio part": ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}}, 400, "text parts only"),
    "chat two max token limits": ("POST", "/v1/chat/completions", {"json": {**CHAT_OK, "max_completion_tokens": 3}},
                                  400, "same limit"),
    "chat tools": ("POST", "/v1/chat/completions", {"json": {**CHAT_OK, "tools": [{"type": "function"}]}}, 400,
                   "tools: only null"),
    "chat content over max chars": ("POST", "/v1/chat/completions",
                                    {"json": {"messages": [{"role": "user", "content": "x" * 2001}]}}, 400, "limit"),
    "chat max_completion_tokens 0": ("POST", "/v1/chat/completions", {"json": {**CHAT_OK, "max_completion_tokens": 0}},
                                     400, "greater than or equal to 1"),
    "chat include_usage a string": ("POST", "/v1/chat/completions",
                                    {"json": {**CHAT_OK, "stream": True, "stream_options": {"include_usage": "y"}}},
                                    400, "boolean"),
    "v1 unknown route": ("GET", "/v1/engines", {}, 404, "Not Found"),
    # Valid JSON whose \\ud800 escape Python decodes to a str the tokenizer cannot take.
    "gen lone surrogate": ("POST", "/generate", {"content": rb'{"prompt": "\ud800x", "max_tokens": 4}', "headers": JSON},
                           422, "prompt: must be valid Unicode text"),
    "cmpl lone surrogate": ("POST", "/v1/completions", {"content": rb'{"prompt": "a\udfff"}', "headers": JSON}, 400,
                            "prompt: must be valid Unicode text"),
    "cmpl lone surrogate stop": ("POST", "/v1/completions", {"content": rb'{"prompt": "hi", "stop": ["\ud800"]}',
                                                             "headers": JSON}, 400, "stop.0: must be valid Unicode"),
    "cmpl stop too long": ("POST", "/v1/completions", {"json": {"prompt": "hi", "stop": "x" * 10_000}}, 400,
                           "at most 256 characters, got 10000"),
    "chat lone surrogate": ("POST", "/v1/chat/completions", {"content": rb'{"messages": [{"role": "user", '
                                                                        rb'"content": "\udfffhi"}]}',
                                                             "headers": JSON}, 400, "messages.0.content: must be valid"),
    "chat lone surrogate part": ("POST", "/v1/chat/completions", {"content": rb'{"messages": [{"role": "user", '
                                 rb'"content": [{"type": "text", "text": "\ud83d"}]}]}', "headers": JSON}, 400,
                                 "messages.0.content.0.text: must be valid"),
    "chat null content": ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": None}]}},
                          400, "not null"),
}


@pytest.fixture(scope="module")
def bad_input_server():
    engine = fake_engine(prefill_ms=1, step_ms=1, config=CONFIG)
    with UvicornServer(create_app(engine, limits=ServerLimits(max_body_bytes=BODY_LIMIT))) as server:
        yield server


def error_message(path: str, response: httpx.Response) -> str:
    body = response.json()
    if path.startswith("/v1"):
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]["message"]
    detail = body["detail"]
    return detail if isinstance(detail, str) else " | ".join(f"{e['loc']}: {e['msg']}" for e in detail)


def test_there_are_at_least_30_bad_input_cases():
    assert len(CASES) >= 30
    report(f"bad-input cases: {len(CASES)} "
           f"({sum(p.startswith('/v1') for _, p, *_ in CASES.values())} on /v1, the rest on /generate)")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_a_clear_4xx(bad_input_server, case):
    method, path, kwargs, status, fragment = CASES[case]
    kwargs = {**kwargs, "content": kwargs["content"]()} if callable(kwargs.get("content")) else kwargs
    response = httpx.request(method, bad_input_server.url + path, timeout=10, **kwargs)  # a hang fails here
    assert response.status_code == status, response.text[:500]
    message = error_message(path, response)
    assert fragment in message, message


def test_the_server_answers_normally_after_all_that(bad_input_server):
    url = bad_input_server.url
    for case in CASES.values():  # the whole burst once more, then real work
        method, path, kwargs, *_ = case
        kwargs = {**kwargs, "content": kwargs["content"]()} if callable(kwargs.get("content")) else kwargs
        assert httpx.request(method, url + path, timeout=10, **kwargs).status_code < 500
    ok = httpx.post(url + "/generate", json={"prompt": "x" * 2000, "max_tokens": 64}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 64
    chat = httpx.post(url + "/v1/chat/completions", json=CHAT_OK, timeout=30)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == " one two"
    assert httpx.get(url + "/health").json()["running"] == 0
    assert bad_input_server.app.state.admission.active == 0


@pytest.mark.model
@pytest.mark.timeout(300)
def test_a_prompt_longer_than_the_real_model_accepts(default_engine):
    # 5,000 short words: under the 32,000-character limit, over the 4,096 prompt tokens the engine allows.
    prompt = "cat " * 5000
    with UvicornServer(create_app(default_engine)) as server:
        gen = httpx.post(server.url + "/generate", json={"prompt": prompt, "stream": True}, timeout=60)
        chat = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": prompt}]}, timeout=60)
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert gen.status_code == 400 and "tokens; the limit is" in gen.json()["detail"]
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# --------------------------------------------------------------------------------------------------------
# Disconnect storm: clients that leave at random points, some abruptly (RST), some before any answer.
async def leaving_client(port: int, body: bytes, leave_after: int, abrupt: bool, delay_s: float) -> int:
    """POST a stream; leave after ``leave_after`` token frames (-1: before the answer, 0: after headers)."""
    await asyncio.sleep(delay_s)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    received = b""
    if leave_after >= 0:
        while b"\r\n\r\n" not in received or received.count(b"data: {\"token\"") < leave_after:
            chunk = await reader.read(65536)
            if not chunk:
                break
            received += chunk
    if abrupt:  # SO_LINGER 0: close with a reset instead of a FIN
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    return received.count(b"data: {\"token\"")


async def storm(port: int, clients: int, max_leave: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    body = json.dumps({"prompt": "Tell me a long story.", "max_tokens": 1000, "stream": True}).encode()
    return await asyncio.gather(*(leaving_client(port, body, rng.randint(-1, max_leave), rng.random() < 0.5,
                                                 rng.uniform(0, 0.2)) for _ in range(clients)))


def check_storm(engine, clients: int, max_leave: int) -> None:
    # The storm needs every client admitted at once, so the concurrency limit is raised above the number
    # of clients; otherwise most would get a quick 429 and the test would not cover mid-stream leaving.
    app = create_app(engine, limits=ServerLimits(max_concurrent=clients + 8))
    with UvicornServer(app) as server:
        start = time.perf_counter()
        read = asyncio.run(storm(server.port, clients, max_leave, seed=clients))
        left_s = time.perf_counter() - start
        backend, admission = app.state.backend, app.state.admission
        idle_s = seconds_until(lambda: engine.running == 0 and admission.active == 0, timeout_s=1.0)
        report(f"disconnect storm ({type(engine).__name__}): {clients} clients left after "
               f"{min(read)}..{max(read)} tokens within {left_s:.2f} s; {idle_s * 1000:.0f} ms later "
               f"engine.running={engine.running}, admitted={admission.active}, engine thread alive={backend.alive}")
        assert engine.running == 0 and admission.active == 0, "generations still running 1 s after the storm"
        before = engine.tokens_generated
        time.sleep(0.2)
        assert engine.tokens_generated == before  # nothing keeps generating for nobody
        assert backend.alive
        ok = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_disconnect_storm_with_the_fake_engine():
    # The fake engine runs through the same engine thread, queues and web layer as the model, with 1 ms
    # steps, so 100 clients interleave fast and the test is about the plumbing, not the CPU.
    check_storm(fake_engine(prefill_ms=1, step_ms=1), clients=100, max_leave=12)


@pytest.mark.model
@pytest.mark.timeout(300)
def test_disconnect_storm_with_the_real_model(default_engine):
    # 100 real prefills (~60 ms each) and interleaved steps: the clients leave within the first few tokens.
    check_storm(default_engine, clients=100, max_leave=3)


# --------------------------------------------------------------------------------------------------------
# Faults inside the engine mid-stream: an error event, then [DONE]; the next request works.
def read_stream(url: str, path: str, body: dict) -> list:
    with httpx.Client(timeout=120) as client, connect_sse(client, "POST", url + path, json=body) as source:
        assert source.response.status_code == 200
        return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in source.iter_sse()]


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_fault_mid_stream_then_the_next_request_works(path):
    engine = fake_engine(prefill_ms=1, step_ms=1, fail_at=2)
    body = {"max_tokens": 6, "stream": True, **({"messages": [{"role": "user", "content": "hi"}]}
                                                if "chat" in path else {"prompt": "hi"})}
    with UvicornServer(create_app(engine)) as server:
        events = read_stream(server.url, path, body)
        assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "injected fault"
        assert httpx.get(server.url + "/health").json()["running"] == 0
        ok = read_stream(server.url, path, {**body, "max_tokens": 2})
        assert ok[-1] == "[DONE]" and not any("error" in e for e in ok[:-1])


@pytest.mark.model
@pytest.mark.timeout(300)
def test_fault_in_the_real_engine_mid_stream(default_engine, fail_decode):
    fail_decode(default_engine.runner, 3, "injected fault in decode")
    with UvicornServer(create_app(default_engine)) as server:
        events = read_stream(server.url, "/generate", {"prompt": "Count to ten.", "max_tokens": 8, "stream": True,
                                                        "temperature": 0})
        assert [e.get("index") for e in events[:3]] == [0, 1, 2]
        assert events[3] == {"error": {"message": "injected fault in decode", "type": "RuntimeError"}}
        assert events[4:] == ["[DONE]"]
        assert default_engine.running == 0 and server.app.state.backend.alive
        ok = httpx.post(server.url + "/generate", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


# --------------------------------------------------------------------------------------------------------
# Load: 32 concurrent streams complete with the right token counts while /health stays responsive.
class HealthProbe:
    """GET /health every ``period_s`` on its own connection until stopped; keeps the latencies."""

    def __init__(self, url: str, period_s: float = 0.05):
        self.url, self.period_s, self.latencies_ms, self.statuses = url, period_s, [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                self.statuses.add(client.get(self.url + "/health").status_code)
                self.latencies_ms.append((time.perf_counter() - start) * 1000)
                self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def run_load(engine, streams: int, max_tokens: int, prompts: list[str]) -> None:
    # 32 streams must all be admitted: the default limit (16) would turn half of them into 429s.
    app = create_app(engine, limits=ServerLimits(max_concurrent=streams))
    results: dict[int, list] = {}
    with UvicornServer(app) as server:
        # Each prompt alone first: with greedy decoding, interleaving must not change any output.
        solo = {p: read_stream(server.url, "/generate", {"prompt": p, "max_tokens": max_tokens, "temperature": 0,
                                                          "stream": True}) for p in prompts}

        def one(i: int) -> None:
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0, "stream": True}
            results[i] = read_stream(server.url, "/generate", body)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        with HealthProbe(server.url) as probe:
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            load_s = time.perf_counter() - start
    report(f"load ({type(engine).__name__}): {streams} streams x {max_tokens} tokens in {load_s:.1f} s; "
           f"/health during it: n={len(probe.latencies_ms)} p50={statistics.median(probe.latencies_ms):.1f} ms "
           f"p99={probe.p(99):.1f} ms max={max(probe.latencies_ms):.1f} ms")
    assert len(results) == streams
    for i, events in results.items():
        tokens, finish = events[:-2], events[-2]
        assert events[-1] == "[DONE]" and "error" not in finish
        assert [t["index"] for t in tokens] == list(range(len(tokens)))
        assert finish["usage"]["completion_tokens"] == len(tokens)
        assert finish["finish_reason"] == "stop" or len(tokens) == max_tokens
        expected = solo[prompts[i % len(prompts)]]
        assert [t["token_id"] for t in tokens] == [t["token_id"] for t in expected[:-2]]
    assert probe.statuses == {200} and len(probe.latencies_ms) >= 5
    # Responsive: a health check is far shorter than the streams it runs beside (no tight bound).
    assert probe.p(99) < load_s * 1000 / 4


def test_load_32_streams_with_the_fake_engine():
    run_load(fake_engine(prefill_ms=5, step_ms=2), streams=32, max_tokens=40, prompts=["a", "b c"])


@pytest.mark.model
@pytest.mark.timeout(600)
def test_load_32_streams_with_the_real_model(default_engine):
    prompts = ["Write a long story about a lighthouse keeper.", "Explain how rain forms, step by step."]
    run_load(default_engine, streams=32, max_tokens=12, prompts=prompts)


# --------------------------------------------------------------------------------------------------------
# Exposure: local by default, limits enforced, no debugger.
def test_everything_binds_127_0_0_1_unless_told_otherwise():
    for factory in (UvicornServer, FlaskServer, serving.start_fastapi, serving.start_flask):
        assert inspect.signature(factory).parameters["host"].default == "127.0.0.1", factory
    parser = build_parser()
    assert parser.parse_args(["serve"]).host == parser.parse_args(["flask"]).host == "127.0.0.1"
    with UvicornServer(create_app(fake_engine())) as server:
        assert server.url.startswith("http://127.0.0.1:")


def test_cli_limits_reach_the_app():
    args = build_parser().parse_args(["serve", "--max-concurrent", "3", "--max-body-bytes", "1000"])
    assert (args.max_concurrent, args.max_body_bytes) == (3, 1000)
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.max_concurrent, defaults.max_body_bytes) == (ServerLimits().max_concurrent,
                                                                  ServerLimits().max_body_bytes)
    with pytest.raises(ValueError, match="max_concurrent"):
        ServerLimits(max_concurrent=0)


def test_cli_body_limit_reaches_the_flask_app(monkeypatch):
    import labserver.__main__ as cli

    made = {}

    class NoServer:  # stands in for FlaskServer: keeps the app, never listens
        running, url = False, "http://127.0.0.1:0"

        def __init__(self, app, host, port, limits=None):
            made["app"], made["limits"] = app, limits

        def start(self):
            return self

    monkeypatch.setattr(cli, "_load_engine", lambda args: fake_engine())
    monkeypatch.setattr(serving, "FlaskServer", NoServer)
    cli.main(["flask", "--max-body-bytes", "1000", "--header-timeout", "3"])
    assert made["limits"].header_timeout_s == 3  # the connection deadlines reach the server too
    with made["app"].test_client() as client:
        over = client.post("/generate", data=b" " * 1001, content_type="application/json")
        ok = client.post("/generate", json={"prompt": "hi", "max_tokens": 1})
    assert over.status_code == 413 and "1000 bytes" in over.get_json()["detail"]
    assert ok.status_code == 200


def test_beyond_max_concurrent_is_a_quick_429_not_a_pile_up():
    engine = fake_engine(prefill_ms=5, step_ms=10)
    app = create_app(engine, limits=ServerLimits(max_concurrent=2, retry_after_s=3))
    with UvicornServer(app) as server:
        url = server.url
        holders = [threading.Thread(target=read_stream, args=(url, "/generate", {"prompt": "hi", "max_tokens": 60,
                                                                                  "stream": True}))
                   for _ in range(2)]
        for t in holders:
            t.start()
        assert seconds_until(lambda: app.state.admission.active == 2, timeout_s=30) < 30
        refused = [httpx.post(url + "/generate", json={"prompt": "hi", "stream": True}, timeout=30),
                   httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=30),
                   httpx.post(url + "/v1/chat/completions", json=CHAT_OK, timeout=30)]
        running_meanwhile = engine.running
        for t in holders:
            t.join()
        after = httpx.post(url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert [r.status_code for r in refused] == [429, 429, 429]
    assert all(r.headers["retry-after"] == "3" for r in refused)
    assert "max_concurrent" in refused[0].json()["detail"]
    assert refused[1].json()["error"]["type"] == "rate_limit_error"
    assert running_meanwhile == 2  # the refused requests never reached the engine
    assert after.status_code == 200  # slots come back when streams end


def test_flask_debug_is_never_on(monkeypatch):
    assert create_flask_app(fake_engine()).debug is False
    # Even if the environment asks for it, the baseline is served without the interactive debugger:
    # an error is a bare 500, never a traceback or a console that runs code.
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app = create_flask_app(fake_engine())

    def boom():
        raise RuntimeError("secret detail")

    app.add_url_rule("/boom", view_func=boom)
    with FlaskServer(app) as server:
        response = httpx.get(server.url + "/boom", timeout=10)
        console = httpx.get(server.url + "/console", timeout=10)
    assert response.status_code == 500
    assert "Traceback" not in response.text and "secret detail" not in response.text
    assert "__debugger__" not in response.text and console.status_code == 404
