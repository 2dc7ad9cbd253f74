"""The notebooks' experiments (labserver.lab, one module per notebook) and exercise checkers (lab.checks).

Most tests use fake_engine (fixed sleeps), so the numbers can be checked by hand and do not depend on
how busy the machine is; the few that need torch are marked `model`. Correct answers come from the
reference solutions in notebooks/solutions/, wrong ones are written here.
"""

import asyncio
import time

import pytest
from matplotlib.figure import Figure

from labserver import fake_engine, SamplingParams
from labserver.lab import baseline, cancellation, checks, concurrency, display, event_loop, runs, streaming
from labserver.serve import background as serving
from labserver.measure.client import blocking_generate, stream_generate
from labserver.measure.probes import HealthProbe
from labserver.measure.trace import Trace
from notebook_solutions import solution

pytestmark = pytest.mark.timeout(120)


def stub(*args, **kwargs):
    raise NotImplementedError


@pytest.fixture(autouse=True)
def no_leftover_servers():
    yield
    serving.stop_all()


@pytest.fixture
def engine():
    return fake_engine(prefill_ms=30, step_ms=10)


@pytest.fixture
def fastapi(engine):
    return serving.start_fastapi(engine, name="test-lab-fastapi")


@pytest.fixture
def flask(engine):
    return serving.start_flask(engine, name="test-lab-flask")


# -- the StopIteration trap ------------------------------------------------------------------------------
def test_the_stop_iteration_loop_hangs_after_the_last_item_and_the_demo_returns():
    start = time.perf_counter()
    result = event_loop.try_stream(event_loop.stop_iteration_stream, lambda: iter("abc"), timeout_s=0.3)
    assert result.outcome == "hung" and result.items == ["a", "b", "c"]
    assert any("StopIteration" in e for e in result.asyncio_errors)
    assert time.perf_counter() - start < 3


def test_the_sentinel_loop_completes_quickly():
    result = event_loop.try_stream(event_loop.sentinel_stream, lambda: fake_engine(1, 1).generate_stream("x", SamplingParams(3)))
    assert result.outcome == "completed" and len(result.items) == 4 and result.elapsed_s < 1
    assert "completed" in str(result)


def test_try_stream_reports_an_error():
    async def broken(gen):
        raise ValueError("boom")
        yield

    result = event_loop.try_stream(broken, lambda: iter(()))
    assert result.outcome == "error" and "boom" in result.error


def test_try_stream_works_while_an_event_loop_runs_on_this_thread():
    async def inside():
        return event_loop.try_stream(event_loop.sentinel_stream, lambda: iter([1, 2]))

    assert asyncio.run(inside()).outcome == "completed"  # as in a Jupyter kernel


# -- event loop, threads -----------------------------------------------------------------------------------
def test_heartbeat_stalls_only_when_the_work_runs_on_the_loop():
    def work():
        time.sleep(0.2)

    assert max(event_loop.heartbeat_gaps(work, offload=False)) >= 180
    assert max(event_loop.heartbeat_gaps(work, offload=True)) < 100


def test_thread_recorder_forwards_and_records(engine):
    recorder = runs.ThreadRecorder(engine)
    assert recorder.config is engine.config and recorder.running == 0
    assert recorder.generate("a b", SamplingParams(max_tokens=3)).text == " one two three"
    assert recorder.generations[0] == ["MainThread"] * 4  # 3 tokens and the Finish
    assert recorder.threads() == {"MainThread"}


def test_thread_recorder_closes_the_inner_generator(engine):
    gen = runs.ThreadRecorder(engine).generate_stream("a", SamplingParams(max_tokens=50))
    next(gen)
    assert engine.running == 1
    gen.close()
    assert engine.running == 0


@pytest.mark.parametrize("kind", ["batched", "thread", "executor"])
def test_measure_a_fastapi_backend(engine, kind):
    recorder = runs.ThreadRecorder(engine)
    server = serving.start_fastapi(recorder, backend=kind, name="test-lab-measure")
    run = runs.measure(server.url, max_tokens=8, label=kind, recorder=recorder)
    assert run.trace.n_tokens == 8 and run.probe.samples and run.threads
    assert 10 <= run.step_p50_ms < 20  # the engine times the fake runner's 10 ms sleep, plus a little
    if kind in ("batched", "thread"):
        assert set(run.threads) == {"labserver-engine"}
    row = run.row()
    assert row["variant"] == kind and row["torch threads before"] >= 1
    assert "/health p50 ms" in runs.runs_table({kind: run})
    assert isinstance(runs.plot_runs({kind: run}), Figure)


def test_measure_flask_is_blocking(flask):
    run = runs.measure(flask.url, max_tokens=8, stream=False)
    assert run.trace.ttft_ms == run.trace.e2e_ms and run.trace.n_tokens == 8
    assert run.probe.summary()["max_ms"] >= 0.5 * run.trace.e2e_ms  # a probe waited for the generation


# -- what the client sees --------------------------------------------------------------------------------
def test_raw_sse_prints_the_lines_as_curl_shows_them(fastapi, capsys):
    lines = [line for _, line in streaming.raw_sse(fastapi.url, max_tokens=3)]
    assert lines[0].startswith('data: {"token": " one"') and lines[1] == ""
    assert "data: [DONE]" in lines
    out = capsys.readouterr().out
    assert "text/event-stream" in out and "ms | data: [DONE]" in out


def test_produced_trace_is_the_running_sum_of_step_ms():
    trace = Trace(arrival_ms=[500.0] * 3, tokens=["a", "b", "c"], step_ms=[60.0, 30.0, 40.0])
    assert baseline.produced_trace(trace).arrival_ms == [60.0, 90.0, 130.0]


def test_tables_and_figures(engine, fastapi, flask):
    streamed = [stream_generate(fastapi.url, "x", 4, 0.0)]
    blocked = [blocking_generate(flask.url, "x", 4, 0.0)]
    table = streaming.compare_table({"stream": streamed, "block": blocked})
    assert table.splitlines()[2].split()[:2] == ["stream", "1"]
    assert isinstance(baseline.plot_engine_steps(engine.generate("x", SamplingParams(4))), Figure)


def test_print_table_shows_booleans_as_words(capsys):
    display.print_table([{"on": True, "off": False}])
    assert capsys.readouterr().out.splitlines()[-1].split() == ["yes", "no"]


# -- cancellation ------------------------------------------------------------------------------------------
def test_hang_up_on_a_stream_stops_the_engine(engine, fastapi):
    run = cancellation.hang_up(engine, fastapi.url, after_tokens=3, max_tokens=200, linger_s=0.1)
    assert run.received == 3 and run.generated <= 5 and run.idle_ms is not None
    assert run.wasted == run.generated - 3 and run.row()["client"] == "read 3 tokens, closed"


def test_hang_up_on_flask_wastes_the_rest(engine, flask):
    run = cancellation.hang_up(engine, flask.url, stream=False, after_s=0.1, max_tokens=30, linger_s=0.05)
    assert run.received == 0 and run.generated == 30 and run.wasted == 30
    assert run.idle_ms > run.hangup_ms  # the engine kept going after the client left
    assert isinstance(cancellation.plot_cancel([run, run]), Figure)


# -- concurrency -------------------------------------------------------------------------------------------
def test_load_throughput_by_hand():
    a = Trace(sent_s=10.0, arrival_ms=[100.0, 200.0, 300.0])
    b = Trace(sent_s=10.1, arrival_ms=[300.0, 400.0])
    load = concurrency.Load(2, [a, b], HealthProbe("http://unused"))
    assert load.tokens_per_s == pytest.approx(10.0)  # 5 tokens from 10.0 s to 10.5 s


def test_sweep_with_a_fake_engine(engine, fastapi):
    loads = concurrency.sweep(fastapi.url, ns=(1, 3), max_tokens=6)
    assert [load.n for load in loads] == [1, 3] and all(t.n_tokens == 6 for t in loads[1].traces)
    assert "tokens/s (all)" in concurrency.sweep_table(loads)
    assert isinstance(concurrency.plot_sweep({"a": loads, "b": loads[:1]}), Figure)
    assert isinstance(concurrency.plot_sweep(loads), Figure) and isinstance(concurrency.plot_streams(loads[1]), Figure)
    # The default backend batches: a fake step sleeps 10 ms however many sequences it carries.
    by_batch = concurrency.step_ms_by_batch(loads)
    assert 3 in by_batch and all(10 <= ms < 20 for ms in by_batch.values())
    # Round robin on one engine thread: with 3 streams each one waits for ~3 steps of 10 ms.
    turns = serving.start_fastapi(engine, backend="thread", name="test-lab-turns")
    loads = concurrency.sweep(turns.url, ns=(1, 3), max_tokens=6)
    assert loads[1].row()["ITL p50 ms"] > 2 * loads[0].row()["ITL p50 ms"]
    assert concurrency.step_ms_by_batch(loads) == {}  # turn-taking steps carry one sequence and say nothing


# -- with torch ----------------------------------------------------------------------------------------
@pytest.mark.model
def test_inference_mode_is_lost_when_a_step_changes_threads(tiny_engine):
    demo = event_loop.inference_mode_steps(tiny_engine, "hello", steps=4, hop=True)
    assert [row["inference_mode"] for row in demo.steps] == [True, False, True, False]
    assert [row["graph_recorded"] for row in demo.steps] == [False, True, False, True]
    assert demo.left_in_inference_mode == {"pool-0_0": True, "pool-1_0": False}
    same = event_loop.inference_mode_steps(tiny_engine, "hello", steps=3, hop=False)
    assert all(row["inference_mode"] and row["thread"] == "pool-0_0" for row in same.steps)


def test_step_ms_by_batch_reads_what_each_step_carried():
    a = Trace(sent_s=0.0, arrival_ms=[1.0, 2.0, 3.0, 4.0], step_ms=[50.0, 10.0, 20.0, 22.0], batch=[None, 1, 2, 2])
    b = Trace(sent_s=0.0, arrival_ms=[1.0, 2.0], step_ms=[50.0, 24.0], batch=[None, 2])
    load = concurrency.Load(2, [a, b], HealthProbe("http://unused"))
    assert concurrency.step_ms_by_batch([load]) == {1: 10.0, 2: 22.0}


@pytest.mark.model
@pytest.mark.timeout(300)
def test_sweep_on_the_batched_server(default_engine):
    server = serving.start_fastapi(default_engine, backend="batched", name="test-batched-sweep")
    try:
        loads = concurrency.sweep(server.url, ns=(1, 3), max_tokens=12)
    finally:
        serving.stop("test-batched-sweep")
    steps = concurrency.step_ms_by_batch(loads)
    assert 3 in steps and all(ms > 0 for ms in steps.values())
    # One step for all three: a stream's gap is one (bigger) step of three sequences, as the server reports
    # it, not three steps in turn. (How much bigger depends on the CPU: compute-bound here, ~2-2.5x.)
    assert loads[1].row()["ITL p50 ms"] < 1.5 * steps[3]


# -- checkers: reference solutions pass, wrong answers and stubs do not -------------------------------
def test_blocking_prediction_checker(capsys):
    ok = solution("01_blocking_baseline").predict_blocking_ttft_ms
    trace = Trace(arrival_ms=[200.0] * 4, step_ms=[100.0, 30.0, 30.0, 30.0], prefill_time_ms=100.0)
    assert checks.check_blocking_prediction(ok, trace)
    assert not checks.check_blocking_prediction(lambda p, s, n: p + n * s, trace)
    assert not checks.check_blocking_prediction(stub, trace)
    assert "TODO" in capsys.readouterr().out


def test_queued_checker(flask, engine):
    assert checks.check_queued(solution("01_blocking_baseline").queued, flask.url)
    # Served side by side (FastAPI's engine thread interleaves them): the answers arrive together.
    fastapi = serving.start_fastapi(engine, name="test-lab-queued")
    assert not checks.check_queued(solution("01_blocking_baseline").queued, fastapi.url)
    assert not checks.check_queued(stub, flask.url)


def test_streaming_checkers(fastapi):
    s = solution("02_streaming_sse")
    assert checks.check_parse_sse_line(s.parse_sse_line, fastapi.url)
    assert not checks.check_parse_sse_line(lambda line: None)
    assert checks.check_my_stream(s.my_stream, fastapi.url)
    assert not checks.check_my_stream(lambda url, p, n: [(100.0, t) for t in stream_generate(url, p, n, 0).tokens],
                                      fastapi.url)  # all at the same time: not streamed


def test_event_loop_checkers():
    s = solution("03_event_loop")
    assert s.run_checks()
    assert not checks.check_stream_tokens(event_loop.stop_iteration_stream)  # hangs: the checker's timeout catches it
    assert not checks.check_one_thread(s.stream_tokens)  # the default pool: two threads for two streams

    async def on_the_loop(gen):
        for item in gen:
            yield item

    assert not checks.check_one_thread(on_the_loop)


def test_cancellation_checkers(engine, fastapi):
    s = solution("04_cancellation")
    assert checks.check_hang_up(s.hang_up_after, engine, fastapi.url)
    assert not checks.check_hang_up(lambda url, n: stream_generate(url, "x", 60, 0).n_tokens, engine, fastapi.url)
    assert not checks.check_hang_up(lambda url, n: n, engine, fastapi.url)  # read nothing, said n
    assert checks.check_stop_string(s.stream_until, engine, fastapi.url, prompt="x", stop="three")
    assert not checks.check_stop_string(s.stream_until, engine, fastapi.url, prompt="x", stop=".")  # cannot check
    assert not checks.check_stop_string(lambda url, p, stop: stream_generate(url, p, 64, 0).text, engine,
                                        fastapi.url, prompt="x", stop="three")


def test_concurrency_checkers():
    s = solution("05_concurrency")
    a = Trace(sent_s=1.0, arrival_ms=[100.0, 160.0, 220.0], step_ms=[100.0, 30.0, 30.0])
    b = Trace(sent_s=1.0, arrival_ms=[130.0, 190.0, 250.0], step_ms=[30.0, 30.0, 30.0])
    loads = [concurrency.Load(2, [a, b], HealthProbe("http://unused"))]
    assert checks.check_aggregate_tokens_per_s(s.aggregate_tokens_per_s, loads)
    assert not checks.check_aggregate_tokens_per_s(lambda traces: 1.0, loads)
    assert checks.check_itl_prediction(s.predict_itl_ms, loads)
    assert not checks.check_itl_prediction(lambda step, n: step, loads)
    two = [Trace(sent_s=1.0, arrival_ms=[100.0, 130.0, 160.0, 190.0], step_ms=[100.0, 30.0, 30.0, 30.0],
                 batch=[2, 2, 2, 2]) for _ in range(2)]  # 2 streams, steps of 2 in 30 ms: 66.7 tokens/s
    batched = [concurrency.Load(2, two, HealthProbe("http://unused"))]
    assert checks.check_batched_tokens_per_s(s.batched_tokens_per_s, batched)
    assert not checks.check_batched_tokens_per_s(lambda b, step: 1000 / step, batched)
