"""The client: trace arithmetic on made-up arrival times (exact), percentiles and summaries on known
lists (exact), and real requests against servers that run a fake engine with known sleeps (TTFT close to
prefill_ms, gaps close to step_ms, with tolerances loose enough for a busy 2-core machine)."""
import asyncio
import threading
import time

import pytest

from labserver import fake_engine
from labserver.engine.fake import WORDS
from labserver.measure.client import astream_generate, blocking_generate, run_concurrent, stream_generate
from labserver.measure.probes import HealthProbe, probe_health
from labserver.measure.protocols import LABSERVER
from labserver.measure.stats import aggregate_tokens_per_s, percentiles, summarize
from labserver.measure.trace import Trace
from labserver.serve.app import create_app
from labserver.serve.flask_app import create_flask_app
from labserver.serve.background import FlaskServer, UvicornServer

PREFILL_MS, STEP_MS = 60, 30


@pytest.fixture(scope="module")
def engine():
    return fake_engine(prefill_ms=PREFILL_MS, step_ms=STEP_MS)


@pytest.fixture(scope="module")
def fastapi_url(engine):
    with UvicornServer(create_app(engine)) as server:
        yield server.url


@pytest.fixture(scope="module")
def flask_url(engine):
    with FlaskServer(create_flask_app(engine)) as server:
        yield server.url


def expected_text(n: int) -> str:
    return "".join(" " + WORDS[i % len(WORDS)] for i in range(n))


# -- trace arithmetic: exact ------------------------------------------------------------------------
def test_trace_metrics_from_arrival_times():
    t = Trace(arrival_ms=[100.0, 130.0, 170.0, 250.0], tokens=["a", "b", "c", "d"])
    assert t.ttft_ms == 100.0
    assert t.itl_ms == [30.0, 40.0, 80.0]
    assert t.e2e_ms == 250.0
    assert t.tpot_ms == 50.0  # (250 - 100) / 3, which is also the mean ITL
    assert t.n_tokens == 4
    assert t.tokens_per_s == 16.0  # 4 tokens in 0.25 s


def test_trace_metrics_when_too_short():
    empty, one = Trace(), Trace(arrival_ms=[42.0], tokens=["x"])
    assert (empty.ttft_ms, empty.e2e_ms, empty.tpot_ms, empty.tokens_per_s) == (None, None, None, None)
    assert (one.ttft_ms, one.itl_ms, one.tpot_ms) == (42.0, [], None)


def test_percentiles_exact():
    assert percentiles([10, 20, 30, 40, 50]) == {50: 30.0, 90: 46.0, 99: 49.6}
    assert percentiles(list(range(1, 101)), (50, 99)) == {50: 50.5, 99: 99.01}
    assert percentiles([7.0]) == {50: 7.0, 90: 7.0, 99: 7.0}
    assert percentiles([]) == {50: None, 90: None, 99: None}


def test_summarize_exact():
    a = Trace(arrival_ms=[100.0, 130.0, 170.0], step_ms=[90.0, 25.0, 35.0], prefill_time_ms=90.0)
    b = Trace(arrival_ms=[200.0, 220.0, 260.0], step_ms=[80.0, 15.0, 35.0], prefill_time_ms=80.0)
    failed = Trace(error={"type": "http_500", "message": "boom"})
    s = summarize([a, b, failed])
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 1, 6)
    assert (s["mean_ttft_ms"], s["p50_ttft_ms"], s["p90_ttft_ms"]) == (150.0, 150.0, 190.0)
    assert s["p50_itl_ms"] == 35.0  # pooled gaps 30, 40, 20, 40
    assert s["mean_itl_ms"] == 32.5
    assert (s["mean_tpot_ms"], s["p50_e2e_ms"]) == (32.5, 215.0)  # TPOTs 35 and 30
    assert (s["p50_step_ms"], s["p50_prefill_ms"]) == (30.0, 85.0)  # decode steps 25, 35, 15, 35
    assert summarize([])["p99_ttft_ms"] is None


def test_aggregate_tokens_per_s_exact():
    # Times chosen exact in binary: 4 + 2 tokens from the first send (at 8.0 s) to the last token
    # (8.25 s + 0.25 s = 8.5 s) is 12 tokens/s; a failed stream counts neither tokens nor an end.
    a = Trace(sent_s=8.0, arrival_ms=[125.0, 250.0, 375.0, 500.0])
    b = Trace(sent_s=8.25, arrival_ms=[125.0, 250.0])
    failed = Trace(sent_s=8.0, arrival_ms=[900.0], error={"type": "incomplete", "message": "cut"})
    assert aggregate_tokens_per_s([a, b, failed]) == 12.0
    assert aggregate_tokens_per_s([b]) == 8.0  # one stream: its tokens over its own E2E
    assert aggregate_tokens_per_s([failed]) is None


def test_labserver_protocol_parses_every_event_kind():
    tok = LABSERVER.parse_event({"token": " hi", "token_id": 5, "index": 0, "step_ms": 61.0,
                                 "prefill_time_ms": 61.0})
    assert [(c.text, c.token_id, c.step_ms, c.prefill_time_ms) for c in tok.tokens] == [(" hi", 5, 61.0, 61.0)]
    fin = LABSERVER.parse_event({"finish_reason": "stop", "usage": {"total_tokens": 3}, "timings": {}})
    assert fin.finish == {"finish_reason": "stop", "usage": {"total_tokens": 3}, "timings": {}} and not fin.tokens
    err = LABSERVER.parse_event({"error": {"message": "injected fault", "type": "RuntimeError"}})
    assert err.error["type"] == "RuntimeError"
    body = {"text": " a b", "tokens": [{"token": " a", "token_id": 1, "index": 0, "step_ms": 9.0},
                                       {"token": " b", "token_id": 2, "index": 1, "step_ms": 3.0}],
            "finish_reason": "length", "usage": {}, "timings": {}}
    parsed = LABSERVER.parse_body(body)
    assert [c.text for c in parsed.tokens] == [" a", " b"] and parsed.finish["finish_reason"] == "length"
    assert LABSERVER.request("p", 5, 0.0, True, seed=1) == {
        "prompt": "p", "max_tokens": 5, "temperature": 0.0, "stream": True, "seed": 1}


# -- against a fake-engine server: timing within tolerance ------------------------------------------
def test_stream_timing_matches_the_fake_engine(fastapi_url):
    seen = []
    t = stream_generate(fastapi_url, "hello", 8, 0.0, on_token=seen.append)
    assert t.ok and t.n_tokens == 8 and t.finish_reason == "length"
    assert t.text == "".join(seen) == expected_text(8)
    assert t.token_ids == [i % len(WORDS) for i in range(8)]
    # The server times each fake forward: at least its sleep; the slack is that of the gaps below.
    assert t.prefill_time_ms == t.step_ms[0] and PREFILL_MS <= t.prefill_time_ms < PREFILL_MS + 30
    assert all(STEP_MS <= ms < STEP_MS + 30 for ms in t.step_ms[1:])
    assert t.usage["completion_tokens"] == 8 and STEP_MS <= t.timings["mean_step_ms"] < STEP_MS + 30
    assert PREFILL_MS <= t.ttft_ms < PREFILL_MS + 150
    assert STEP_MS * 0.7 < sorted(t.itl_ms)[3] < STEP_MS + 30  # the median gap
    assert t.e2e_ms - t.ttft_ms >= 7 * STEP_MS * 0.9  # the server really slept between tokens
    assert t.done_ms >= t.e2e_ms


def test_blocking_gets_everything_at_once(flask_url):
    t = blocking_generate(flask_url, "hello", 5, 0.0)
    assert t.ok and not t.stream and t.text == expected_text(5) and t.finish_reason == "length"
    assert t.ttft_ms == t.e2e_ms >= PREFILL_MS + 4 * STEP_MS
    assert t.itl_ms == [0.0] * 4 and t.step_ms[0] >= PREFILL_MS and all(ms >= STEP_MS for ms in t.step_ms[1:])


def test_fastapi_non_streaming_body(fastapi_url):
    t = blocking_generate(fastapi_url + "/generate", "hello", 3, 0.0)  # a full endpoint URL works too
    assert t.ok and t.text == expected_text(3) and t.n_tokens == 3


def test_stop_after_hangs_up_and_the_server_stops(engine, fastapi_url):
    before = engine.tokens_generated
    t = stream_generate(fastapi_url, "hello", 200, 0.0, stop_after=3)
    assert t.n_tokens == 3 and t.closed_early and t.ok and t.finish_reason is None
    deadline = time.monotonic() + 3
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    assert engine.tokens_generated - before < 10  # not 200: the generation was cancelled


def test_stop_after_a_condition_on_the_trace_hangs_up_when_it_first_holds(engine, fastapi_url):
    # A client that gives up after a time budget, once it has 3 tokens: the condition is read at each token.
    budget_ms = PREFILL_MS + 1.5 * STEP_MS  # passed during the second token's step
    t = stream_generate(fastapi_url, "hello", 200, 0.0,
                        stop_after=lambda trace: trace.n_tokens >= 3 and trace.arrival_ms[-1] >= budget_ms)
    assert t.n_tokens == 3 and t.closed_early and t.ok  # the budget ran out before 3 tokens had come
    late = stream_generate(fastapi_url, "hello", 200, 0.0, stop_after=lambda trace: trace.n_tokens >= 5)
    assert late.n_tokens == 5 and late.closed_early


def test_http_errors_become_trace_errors(fastapi_url, flask_url):
    bad = stream_generate(fastapi_url, "hello", 0)
    assert bad.error["status"] == 422 and bad.error["type"] == "http_422" and bad.n_tokens == 0
    assert "max_tokens" in bad.error["message"]
    no_stream = stream_generate(flask_url, "hello", 3)
    assert no_stream.error["status"] == 400 and "does not stream" in no_stream.error["message"]


def test_fault_mid_stream_is_recorded():
    with UvicornServer(create_app(fake_engine(prefill_ms=1, step_ms=1, fail_at=2))) as server:
        t = stream_generate(server.url, "hello", 5)
    assert t.n_tokens == 2 and t.error == {"message": "injected fault", "type": "RuntimeError"}


def test_run_concurrent_streams_and_inside_a_running_loop(fastapi_url):
    traces = run_concurrent(fastapi_url, 3, prompt="hi", max_tokens=4, temperature=0.0)
    assert [t.text for t in traces] == [expected_text(4)] * 3

    async def from_a_notebook_cell():  # a loop is running here, as in Jupyter
        return run_concurrent(fastapi_url, ["a", "b c"], max_tokens=2)
    traces = asyncio.run(from_a_notebook_cell())
    assert [t.prompt for t in traces] == ["a", "b c"] and all(t.n_tokens == 2 for t in traces)
    blocking = run_concurrent(fastapi_url, 2, max_tokens=2, stream=False)
    assert all(t.ok and not t.stream for t in blocking)


def test_astream_generate(fastapi_url):
    t = asyncio.run(astream_generate(fastapi_url, "hello", 3, stop_after=2))
    assert t.n_tokens == 2 and t.closed_early


# -- /health probes -------------------------------------------------------------------------------
def test_health_stays_fast_while_fastapi_streams(fastapi_url):
    with HealthProbe(fastapi_url, interval_ms=10) as probe:
        stream_generate(fastapi_url, "hello", 10)
    assert len(probe.samples) >= 10 and probe.failures == 0
    assert probe.summary()["p50_ms"] < STEP_MS * 3  # answered between tokens, not after the stream


def test_health_on_a_kept_alive_connection_is_fast(fastapi_url):
    """The probe reuses one connection, as monitoring does. ~40 ms here instead of ~1-2 ms is Nagle's
    algorithm meeting delayed ACKs: the server's sockets lack TCP_NODELAY (asyncio sets it only on
    sockets whose proto is IPPROTO_TCP, so a listening socket made with proto 0 loses it)."""
    probe = probe_health(fastapi_url, duration_s=0.3, interval_ms=10)
    p50_ms = probe.summary()["p50_ms"]
    assert p50_ms < 15, f"/health p50 {p50_ms:.1f} ms on a kept-alive connection"


def test_health_waits_behind_a_blocking_flask_request(flask_url):
    with HealthProbe(flask_url, interval_ms=10) as probe:
        time.sleep(0.05)  # a few quick samples first
        t = blocking_generate(flask_url, "hello", 10)
    assert probe.failures == 0
    assert probe.summary()["max_ms"] >= 0.5 * t.e2e_ms  # one probe sat in the queue behind it


def test_probe_health_for_a_duration_or_until_an_event(fastapi_url):
    probe = probe_health(fastapi_url, duration_s=0.2, interval_ms=20)
    assert 3 <= len(probe.samples) <= 12
    assert all(b[0] > a[0] for a, b in zip(probe.samples, probe.samples[1:]))
    done = threading.Event()
    threading.Timer(0.1, done.set).start()
    t0 = time.perf_counter()
    assert len(probe_health(fastapi_url, until=done, interval_ms=20).samples) >= 1
    assert time.perf_counter() - t0 >= 0.09  # it waited for the event, not for a duration
    with pytest.raises(ValueError):
        probe_health(fastapi_url)
