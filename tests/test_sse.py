"""The SSE stream on the wire: exact bytes, the [DONE] terminator, and errors inside a stream."""

import json
import re
import time

import httpx
import pytest
from httpx_sse import connect_sse

from labserver import fake_engine
from labserver.serve.app import create_app
from labserver.serve.generate_api import error_payload
from labserver.serve.sse import DONE_FRAME, sse_frame
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
    assert sse_frame(error_payload(RuntimeError("boom"))) == b'data: {"error": {"message": "boom", "type": "RuntimeError"}}\n\n'


TIMES = re.compile(rb'("(?:step_ms|prefill_time_ms|decode_time_ms|mean_step_ms|total_ms|tokens_per_s)": )[0-9.]+')


def untimed(data: str) -> dict:
    """An event without its measured times (all the rest is fixed by the fake engine)."""
    event = json.loads(data)
    return {k: v for k, v in event.items() if k not in ("step_ms", "prefill_time_ms")}


@pytest.mark.timeout(60)
def test_stream_bytes_are_exact(fake_engine):
    # The fake runner (30 ms per prefill, 10 ms per decode step) runs under the real engine, which times
    # each forward: every byte but the times (T below) can be written down by hand, and the times follow
    # from the sleeps and from each other. The default backend batches: a decode step says how many
    # sequences shared it (here one), a prefill of one prompt says nothing.
    with UvicornServer(create_app(fake_engine)) as server:
        body = {"prompt": "hello there", "max_tokens": 3, "stream": True}
        response = httpx.post(server.url + "/generate", json=body, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert TIMES.sub(rb"\1T", response.content) == (
        b'data: {"token": " one", "token_id": 0, "index": 0, "step_ms": T, "prefill_time_ms": T, "batch": 1}\n\n'
        b'data: {"token": " two", "token_id": 1, "index": 1, "step_ms": T, "batch": 1}\n\n'
        b'data: {"token": " three", "token_id": 2, "index": 2, "step_ms": T, "batch": 1}\n\n'
        b'data: {"finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 3, '
        b'"total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}, "timings": {"prefill_time_ms": T, '
        b'"decode_time_ms": T, "mean_step_ms": T, "total_ms": T, "tokens_per_s": T, "cached_tokens": 0}}\n\n'
        + DONE_FRAME
    )
    first, second, third, finish = [json.loads(line[6:]) for line in response.text.split("\n\n")[:4]]
    timings = finish["timings"]
    assert first["step_ms"] == first["prefill_time_ms"] == timings["prefill_time_ms"] >= 30  # it slept 30 ms
    assert second["step_ms"] >= 10 and third["step_ms"] >= 10
    # Each time is rounded to 0.001 ms on its own: the sum of two rounded steps is within 0.0015 of the
    # rounded sum, and the mean (half of it) within 0.001.
    assert timings["decode_time_ms"] == pytest.approx(second["step_ms"] + third["step_ms"], abs=0.0015)
    assert timings["mean_step_ms"] == pytest.approx(timings["decode_time_ms"] / 2, abs=0.001)
    assert timings["total_ms"] >= timings["prefill_time_ms"] + timings["decode_time_ms"]
    assert timings["tokens_per_s"] == pytest.approx(3 / timings["total_ms"] * 1000, rel=1e-3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["batched", "thread", "executor", "blocking", "process"])
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
@pytest.mark.parametrize("backend", ["batched", "thread", "executor", "process"])
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
        assert [untimed(d) for d in again[:-1]] == [untimed(d) for d in data[:-1]] and again[-1] == "[DONE]"


@pytest.mark.timeout(60)
def test_error_before_the_first_token_is_still_a_stream():
    engine = fake_engine(prefill_ms=5, step_ms=5, fail_at=0)
    with UvicornServer(create_app(engine)) as server:
        data = [d for _, d in read_events(server.url, {"prompt": "hi", "max_tokens": 5, "stream": True})]
    assert json.loads(data[0])["error"]["message"] == "injected fault"
    assert data[1:] == ["[DONE]"]
