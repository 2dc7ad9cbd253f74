"""The exercise checkers of notebooks 1-3 on the fake engine: each one FAILS a known-wrong answer and
passes the reference solution (notebooks/solutions/), in seconds and without the model.

The wrong answers are the mistakes the notebooks teach against: an SSE endpoint without `[DONE]`, with
the wrong content type, or that buffers the whole answer; a bridge that runs the steps on the event loop
or waits for `StopIteration`; a stream client that reads the whole body first; a TTFT formula off by a step.
"""
import asyncio
import json
import time

import httpx
import pytest

from labserver import SamplingParams, TokenEvent
from labserver.engine.fake import fake_engine
from labserver.lab import checks
from labserver.lab.event_loop import stop_iteration_stream
from labserver.measure.client import blocking_generate
from labserver.serve.background import running_servers, start_fastapi, start_flask, stop
from notebook_solutions import solution


SOL1, SOL2, SOL3 = (solution(n) for n in ("01_blocking_baseline", "02_streaming_sse", "03_event_loop"))


# -- notebook 2: the student's SSE endpoint -------------------------------------------------------------
def sse_app(engine, media_type="text/event-stream", done=True, buffered=False, end="\n\n"):
    """A variant of the reference endpoint with one mistake."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.post("/generate")
    def generate(body: dict):
        items = engine.generate_stream(body["prompt"], SamplingParams(body["max_tokens"], 0.0))
        if buffered:
            items = list(items)  # the whole answer first, then "stream" it

        def frames():
            for item in items:
                if isinstance(item, TokenEvent):
                    yield f"data: {json.dumps({'token': item.token})}" + end
            if done:
                yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type=media_type)

    return app


def test_sse_endpoint_checker_passes_the_reference(capsys):
    assert checks.check_sse_endpoint(SOL2.make_sse_app), capsys.readouterr().out


def test_sse_endpoint_checker_passes_fastapis_own_sse_response(capsys):
    """The checker tests what the client sees, not how the frames were written."""
    from fastapi import FastAPI
    from fastapi.sse import EventSourceResponse, ServerSentEvent

    def make(engine):
        app = FastAPI()

        @app.post("/generate", response_class=EventSourceResponse)
        def generate(body: dict):
            for item in engine.generate_stream(body["prompt"], SamplingParams(body["max_tokens"], 0.0)):
                if isinstance(item, TokenEvent):
                    yield {"token": item.token}
            yield ServerSentEvent(raw_data="[DONE]")

        return app

    assert checks.check_sse_endpoint(make), capsys.readouterr().out


@pytest.mark.parametrize("mistake, says", [
    (dict(done=False), "expected '[DONE]'"),
    (dict(media_type="application/json"), "expected text/event-stream"),
    (dict(buffered=True), "streamed: at least"),
    (dict(end="\n"), "ends its event with a blank line"),
])
def test_sse_endpoint_checker_fails_a_wrong_endpoint(mistake, says, capsys):
    assert not checks.check_sse_endpoint(lambda engine: sse_app(engine, **mistake))
    out = capsys.readouterr().out
    assert "FAIL" in out and says in [line for line in out.splitlines() if line.startswith("FAIL")][0], out


def test_sse_endpoint_checker_fails_a_function_that_returns_no_app(capsys):
    assert not checks.check_sse_endpoint(lambda engine: None)
    assert "not an app" in capsys.readouterr().out


def test_sse_endpoint_checker_says_todo_for_the_stub(capsys):
    def stub(engine):
        raise NotImplementedError

    assert not checks.check_sse_endpoint(stub)
    assert "TODO" in capsys.readouterr().out


def test_parse_sse_line_checker_fails_a_parser_that_returns_any_json(capsys):
    def any_json(line):
        data = line[5:].strip() if line.startswith("data:") else ""
        return json.loads(data) if data and data != "[DONE]" else None

    assert checks.check_parse_sse_line(SOL2.parse_sse_line), capsys.readouterr().out
    assert not checks.check_parse_sse_line(any_json)
    assert "FAIL  parse_sse_line: 'data: 42' -> 42" in capsys.readouterr().out


# -- notebook 2: the student's stream client ------------------------------------------------------------
@pytest.fixture
def fast_fake_server():
    """A server whose steps take no time at all: the old checker's 5 ms per gap failed correct clients here."""
    yield start_fastapi(fake_engine(prefill_ms=0, step_ms=0), name="test-nbA-fast")
    stop("test-nbA-fast")


def test_my_stream_checker_passes_the_reference_on_a_fast_server(fast_fake_server, capsys):
    assert checks.check_my_stream(SOL2.my_stream, fast_fake_server.url, prompt="go"), capsys.readouterr().out


def test_my_stream_checker_fails_a_client_that_reads_the_whole_body_first(fast_fake_server, capsys):
    def buffered(url, prompt, max_tokens):
        start = time.perf_counter()
        body = httpx.post(url + "/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                   "stream": True}, timeout=60).text
        t = (time.perf_counter() - start) * 1000
        events = [SOL2.parse_sse_line(line) for line in body.splitlines()]
        return [(t + i * 1e-3, e["token"]) for i, e in enumerate(e for e in events if e and "token" in e)]

    assert not checks.check_my_stream(buffered, fast_fake_server.url, prompt="go")
    assert "FAIL  my_stream: fake engine: first token" in capsys.readouterr().out


# -- notebook 3: the bridge -----------------------------------------------------------------------------
def test_bridge_checker_passes_the_reference(capsys):
    assert checks.check_stream_tokens(SOL3.stream_tokens), capsys.readouterr().out


def test_bridge_checker_fails_a_bridge_that_runs_the_steps_on_the_loop(capsys):
    async def on_the_loop(gen):
        for item in gen:
            yield item

    assert not checks.check_stream_tokens(on_the_loop)
    assert "FAIL  stream_tokens: /health during the stream" in capsys.readouterr().out


def test_bridge_checker_fails_a_bridge_that_collects_the_whole_generation_first(capsys):
    async def buffered(gen):  # the loop stays free, but nothing is yielded until the last step
        for item in await asyncio.to_thread(list, gen):
            yield item

    assert not checks.check_stream_tokens(buffered)
    assert "FAIL  stream_tokens: tokens arrive as the engine makes them" in capsys.readouterr().out


def test_bridge_checker_fails_the_stop_iteration_hang_within_its_timeout(capsys):
    start = time.perf_counter()
    assert not checks.check_stream_tokens(stop_iteration_stream)
    assert time.perf_counter() - start < 20
    assert "hung after" in capsys.readouterr().out


def test_one_thread_checker_passes_the_reference_and_fails_the_default_pool(capsys):
    async def default_pool(gen):
        loop, done = asyncio.get_running_loop(), object()
        while (item := await loop.run_in_executor(None, next, gen, done)) is not done:
            yield item

    assert checks.check_one_thread(SOL3.stream_on_one_thread), capsys.readouterr().out
    assert not checks.check_one_thread(default_pool)


# -- notebook 1: the blocking server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_flask():
    yield start_flask(fake_engine(prefill_ms=40, step_ms=30), name="test-nbA-flask")
    stop("test-nbA-flask")


def test_blocking_prediction_is_checked_against_the_measured_ttft(fake_flask, capsys):
    trace = blocking_generate(fake_flask.url, "go", 8, temperature=0)
    assert checks.check_blocking_prediction(SOL1.predict_blocking_ttft_ms, trace), capsys.readouterr().out
    assert not checks.check_blocking_prediction(lambda p, s, n: p + n * s, trace)  # one step too many
    assert not checks.check_blocking_prediction(lambda p, s, n: p, trace)  # a streaming server's TTFT
    assert not checks.check_blocking_prediction(lambda p, s, n: 3 * (p + (n - 1) * s), trace)


def test_queued_checker_passes_the_reference_and_fails_an_unsorted_answer(fake_flask, capsys):
    assert checks.check_queued(SOL1.queued, fake_flask.url), capsys.readouterr().out
    assert not checks.check_queued(lambda url, n, m: SOL1.queued(url, n, m)[::-1], fake_flask.url)


def test_queued_checker_fails_requests_sent_one_after_another(fake_flask, capsys):
    def one_by_one(url, n, max_tokens):
        traces = [blocking_generate(url, "go", max_tokens, temperature=0) for _ in range(n)]
        return sorted(traces, key=lambda t: t.ttft_ms)

    assert not checks.check_queued(one_by_one, fake_flask.url)
    assert "FAIL  queued: the 3 requests left within" in capsys.readouterr().out


# -- the notebooks' servers -----------------------------------------------------------------------------
def test_rerunning_a_cell_that_starts_a_server_leaves_one_server():
    engine = fake_engine(prefill_ms=0, step_ms=0)
    first = start_fastapi(engine, name="test-nbA-rerun")
    second = start_fastapi(engine, name="test-nbA-rerun")
    try:
        assert not first.running and second.running
        assert [n for n in running_servers() if n == "test-nbA-rerun"] == ["test-nbA-rerun"]
    finally:
        stop("test-nbA-rerun")
