"""Open-loop load: the pure parts exactly (arrivals, data sets, goodput, the summary), then runs against
servers on the fake engine whose answers can be computed by hand (arrivals at a known rate, queueing
behind a server with a known step time, a 429 limit, the sweep's stop), and the CLI.

Tolerances on arrivals follow from the Poisson variance: the mean of n - 1 exponential gaps of mean 1/R
has a standard deviation of (1/R) / sqrt(n - 1), and a check at 4 of those fails a correct generator
with a probability under 1e-4. Tolerances on the fake server's timings allow for the HTTP and thread
overhead of a busy 2-core machine (the fake's sleeps are lower bounds: no request is faster than them).
"""
import json
import math

import numpy as np
import pytest

from labserver import fake_engine
from labserver.engine.fake import WordTokenizer
from labserver.measure.arrivals import arrival_times, gap_cv, gaps
from labserver.measure.datasets import count_tokens, random_requests, shared_prefix_requests
from labserver.measure.goodput import meets_slo, parse_slo
from labserver.measure.load import LoadError, run_load, summarize_load
from labserver.measure.protocols import OpenAIProtocol, openai_protocol
from labserver.config import EngineConfig
from labserver.measure.sweep import capacity, kept_up_ratio, over_saturated, queue_grew, sweep
from labserver.serve.background import UvicornServer
from labserver.serve.app import create_app
from labserver.serve.limits import ServerLimits

EVEN = math.inf  # burstiness: evenly spaced arrivals


# -- arrivals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.5, 20.0])
def test_poisson_gaps_have_the_asked_mean(rate):
    n = 4000
    g = np.array(gaps(n, rate, 1.0, seed=1))
    sigma = (1 / rate) / math.sqrt(n)  # std of the mean of n exponential gaps
    assert abs(g.mean() - 1 / rate) < 4 * sigma
    assert arrival_times(5, rate, seed=1) == pytest.approx(np.concatenate([[0], np.cumsum(g[:4])]).tolist())


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_burstiness_sets_the_spread(burstiness):
    n = 20000
    g = np.array(gaps(n, 10.0, burstiness, seed=2))
    # Gamma(k): excess kurtosis 6/k, so the sample variance has relative std sqrt((2 + 6/k) / n) and
    # the sample std half that; 5 of those is the tolerance on the coefficient of variation.
    rel = 0.5 * math.sqrt((2 + 6 / burstiness) / n)
    assert abs(g.std() / g.mean() - gap_cv(burstiness)) < 5 * rel * gap_cv(burstiness)
    assert abs(g.mean() - 0.1) < 4 * 0.1 * gap_cv(burstiness) / math.sqrt(n)


def test_even_and_instant_arrivals_and_bad_rates():
    assert arrival_times(3, 4.0, EVEN) == [0.0, 0.25, 0.5]
    assert arrival_times(3, math.inf) == [0.0] * 3 and arrival_times(0, 1.0) == []
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            gaps(3, bad)
    with pytest.raises(ValueError):
        gaps(3, 1.0, burstiness=0)


# -- data sets and goodput --------------------------------------------------------------------------
def test_random_requests_have_their_token_lengths():
    tok = WordTokenizer()
    fixed = random_requests(5, 12, 7, tokenizer=tok, seed=3)
    assert [(r.input_tokens, r.output_tokens) for r in fixed] == [(12, 7)] * 5
    assert all(len(tok(r.prompt)["input_ids"]) == 12 for r in fixed)
    ranged = random_requests(200, 10, 10, 0.5, tokenizer=tok, seed=3)
    assert {r.output_tokens for r in ranged} <= set(range(5, 16)) and len({r.output_tokens for r in ranged}) > 5
    assert random_requests(3, 4, 2, seed=3) == random_requests(3, 4, 2, seed=3)  # seeded
    assert count_tokens(tok)(" one two") == 2 and count_tokens(None) is None


def test_shared_prefix_requests_share_their_group_prefix():
    specs = shared_prefix_requests(6, 8, 3, 4, num_prefixes=2, tokenizer=WordTokenizer(), seed=0)
    first = [s.prompt.split()[:8] for s in specs]
    assert first[0] == first[2] == first[4] and first[1] == first[3] and first[0] != first[1]
    assert all(s.input_tokens == 11 for s in specs)


def test_goodput_slo_parsing_and_judging():
    assert parse_slo("ttft:200 tpot:50 e2el:3000") == {"ttft": 200.0, "tpot": 50.0, "e2el": 3000.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_slo(bad)
    slo = {"ttft": 100.0, "e2el": 1000.0}
    assert meets_slo({"ttft_ms": 100.0, "tpot_ms": None, "e2el_ms": 1000.0}, slo)
    assert not meets_slo({"ttft_ms": 100.0, "tpot_ms": 1.0, "e2el_ms": 1000.1}, slo)
    assert not meets_slo({"ttft_ms": 5.0, "e2el_ms": 5.0, "error": {"status": 429}}, slo)


def _row(arrival, queue, ttft, itl, tokens=None, error=None, good=None):
    e2el = None if ttft is None else ttft + sum(itl)
    return {"arrival_ms": arrival, "queue_ms": queue, "ttft_ms": ttft, "itl_ms": itl, "e2el_ms": e2el,
            "tpot_ms": sum(itl) / len(itl) if itl else None, "input_tokens": 10,
            "output_tokens": tokens if tokens is not None else len(itl) + 1, "error": error, "good": good}


def test_summary_has_vllms_keys_and_exact_figures():
    rows = [_row(0.0, 0.0, 100.0, [20.0, 40.0], good=True), _row(500.0, 100.0, 300.0, [20.0], good=False),
            _row(800.0, 0.0, None, [], error={"status": 429, "type": "http_429"})]
    s = summarize_load(rows, 2.0, rate=1.5, slo={"ttft": 200.0})
    assert (s["completed"], s["failed"], s["failed_429"]) == (2, 1, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (20, 5)
    assert (s["request_throughput"], s["output_throughput"], s["total_token_throughput"]) == (1.0, 2.5, 12.5)
    assert s["request_goodput"] == 0.5  # one good request in 2 s
    assert (s["mean_ttft_ms"], s["median_ttft_ms"], s["p99_ttft_ms"]) == (200.0, 200.0, 298.0)
    assert s["mean_itl_ms"] == pytest.approx(80 / 3) and s["median_tpot_ms"] == 25.0
    assert s["mean_e2el_ms"] == 240.0 and s["mean_queue_ms"] == pytest.approx(100 / 3)
    assert s["last_arrival_s"] == 0.8
    assert set(s) >= {"duration", "max_concurrency", "request_rate", "std_ttft_ms", "p99_tpot_ms", "p99_e2el_ms"}


def test_over_saturated_when_completions_fall_behind_the_arrivals_or_the_queue_grows():
    run = {"request_rate": 10.0, "completed": 20, "failed": 0, "last_arrival_s": 2.0, "duration": 2.5}
    # 20 arrived in 2.0 s and were done within 2.5 - 0.5 (the last one's own latency): 10/s, as they came
    assert kept_up_ratio(run, 500.0) == pytest.approx(1.0) and not over_saturated(run, [50.0] * 20, 500.0)
    assert over_saturated({**run, "duration": 3.0}, [50.0] * 20, 500.0)  # 8/s of 10: behind
    assert over_saturated({**run, "completed": 10, "failed": 10}, [50.0] * 10, 500.0)  # refused half
    growing = [50.0] * 10 + [700.0] * 10  # the last quarter waits 14x the first, 650 ms more than a request
    assert queue_grew(growing, 500.0) and over_saturated({**run, "duration": 2.6}, growing, 500.0)  # 0.95
    assert not over_saturated(run, growing, 500.0)  # every request still done in time: a passing stall
    assert not queue_grew([50.0] * 10 + [120.0] * 10, 500.0)  # 2.4x, but 70 ms: noise, not a backlog
    assert not over_saturated({**run, "request_rate": "inf", "duration": 99.0}, growing, 500.0)


# -- against the fake engine -------------------------------------------------------------------------
PREFILL_MS = STEP_MS = 20
TOKENS = 5
SERVICE_MS = PREFILL_MS + (TOKENS - 1) * STEP_MS  # one request alone: 100 ms of sleeps


@pytest.fixture(scope="module")
def turns_url():
    """One engine thread taking turns: it serves one request's tokens at STEP_MS whatever the load."""
    with UvicornServer(create_app(fake_engine(prefill_ms=PREFILL_MS, step_ms=STEP_MS), "thread")) as server:
        yield server.url


def test_arrivals_at_a_known_rate(turns_url):
    rate, n = 20.0, 40
    result = run_load(turns_url, random_requests(n, 4, 2), rate=rate, warmup=1)
    assert result.summary["completed"] == n and result.summary["failed"] == 0
    sent = sorted(r["arrival_ms"] + r["queue_ms"] for r in result.records)
    mean_gap_s = (sent[-1] - sent[0]) / 1000 / (n - 1)
    # 4 sigma of the Poisson mean gap, plus a few ms for the event loop's lateness at either end.
    assert abs(mean_gap_s - 1 / rate) < 4 * (1 / rate) / math.sqrt(n - 1) + 0.01
    assert all(r["queue_ms"] < 50 for r in result.records)  # no cap: nothing waits on the client
    assert all(r["output_tokens"] == 2 for r in result.records)


@pytest.mark.parametrize("interval_ms", [60, 250])
def test_client_queue_grows_as_predicted_from_the_step_time(turns_url, interval_ms):
    """One request in flight at a time (max_concurrency=1), arrivals every interval_ms. Each request
    holds the server for at least SERVICE_MS, so request k waits k * (SERVICE_MS - interval_ms) when the
    interval is shorter (Lindley's recursion from an empty queue) and nothing when it is longer."""
    n = 10
    result = run_load(turns_url, random_requests(n, 4, TOKENS), rate=1000 / interval_ms, burstiness=EVEN,
                      max_concurrency=1, warmup=1)
    queue = [r["queue_ms"] for r in result.records]
    assert min(r["e2el_ms"] for r in result.records) >= SERVICE_MS
    if interval_ms > SERVICE_MS:
        # The overhead per request (HTTP, the engine thread's hand-offs) may eat into the slack of 150 ms.
        assert max(queue) < interval_ms - SERVICE_MS
        return
    slope = np.polyfit(np.arange(n), queue, 1)[0]
    predicted = SERVICE_MS - interval_ms  # 40 ms per request from the sleeps alone
    assert slope >= predicted * 0.95  # the sleeps are a floor
    # Above it only by the overhead per request: once queued, a request is sent when the one before it
    # was read to its end, so the time between sends is the service the client sees; 5 ms of jitter.
    sent = [r["arrival_ms"] + r["queue_ms"] for r in result.records]
    cycle = (sent[-1] - sent[1]) / (n - 2)
    assert slope <= predicted + (cycle - SERVICE_MS) + 5
    assert queue[-1] >= (n - 1) * predicted * 0.95


def test_fixed_concurrency_and_the_openai_protocol(turns_url):
    protocol = openai_protocol(turns_url, chat=True, continuous_usage=True)
    result = run_load(turns_url, random_requests(6, 4, 3), rate=math.inf, max_concurrency=2, protocol=protocol)
    s = result.summary
    assert s["completed"] == 6 and s["max_concurrency"] == 2 and s["total_output_tokens"] == 18
    assert sum(r["queue_ms"] > SERVICE_MS / 2 for r in result.records) >= 3  # 4 of 6 wait for a place


def test_a_429_limit_counts_as_failed_and_warmup_refusal_raises():
    engine = fake_engine(prefill_ms=STEP_MS, step_ms=STEP_MS)
    with UvicornServer(create_app(engine, "batched", limits=ServerLimits(max_concurrent=2))) as server:
        result = run_load(server.url, random_requests(5, 4, TOKENS), rate=math.inf, warmup=0)
        assert (result.summary["completed"], result.summary["failed"], result.summary["failed_429"]) == (2, 3, 3)
        assert all(r["error"]["status"] == 429 for r in result.records if r["error"])
        with pytest.raises(LoadError, match="404"):
            run_load(server.url, random_requests(2, 4, 2), protocol=OpenAIProtocol("no-such-model"))


@pytest.mark.slow
def test_sweep_stops_after_the_server_is_over_saturated(turns_url):
    # Capacity: one request per >= 100 ms of sleeps, under 10/s. 2/s and 5/s keep up; 40/s cannot; 80 never runs.
    done = sweep(turns_url, lambda n: random_requests(n, 4, TOKENS), [80.0, 2.0, 40.0, 5.0], burstiness=EVEN,
                 seconds=1.0, min_requests=8, slo=parse_slo("e2el:300"))
    assert done.rates == [2.0, 5.0, 40.0] and done.saturated == [False, False, True] and done.knee == 5.0
    ttft = [s["median_ttft_ms"] for s in done.summaries]
    assert ttft[2] > 2 * ttft[0]  # the queue shows in the latency past the knee
    assert done.best_goodput_rate == 5.0


BATCH, LONG = 4, 16  # a batch of 4 and answers of 16 tokens


@pytest.fixture(scope="module")
def batched_url():
    engine = fake_engine(prefill_ms=STEP_MS, step_ms=STEP_MS,
                         config=EngineConfig(model="fake", threads=1, max_batch=BATCH))
    with UvicornServer(create_app(engine, "batched")) as server:
        yield server.url


@pytest.mark.slow
def test_the_sweep_finds_the_knee_at_the_capacity_known_by_hand(batched_url):
    # By hand: every forward (a prompt's or a step's) sleeps STEP_MS and makes one token for each of the
    # BATCH sequences it carries; a request needs LONG of them: BATCH / (LONG * step) = 12.5 requests/s
    # with the batch always full. HTTP, the gaps of a closed loop and a busy machine only lower it.
    by_hand = BATCH / (LONG * STEP_MS / 1000)
    requests = lambda n: random_requests(n, 4, LONG)  # noqa: E731
    rps, _ = capacity(batched_url, requests(4 * BATCH), BATCH)
    assert 0.6 * by_hand < rps <= 1.02 * by_hand
    # Evenly spaced arrivals: 40 Poisson arrivals stray from their rate by a sixth, more than the margin here.
    done = sweep(batched_url, requests, concurrency=BATCH, seconds=3.0, burstiness=EVEN)
    assert done.capacity == pytest.approx(rps, rel=0.35)
    assert done.saturated[-1] and done.rates[-1] > by_hand  # it went past the capacity and saw it
    assert done.knee is not None and 0.5 * by_hand <= done.knee <= 1.2 * by_hand
    below = [s["median_ttft_ms"] for rate, s in zip(done.rates, done.summaries) if rate <= done.knee]
    assert max(below) < 4 * min(below) + 2 * STEP_MS  # flat below the knee: no backlog builds there


@pytest.mark.slow
def test_a_capacity_measured_low_still_sweeps_past_the_knee(batched_url, monkeypatch):
    # A closed loop on a busy client can come out at a third of the truth: the fractions of it (up to 1.6x)
    # would then all keep up and no knee would be seen. The sweep must go on rising until one falls behind.
    import labserver.measure.sweep as sweep_module

    by_hand = BATCH / (LONG * STEP_MS / 1000)
    monkeypatch.setattr(sweep_module, "capacity", lambda *a, **k: (0.3 * by_hand, None))
    requests = lambda n: random_requests(n, 4, LONG)  # noqa: E731
    done = sweep(batched_url, requests, concurrency=BATCH, seconds=1.5, min_requests=6, burstiness=EVEN)
    assert len(done.rates) > len(sweep_module.FRACTIONS)  # it went beyond the last fraction...
    assert done.saturated[-1] and done.rates[-1] > by_hand  # ...until it fell behind
    assert done.knee is not None and done.knee <= 1.2 * by_hand


def test_cli_writes_summary_and_requests(turns_url, tmp_path, capsys):
    from labserver.__main__ import main

    summary = main(["load", "--url", turns_url + "/v1", "--endpoint", "chat", "--num-prompts", "4",
                    "--input-len", "4", "--output-len", "3", "--request-rate", "50", "--goodput", "e2el:10000",
                    "--out", str(tmp_path), "--no-progress"])
    assert summary["completed"] == 4 and summary["request_goodput"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["completed"] == 4
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert [json.loads(line)["output_tokens"] for line in lines] == [3] * 4
    assert "Serving Benchmark Result" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="goodput SLO"):
        main(["load", "--url", turns_url, "--goodput", "itl:5", "--no-progress"])


@pytest.mark.model
def test_ignore_eos_fixes_the_output_length_on_the_real_model(default_engine):
    with UvicornServer(create_app(default_engine)) as server:
        protocol = openai_protocol(server.url, continuous_usage=True)
        result = run_load(server.url, random_requests(3, 16, 24), protocol=protocol, max_concurrency=3)
    assert [r["output_tokens"] for r in result.records] == [24] * 3
