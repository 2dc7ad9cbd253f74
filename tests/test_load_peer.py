"""`run_load` against llama.cpp's own `llama-server` (the peer), where it has been built on this machine
(`python -m labserver.measure.peer` builds it into ~/.cache/labserver/peer/; this test never builds):
the figures our client records agree with the `timings` llama-server reports for each request, by what
its timers span (`bench_peer.timings_agreement` derives the bounds).

Slack per hand-off (bench-peer's DELIVERY_MS, scaled by the load): a hand-off between threads waits at
most about DELIVERY_MS when a core is free; when more threads are runnable than there are cores, a
runnable thread waits for about load / cores time slices, so DELIVERY_MS * max(1, load / cores). Every
request must be causal (no token before its prompt was processed, none after the server's last); the
median of first-to-last token minus `predicted_ms` must lie within the bounds: a single request may meet
a longer preemption on a shared machine (the printed lists show each one).
"""
import os

import pytest

from labserver.config import EngineConfig
from labserver.engine.loading import model_folder
from labserver.measure.bench_peer import DELIVERY_MS, timings_agreement
from labserver.measure.datasets import client_tokenizer, random_requests
from labserver.measure.load import run_load
from labserver.measure.protocols import LLAMA_CPP
from tests.peer_server import llama_server

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]
INPUT, OUTPUT, N = 48, 24, 6


@pytest.fixture(scope="module")
def server():
    with llama_server(parallel=1) as running:
        yield running


def test_load_figures_agree_with_llama_servers_timings(server):
    tokenizer = client_tokenizer(model_folder(EngineConfig()))
    requests = random_requests(N, INPUT, OUTPUT, tokenizer=tokenizer, seed=7)
    # No prefix cache: the warm-up sends the first prompt once more, and a cached prompt is not a prefill.
    result = run_load(server.url, requests, protocol=LLAMA_CPP, max_concurrency=1, warmup=1,
                      extra_body={"cache_prompt": False})
    assert result.summary["completed"] == N and result.summary["failed"] == 0
    assert [r["output_tokens"] for r in result.records] == [OUTPUT] * N  # ignore_eos: the asked length
    slack = DELIVERY_MS * max(1.0, os.getloadavg()[0] / os.cpu_count())
    agreement = timings_agreement(result.traces, slack)
    print(f"\nslack {slack:.1f} ms; TTFT - prompt_ms, E2E - prompt_ms - predicted_ms, (E2E - TTFT) - predicted_ms:",
          [(round(t.ttft_ms - t.timings["prompt_ms"], 1),
            round(t.e2e_ms - t.timings["prompt_ms"] - t.timings["predicted_ms"], 1),
            round(t.e2e_ms - t.ttft_ms - t.timings["predicted_ms"], 1)) for t in result.traces], agreement)
    assert agreement["requests"] == N and agreement["causal"] == N, agreement
    low, high = agreement["span_bounds_ms"]
    assert low <= agreement["p50_span_minus_predicted_ms"] <= high, agreement
    print(f"llama-server: {result.summary['output_throughput']:.1f} output tokens/s, "
          f"median TTFT {result.summary['median_ttft_ms']:.1f} ms, TPOT {result.summary['median_tpot_ms']:.2f} ms")
