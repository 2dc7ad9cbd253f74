"""The SSE stream on the wire: exact bytes, the [DONE] terminator, and errors inside a stream."""

import json
import time

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import fake_engine
from labserver.serve.app import create_app
from labserver.serve.schemas import DONE_FRAME, error_frame, sse_frame
from labserver.serve.background import UvicornServer


def read_events(url: str, body: dict) -> list[tuple[float, str]]:
    """(arrival time, data) of every SSE event of one streamed POST."""
    with httpx.Client(timeout=10) as client, connect_sse(client, "POST", url + "/generate", json=body) as source:
        assert source.response.status_code == 200
        return [(time.perf_counter(), event.data) for event in source.iter_sse()]


def test_frames_by_hand():
    assert sse_frame({"token": " hi", "index": 0}) == b'data: {"token": " hi", "index": 0}\n\n'
    assert sse_frame({"token": "é"}) == b'data: {"token": "\\u00e9"}\n\n'  # json.dumps escapes: one line
    assert DONE_FRAME == b"data: [DONE]\n\n"
    assert error_frame(RuntimeError("boom")) == b'data: {"error": {"message": "boom", "type": "RuntimeError"}}\n\n'


@pytest.mark.timeout(60)
def test_stream_bytes_are_exact(fake_engine):
    # fake_engine(prefill_ms=30, step_ms=10) reports its sleeps as step times: every byte but total_ms and
    # tokens_per_s (wall clock) can be written down by hand.
    with UvicornServer(create_app(fake_engine)) as server:
        body = {"prompt": "hello there", "max_tokens": 3, "stream": True}
        response = httpx.post(server.url + "/generate", json=body, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    tokens = (
        b'data: {"token": " one", "token_id": 0, "index": 0, "step_ms": 30.0, "prefill_time_ms": 30.0}\n\n'
        b'data: {"token": " two", "token_id": 1, "index": 1, "step_ms": 10.0}\n\n'
        b'data: {"token": " three", "token_id": 2, "index": 2, "step_ms": 10.0}\n\n'
    )
    finish_start = (
        b'data: {"finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 3, '
        b'"total_tokens": 5}, "timings": {"prefill_time_ms": 30.0, "decode_time_ms": 20.0, '
        b'"mean_step_ms": 10.0, "total_ms": '
    )
    raw = response.content
    assert raw.startswith(tokens + finish_start)
    assert raw.endswith(b"}}\n\n" + DONE_FRAME)
    assert raw.count(b"\n\n") == 5  # 3 tokens + finish + [DONE], nothing else


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", "executor", "blocking"])
def test_done_follows_the_last_token_at_once(backend):
    # The seed awaited run_in_executor(next) and caught StopIteration: the stream hung after its last
    # token forever. Here [DONE] must follow the summary straight away for every backend.
    engine = fake_engine(prefill_ms=5, step_ms=5)
    with UvicornServer(create_app(engine, backend)) as server:
        events = read_events(server.url, {"prompt": "hi", "max_tokens": 4, "stream": True})
    data = [d for _, d in events]
    assert [json.loads(d)["index"] for d in data[:4]] == [0, 1, 2, 3]
    assert json.loads(data[4])["finish_reason"] == "length"
    assert data[5:] == ["[DONE]"]
    last_token_at, done_at = events[3][0], events[5][0]
    assert done_at - last_token_at < 1.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", "executor"])
def test_error_mid_stream_is_an_event_then_done_and_the_server_lives(backend):
    engine = fake_engine(prefill_ms=5, step_ms=5, fail_at=3)
    with UvicornServer(create_app(engine, backend)) as server:
        data = [d for _, d in read_events(server.url, {"prompt": "hi", "max_tokens": 10, "stream": True})]
        assert [json.loads(d)["index"] for d in data[:3]] == [0, 1, 2]
        assert json.loads(data[3]) == {"error": {"message": "injected fault", "type": "RuntimeError"}}
        assert data[4:] == ["[DONE]"]
        # The same server still serves: a health check and a request that stops before the fault.
        assert httpx.get(server.url + "/health").json()["running"] == 0
        ok = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 3}, timeout=10)
        assert ok.status_code == 200 and ok.json()["text"] == " one two three"
        again = [d for _, d in read_events(server.url, {"prompt": "hi", "max_tokens": 10, "stream": True})]
        assert again == data  # fixed fake step times: the second failing stream is byte-identical


@pytest.mark.timeout(60)
def test_error_before_the_first_token_is_still_a_stream():
    engine = fake_engine(prefill_ms=5, step_ms=5, fail_at=0)
    with UvicornServer(create_app(engine)) as server:
        data = [d for _, d in read_events(server.url, {"prompt": "hi", "max_tokens": 5, "stream": True})]
    assert json.loads(data[0])["error"]["message"] == "injected fault"
    assert data[1:] == ["[DONE]"]
