"""The lab against a shared server (`LABSERVER_URL`): the helpers notebooks 2, 5, 6 and 8 measure with
take the shared server's OpenAI-compatible path when the variable is set, and ours otherwise.

Fast tests play the shared server with a second labserver on the fake engine (it serves /v1 too): what
proves the URL path was taken is that its traces carry no `step_ms` (the OpenAI format has none) and that
a skip line is printed where a notebook needs our engine. The last test measures llama.cpp's
`llama-server` as the stand-in for a class's vLLM box, where it has been built here (never built by the
test): TTFT and ITL, a small load, and prefix reuse.
"""

import pytest

from labserver.engine.fake import fake_engine
from labserver.lab import concurrency, kv_cache, load, streaming
from labserver.lab.target import ENV, SKIPPED, Target, external_url, target
from labserver.measure.protocols import LABSERVER, OpenAIProtocol
from labserver.serve.background import start_fastapi, stop
from tests.peer_server import llama_server

STEP_MS = 10.0


@pytest.fixture(scope="module")
def own():
    server = start_fastapi(fake_engine(prefill_ms=20, step_ms=STEP_MS), name="target-own")
    yield server
    stop("target-own")


@pytest.fixture(scope="module")
def shared_url():
    """Another server, reached only by its URL, as a class reaches its GPU box."""
    server = start_fastapi(fake_engine(prefill_ms=20, step_ms=STEP_MS), name="target-shared")
    yield server.url + "/v1"  # how OpenAI clients name a server
    stop("target-shared")


def test_without_the_variable_the_notebooks_measure_our_server_with_its_step_times(own, capsys):
    server = target(own, environ={})
    assert server == Target(own.url) and server.protocol is LABSERVER and not server.external
    trace = server.stream("one two three", 4)
    assert trace.ok and trace.n_tokens == 4 and len(trace.decode_step_ms) == 3
    assert server.has_engine("anything") and capsys.readouterr().out == ""
    with pytest.raises(ValueError, match=ENV):
        target(None, environ={})


def test_with_the_variable_the_notebooks_measure_the_shared_server_by_url(own, shared_url, capsys):
    server = target(own, environ={ENV: shared_url})
    assert server.external and server.url == external_url({ENV: shared_url}) != own.url
    assert isinstance(server.protocol, OpenAIProtocol) and server.model  # discovered at GET /v1/models
    trace = server.stream("one two three", 6)
    assert trace.ok and trace.output_tokens == 6 and trace.ttft_ms > 0 and len(trace.itl_ms) >= 1
    assert trace.decode_step_ms == [] and trace.prefill_time_ms is None  # the OpenAI format: client times only
    assert not server.has_engine("the engine's step_ms")
    assert capsys.readouterr().out == f"{SKIPPED}: the engine's step_ms\n"
    assert str(server).startswith("the shared server at") and server.model in str(server)


def test_notebook_2s_code_path_against_a_shared_server(shared_url, monkeypatch, capsys):
    """What notebook 2's cells call, with LABSERVER_URL set: the raw stream, traces, the comparison."""
    monkeypatch.setenv(ENV, shared_url)
    server = target(None)  # the variable wins: no server of ours is needed
    lines = streaming.raw_sse(server, "one two", max_tokens=3)
    shown = capsys.readouterr().out
    assert "text/event-stream" in shown and '"choices"' in shown and "data: [DONE]" in [line for _, line in lines]
    streamed = [server.stream("one two", 8) for _ in range(2)]
    blocked = [server.blocking("one two", 8) for _ in range(2)]
    assert all(t.ok for t in streamed + blocked) and streamed[0].text == blocked[0].text
    # Without server timings the formula reads the streams' own TTFT and TPOT: about 1 + 7 * 10 / 20 here.
    gain = blocked[0].ttft_ms / streamed[0].ttft_ms
    predicted = streaming.predicted_gain(streamed, blocked, 8)
    assert 2 < predicted < 8 and predicted / 2 < gain < 2 * predicted
    assert "TTFT p50 ms" in streaming.compare_table({"streaming": streamed, "blocking": blocked})


def test_notebooks_5_and_6_measure_the_shared_server(shared_url):
    server = target(None, environ={ENV: shared_url})
    loads = concurrency.sweep(server, ns=(1, 2), max_tokens=5, interval_ms=10)
    assert [len(x.traces) for x in loads] == [1, 2] and all(t.ok for x in loads for t in x.traces)
    assert loads[-1].row()["step p50 ms"] is None and loads[-1].tokens_per_s > 0  # no server steps there
    assert "N" in concurrency.sweep_table(loads)
    alone = load.measure_alone(server)
    assert alone.ttft_ms >= 20 and alone.tpot_ms >= STEP_MS * 0.9


def test_notebook_8s_prefix_demo_runs_on_the_shared_servers_chat_endpoint(shared_url):
    server = target(None, environ={ENV: shared_url})
    runs = kv_cache.prefix_demo(server, "you are a helpful system " * 8, answer_tokens=4)
    assert len(runs["shared"]) == len(kv_cache.QUESTIONS) and len(runs["chat"]) == len(kv_cache.CHAT)
    assert all(t.ok and t.usage["prompt_tokens"] > 0 for part in runs.values() for t in part)


# -- llama-server as the shared server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_llama_server():
    with llama_server(parallel=2, ctx=4096) as running:
        yield running


@pytest.mark.model
@pytest.mark.timeout(600)
def test_the_lab_measures_llama_server_as_a_shared_server(shared_llama_server, capsys):
    server = target(None, environ={ENV: shared_llama_server.url})
    assert server.external and server.model
    server.stream("Hello", 2)  # warm-up
    trace = server.stream("Write a short story about a robot who learns to paint.", 16)
    assert trace.ok and trace.output_tokens == 16 and trace.ttft_ms > 0 and len(trace.itl_ms) >= 8
    assert max(trace.itl_ms) < trace.e2e_ms and trace.decode_step_ms == []

    result = load.measure_alone(server)  # notebook 6's first measurement: a small closed loop
    assert result.ttft_ms > 0 and result.tpot_ms > 0 and result.e2el_ms > result.ttft_ms
    loads = concurrency.sweep(server, ns=(2,), max_tokens=8, interval_ms=20)
    assert all(t.ok for t in loads[0].traces) and loads[0].probe.summary()["p50_ms"] is not None

    # Prefix reuse: llama-server keeps a slot's prompt (cache_prompt), so a request that repeats a long
    # system prompt computes only what follows it. The first request's TTFT holds the whole prefill; a
    # later one must come in under half of it (the prompt is long enough that its prefill dominates).
    system = "You are a patient teacher of computer science; answer briefly with one example. " * 32
    runs = kv_cache.prefix_demo(server, system, answer_tokens=4)
    assert runs["shared"][0].usage["prompt_tokens"] > 400
    first, later, spread = kv_cache.prefix_reuse(runs["shared"])  # what notebook 8 claims with
    assert later + spread < first and later < first / 2, [t.ttft_ms for t in runs["shared"]]
