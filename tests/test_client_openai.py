"""The client measures any OpenAI-compatible server by URL: checked against our own /v1 routes."""

import pytest

from labserver import fake_engine, create_app
from labserver.measure.client import blocking_generate, run_concurrent, stream_generate
from labserver.measure.protocols import OpenAIProtocol, openai_protocol
from labserver.measure.stats import summarize
from labserver.serve.background import UvicornServer


@pytest.fixture(scope="module")
def fake_url():
    with UvicornServer(create_app(fake_engine(prefill_ms=40, step_ms=10))) as server:
        yield server.url


@pytest.mark.parametrize("chat", [False, True])
def test_openai_stream_trace(fake_url, chat):
    protocol = openai_protocol(fake_url, chat=chat)
    assert protocol.model == "fake" and protocol.path.endswith("chat/completions" if chat else "/completions")
    trace = stream_generate(fake_url, "a b c", max_tokens=5, protocol=protocol)
    assert trace.ok, trace.error
    assert trace.text == " one two three four five" and trace.n_tokens == 5
    assert trace.usage["completion_tokens"] == 5 and trace.finish_reason == "length"
    # The fake engine sleeps 40 ms before its first token: TTFT can't be shorter, gaps about 10 ms.
    assert trace.ttft_ms >= 40 and len(trace.itl_ms) == 4


@pytest.mark.parametrize("chat", [False, True])
def test_openai_blocking_trace(fake_url, chat):
    trace = blocking_generate(fake_url, "a b c", max_tokens=3, protocol=OpenAIProtocol("fake", chat=chat))
    assert trace.ok and trace.text == " one two three" and trace.ttft_ms == trace.e2e_ms


def test_openai_errors_and_concurrency(fake_url):
    bad = stream_generate(fake_url, "x", max_tokens=3, protocol=OpenAIProtocol("no-such-model"))
    assert not bad.ok and bad.error["status"] == 404
    traces = run_concurrent(fake_url, 3, max_tokens=4, protocol=OpenAIProtocol("fake"))
    assert [t.n_tokens for t in traces] == [4, 4, 4]
    assert summarize(traces)["p50_ttft_ms"] > 0


@pytest.mark.model
def test_openai_protocol_matches_generate_on_the_real_model(default_engine):
    with UvicornServer(create_app(default_engine)) as server:
        ours = stream_generate(server.url, "Name a color.", max_tokens=12, temperature=0)
        theirs = stream_generate(server.url, "Name a color.", max_tokens=12, temperature=0,
                                 protocol=openai_protocol(server.url, chat=True))
    assert ours.ok and theirs.ok
    assert theirs.text == ours.text and theirs.usage["completion_tokens"] == ours.n_tokens


@pytest.mark.parametrize("flags", [["--openai"], ["--openai-chat"], []])
def test_bench_measures_a_running_server_by_url(fake_url, tmp_path, flags):
    from labserver.measure.bench import main

    out = tmp_path / "url.json"
    result = main(["--url", fake_url, *flags, "--max-tokens", "4", "--runs", "1", "--concurrency", "2",
                   "--out", str(out)])
    assert out.exists() and result["stream"]["p50_ttft_ms"] >= 40
    assert result["stream_repeated"]["completed"] == 1
    assert result["concurrent"]["p50_ttft_ms"] >= 40
    assert result["health"]["n"] >= 1


def test_fresh_prompts_defeat_a_prefix_cache(fake_url):
    """Each measured request of "stream" opens differently (a prefix cache cannot answer it from memory);
    "stream_repeated" sends the very prompt each time."""
    from labserver.measure.bench_backends import sequential

    sent = []

    def record(url, prompt, max_tokens, temperature, client=None):
        sent.append(prompt)
        return stream_generate(url, prompt, max_tokens, temperature, client=client)

    sequential(record, fake_url, "Tell me a story.", 2, 3, fresh=True)
    warmup, *measured = sent
    assert warmup == "Tell me a story." and len(set(measured)) == 3
    assert all(p.endswith("Tell me a story.") and not p.startswith("Tell") for p in measured)
    sent.clear()
    sequential(record, fake_url, "Tell me a story.", 2, 3)
    assert set(sent) == {"Tell me a story."}
