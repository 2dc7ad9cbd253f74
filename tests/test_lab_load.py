"""Notebook 6's experiments and checkers, on the fake engine: the checkers pass the reference solutions and
FAIL the wrong answers they exist to catch; the experiments return what the notebook reads."""
import math

import pytest

from labserver import fake_engine
from labserver.config import EngineConfig
from labserver.lab import checks, load as lab
from labserver.serve.background import start_fastapi, stop
from notebook_solutions import solution as load_solution


@pytest.fixture(scope="module")
def solution():
    return load_solution("06_load")


def test_the_reference_solutions_pass(solution, capsys):
    assert solution.run_checks(None)
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("PASS") == 12


def test_evenly_spaced_arrivals_fail_the_poisson_check(capsys):
    assert not checks.check_poisson_arrivals(lambda n, rate, seed=0: [i / rate for i in range(n)])
    assert "FAIL  poisson_arrivals: rate 0.5: std/mean of the gaps 0.000" in capsys.readouterr().out


def test_calling_labservers_own_arrival_times_fails_the_poisson_check(capsys):
    from labserver.measure.arrivals import arrival_times

    assert not checks.check_poisson_arrivals(lambda n, rate, seed=0: arrival_times(n, rate, 1.0, seed))
    assert "FAIL  poisson_arrivals: it called labserver's" in capsys.readouterr().out
    from labserver.measure import arrivals

    assert arrivals.arrival_times is arrival_times  # the tripwire is gone after the check


def test_a_wrong_rate_fails_the_poisson_check(solution, capsys):
    assert not checks.check_poisson_arrivals(lambda n, rate, seed=0: solution.poisson_arrivals(n, 1 / rate, seed))
    assert "mean gap" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [lambda k, p, s, t, i: k * (p + (t - 1) * s),  # no arrivals
                                   lambda k, p, s, t, i: max(0.0, k * (t * s - i))],  # the prefill as a step
                         ids=["no-arrivals", "no-prefill"])
def test_queue_predictions_that_ignore_arrivals_or_the_prefill_fail_by_hand_and_on_the_fake_engine(wrong, capsys):
    assert not checks.check_queue_prediction(wrong)
    out = capsys.readouterr().out
    assert out.count("FAIL  predict_queue_ms: fake engine") == 2, out  # both measured requests, whatever the load


def test_a_stub_is_todo(capsys):
    def stub(*args):
        raise NotImplementedError

    assert not checks.check_poisson_arrivals(stub)
    assert capsys.readouterr().out.startswith("TODO")


@pytest.mark.slow
def test_knee_and_backpressure_on_the_fake_engine():
    engine = fake_engine(prefill_ms=20, step_ms=10, config=EngineConfig(model="fake", threads=1, max_batch=4))
    try:
        server = start_fastapi(engine, backend="batched", name="test-load-lab")
        alone = lab.measure_alone(server.url)
        assert alone.e2el_ms >= 20 + (lab.OUTPUT_TOKENS - 1) * 10 and alone.rate == 1000 / alone.e2el_ms
        slo = lab.slo_from(alone)
        assert slo == {"ttft": round(4 * alone.ttft_ms, 1), "e2el": round(4 * alone.e2el_ms, 1)}
        knee = lab.knee(server.url, alone, slo, concurrency=4, seconds=1.5)
        by_hand = 4 / (lab.OUTPUT_TOKENS * 10 / 1000)  # a batch of 4, a token each per 10 ms step (prefills aside)
        assert 0.4 * by_hand < knee.capacity <= 1.02 * by_hand and knee.rates[0] == pytest.approx(knee.capacity / 4, abs=1e-2)
        assert knee.saturated[-1] and knee.knee is not None
        below, past = lab.below_and_past(knee)
        assert len(below) == len(knee.rates) - 1 and past is knee.summaries[-1]
        assert "over-saturated" in lab.sweep_table(knee) and lab.plot_knee(knee) is not None
    finally:
        stop("test-load-lab")
    burst = lab.backpressure(engine, rate=math.inf, limit=2, n=6)
    limited, unbounded = burst.values()
    assert (limited.summary["completed"], limited.summary["failed_429"]) == (2, 4)
    assert unbounded.summary["completed"] == 6 and unbounded.summary["failed"] == 0
    assert "Retry-After" in lab.backpressure_table(burst) and lab.plot_timelines(burst) is not None
