"""Notebooks 4 and 5: the exercises in which students write server code, each checker failing the wrong
answer it exists to catch; the self-sizing cancellation demo on the real model; the scheduler driver."""

import asyncio

import pytest

from labserver.engine.fake import fake_engine
from labserver.lab import cancellation, checks, concurrency, rounds
from labserver.measure.probes import HealthProbe
from labserver.measure.trace import Trace
from labserver.serve import background as serving
from notebook_solutions import solution

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def no_leftover_servers():
    yield
    serving.stop_all()


# -- (c) cancel a non-streaming answer when the client leaves ------------------------------------------
async def notices_but_does_not_cancel(request, work):
    """Returns when the client leaves, but leaves the generation running: the engine computes for nobody."""
    answer, gone = asyncio.ensure_future(work), asyncio.ensure_future(request.receive())
    done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    return answer.result() if answer in done else None


async def gives_up_at_once(request, work):
    work.close()
    return None


async def stub(request, work):
    raise NotImplementedError


def test_the_cancel_checker_passes_the_reference_and_fails_handlers_that_keep_going(capsys):
    assert checks.check_wait_or_cancel(solution("04_cancellation").wait_or_cancel)
    assert not checks.check_wait_or_cancel(cancellation.just_wait)
    assert "tokens after it left" in capsys.readouterr().out
    assert not checks.check_wait_or_cancel(notices_but_does_not_cancel)
    assert not checks.check_wait_or_cancel(gives_up_at_once)  # a client that stays must get its answer
    assert not checks.check_wait_or_cancel(stub)
    assert "TODO" in capsys.readouterr().out


def test_the_json_app_stops_the_engine_only_with_a_listening_handler():
    engine = fake_engine(prefill_ms=20, step_ms=20)
    for wait, stops in ((cancellation.just_wait, False), (solution("04_cancellation").wait_or_cancel, True)):
        server = cancellation.start_json_app(engine, wait, name="test-json-app")
        run = cancellation.hang_up(engine, server.url, stream=False, after_s=0.2, max_tokens=60, linger_s=0.1)
        assert run.timed_out and run.received == 0 and "timeout fired" in run.client
        assert (run.generated < 30) is stops and (run.generated == 60) is not stops


def test_a_blocking_client_that_gets_its_answer_records_that_its_timeout_did_not_fire():
    engine = fake_engine(prefill_ms=5, step_ms=5)
    server = cancellation.start_json_app(engine, name="test-json-app")
    run = cancellation.hang_up(engine, server.url, stream=False, after_s=5.0, max_tokens=6, linger_s=0.05)
    assert run.timed_out is False and run.received == 6 and run.wasted == 0 and run.client == "got all 6 tokens"


# -- the stop-string checker never passes without checking ----------------------------------------------
def test_the_stop_string_checker_picks_a_stop_it_can_check(capsys):
    engine = fake_engine(prefill_ms=10, step_ms=10)
    server = serving.start_fastapi(engine, name="test-stop-string")
    s = solution("04_cancellation")
    assert checks.check_stop_string(s.stream_until, engine, server.url)
    assert "SKIP" not in capsys.readouterr().out
    assert not checks.check_stop_string(s.stream_until, engine, server.url, stop="no such words")
    assert not checks.check_stop_string(lambda url, p, stop: "", engine, server.url)


# -- the blocking demo's plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("prefill_ms, step_ms", [(50.0, 5.0), (2800.0, 81.0)])
def test_the_blocking_client_leaves_at_a_third_of_the_generation(prefill_ms, step_ms):
    timing = cancellation.Timing(prefill_ms, step_ms)
    n, give_up_s = cancellation.blocking_plan(timing)
    assert 48 <= n <= 400 and timing.generation_ms(n) >= 1500
    assert give_up_s * 1000 == pytest.approx(timing.generation_ms(n) / 3)


def test_the_plan_uses_the_calibrated_step_when_the_machine_is_busy_now():
    busy = cancellation.Timing(prefill_ms=300.0, step_ms=80.0, quiet_step_ms=8.0)
    n, give_up_s = cancellation.blocking_plan(busy)
    assert busy.fastest().prefill_ms == pytest.approx(30.0)
    # At the quiet speed the answer takes >= 1.5 s and the client leaves at a third of it; slower is later.
    assert give_up_s * 1000 == pytest.approx((30.0 + (n - 1) * 8.0) / 3)
    assert give_up_s < busy.generation_ms(n) / 3000


@pytest.mark.model
@pytest.mark.timeout(600)
def test_the_blocking_demo_shows_its_lesson_on_the_real_model(default_engine):
    """The path that broke when the engine got faster: sized from the measured step, the blocking client's
    timeout fires, and the engine computes the whole answer, most of it after the client left."""
    fastapi = serving.start_fastapi(default_engine, name="test-cancel-real")
    flask = serving.start_flask(default_engine, name="test-cancel-real-flask")
    timing = cancellation.measure_timing(fastapi.url, default_engine)
    n, give_up_s = cancellation.blocking_plan(timing)
    run = cancellation.hang_up(default_engine, flask.url, stream=False, after_s=give_up_s, max_tokens=n,
                               linger_s=0.1)
    assert run.timed_out and run.received == 0
    assert run.generated == n and run.after_left > n / 2 and run.idle_ms > run.hangup_ms
    stream = cancellation.hang_up(default_engine, fastapi.url, after_tokens=5, max_tokens=128, linger_s=0.1)
    assert stream.received == 5 and stream.wasted <= 3


# -- (d) one round of continuous batching ---------------------------------------------------------------
def retires_a_round_late(engine, waiting, running, free_slots):
    for seq in [s for s in running if s.finished]:  # finished last round: its slot was busy all this time
        engine.end(seq)
        running.remove(seq)
    joining = waiting[:free_slots]
    del waiting[:len(joining)]
    if joining:
        engine.prefill_steps(joining)
        running.extend(joining)
    stepping = [s for s in running if not s.finished]
    if stepping:
        engine.decode_step(stepping, batched=True)


def admits_everyone(engine, waiting, running, free_slots):
    solution("05_concurrency").one_round(engine, waiting, running, len(waiting))


def decodes_one_at_a_time(engine, waiting, running, free_slots):
    joining = waiting[:free_slots]
    del waiting[:len(joining)]
    if joining:
        engine.prefill_steps(joining)
        running.extend(joining)
    for seq in [s for s in running if not s.finished]:
        engine.decode_step([seq])
    for seq in [s for s in running if s.finished]:
        engine.end(seq)
        running.remove(seq)


def test_the_round_checker_passes_the_reference_and_fails_known_wrong_rounds(capsys):
    assert checks.check_one_round(solution("05_concurrency").one_round)
    for wrong, says in ((retires_a_round_late, "finished but holding a slot"),
                        (admits_everyone, "3 free, admitted ['A', 'B', 'C', 'D']"),
                        (decodes_one_at_a_time, "3 decodes")):
        capsys.readouterr()
        assert not checks.check_one_round(wrong)
        assert says in capsys.readouterr().out
    assert not checks.check_one_round(lambda *args: (_ for _ in ()).throw(NotImplementedError()))


def test_the_driver_counts_free_slots_and_records_each_round():
    result = rounds.drive(solution("05_concurrency").one_round, {0: [("a", 2), ("b", 3)], 1: [("c", 1)]},
                          slots=1, rounds=5)
    # a: 2 tokens in round 0 (prefill + decode); b: rounds 1-2; c, one token, finishes at its prefill.
    assert [r.free_slots for r in result.records] == [1, 1, 0, 1, 1]
    assert [r.admitted for r in result.records] == [["a"], ["b"], [], ["c"], []]
    assert result.finished_in == {"a": 0, "b": 2, "c": 3} and rounds.expected_text(3) == " one two three"


# -- measured, not formulas ---------------------------------------------------------------------------
def load(n, arrivals, steps, batch=None):
    traces = [Trace(sent_s=1.0, arrival_ms=list(a), step_ms=list(steps), batch=list(batch or [None] * len(steps)))
              for a in arrivals]
    return concurrency.Load(n, traces, HealthProbe("http://unused"))


def test_the_itl_checker_compares_with_the_measured_gap():
    s = solution("05_concurrency")
    turns = [load(1, [[50, 80, 110]], [50, 30, 30]), load(3, [[50, 140, 230], [60, 150, 240], [70, 160, 250]],
                                                         [50, 30, 30])]
    assert checks.check_itl_prediction(s.predict_itl_ms, turns)
    assert not checks.check_itl_prediction(lambda step, n: step, turns)
    assert not checks.check_itl_prediction(lambda step, n: (n + 1) * step, turns)
    assert not checks.check_itl_prediction(s.predict_itl_ms, turns[:1])  # nothing to compare with at N = 1


def test_decode_window_and_prefill_groups():
    two = load(2, [[100, 130, 160, 190], [100, 130, 160, 190]], [100, 30, 30, 30], [2, 2, 2, 2])
    assert concurrency.decode_tokens_per_s(two) == pytest.approx(6 / 0.09)
    assert concurrency.prefill_groups(two) == [2]
    staggered = load(3, [[50, 80], [200, 230], [200, 230]], [50, 30], [None, 3])
    staggered.traces[1].step_ms[0] = staggered.traces[2].step_ms[0] = 140.0
    staggered.traces[1].batch[0] = staggered.traces[2].batch[0] = 2
    staggered.traces[0].batch[0] = None
    assert concurrency.prefill_groups(staggered) == [1, 2]
    assert concurrency.decode_tokens_per_s(staggered) is None  # they never all decoded together


def test_batch_step_ms_times_every_size_in_turns():
    engine = fake_engine(prefill_ms=1, step_ms=4)
    steps = concurrency.batch_step_ms(engine, batches=(1, 3), repeats=3, prompt="go")
    assert set(steps) == {1, 3} and all(4 <= ms < 40 for ms in steps.values()) and engine.running == 0


def test_the_aggregate_checker_compares_with_a_stopwatch(capsys):
    s = solution("05_concurrency")
    a = Trace(sent_s=1.0, arrival_ms=[100.0, 200.0, 300.0])
    b = Trace(sent_s=1.0, arrival_ms=[150.0, 250.0, 350.0])
    timed = concurrency.Load(2, [a, b], HealthProbe("http://unused"), wall_s=0.4)  # 6 tokens, >= 15 tokens/s
    assert checks.check_aggregate_tokens_per_s(s.aggregate_tokens_per_s, [timed])
    assert "stopwatch" in capsys.readouterr().out
    per_stream = lambda traces: sum(len(t.arrival_ms) / (t.arrival_ms[-1] / 1000) for t in traces) / len(traces)
    assert not checks.check_aggregate_tokens_per_s(per_stream, [timed])
    too_slow = concurrency.Load(2, [a, b], HealthProbe("http://unused"), wall_s=0.2)  # faster than the window
    assert not checks.check_aggregate_tokens_per_s(s.aggregate_tokens_per_s, [too_slow])
