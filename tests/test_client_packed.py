"""The client against an OpenAI-compatible server that packs several tokens into one chunk, as vLLM and
SGLang may: the token count comes from ``usage`` (not from counting chunks), ITL stays the gap between
chunks, TTFT is the first chunk with content (reasoning content counts), and a request that ends early is
not a failure.

The server here is a few lines of Starlette with fixed sleeps, so every figure is hand-computable:
PACK tokens per chunk, CHUNK_MS between chunks, so TPOT = CHUNK_MS / PACK.
"""
import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from labserver.measure.client import stream_generate
from labserver.measure.protocols import OpenAIProtocol
from labserver.measure.stats import aggregate_tokens_per_s, summarize
from labserver.serve.background import UvicornServer

PACK, CHUNK_MS = 4, 40
SEEN: list[dict] = []


def _chunk(delta: dict | None, usage: dict | None = None, finish: str | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return f"data: {json.dumps({'choices': choices, 'usage': usage})}\n\n".encode()


async def chat(request):
    body = await request.json()
    SEEN.append(body)
    options = body.get("stream_options") or {}
    if options.get("continuous_usage_stats") and request.query_params.get("strict"):
        return JSONResponse({"error": {"message": "unknown field continuous_usage_stats"}}, status_code=400)
    # Without ignore_eos the "model" stops after one chunk: a short answer, not an error.
    n = body["max_tokens"] if body.get("ignore_eos") else PACK
    reasoning = request.query_params.get("reasoning")

    async def events():
        yield _chunk({"role": "assistant", "content": ""})  # no content: not the first token
        made = 0
        while made < n:
            await asyncio.sleep(CHUNK_MS / 1000)
            k = min(PACK, n - made)
            made += k
            key = "reasoning_content" if reasoning and made == k else "content"
            continuous = options.get("continuous_usage_stats") and not request.query_params.get("nousage")
            usage = {"prompt_tokens": 3, "completion_tokens": made} if continuous else None
            yield _chunk({key: " t" * k}, usage, "length" if made == n else None)
        if options.get("include_usage") and not request.query_params.get("nousage"):
            yield _chunk(None, {"prompt_tokens": 3, "completion_tokens": made, "total_tokens": 3 + made})
        yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def url():
    with UvicornServer(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as server:
        yield server.url


def test_tokens_come_from_usage_not_from_chunks(url):
    t = stream_generate(url, "hi", 12, 0.0, protocol=OpenAIProtocol("m", chat=True), ignore_eos=True)
    assert SEEN[-1]["stream_options"] == {"include_usage": True} and SEEN[-1]["ignore_eos"] is True
    assert t.ok and t.n_tokens == 3 and t.output_tokens == 12  # 3 chunks of 4 tokens
    assert len(t.itl_ms) == 2 and all(g >= CHUNK_MS * 0.9 for g in t.itl_ms)  # gaps between chunks
    # TPOT = (E2E - TTFT) / (tokens - 1) = 2 gaps of ~CHUNK_MS over 11 tokens, not over 2 chunks.
    assert t.tpot_ms == pytest.approx(sum(t.itl_ms) / 11)
    assert t.ttft_ms >= CHUNK_MS * 0.9  # the role chunk before it carried no content
    assert summarize([t])["total_output_tokens"] == 12
    assert aggregate_tokens_per_s([t]) == pytest.approx(12 / (t.e2e_ms / 1000))


def test_continuous_usage_on_every_chunk(url):
    protocol = OpenAIProtocol("m", chat=True, continuous_usage=True)
    t = stream_generate(url, "hi", 10, 0.0, protocol=protocol, ignore_eos=True)
    assert SEEN[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert t.ok and t.n_tokens == 3 and t.output_tokens == 10  # chunks of 4, 4, 2
    # A server that refuses the field fails the request; the same protocol without it succeeds.
    refused = stream_generate(url + "/v1/chat/completions?strict=1", "hi", 10, 0.0, protocol=protocol)
    assert refused.error["status"] == 400
    fine = stream_generate(url + "/v1/chat/completions?strict=1", "hi", 10, 0.0,
                           protocol=protocol.without_continuous_usage(), ignore_eos=True)
    assert fine.ok and fine.output_tokens == 10


def test_reasoning_content_is_the_first_token(url):
    t = stream_generate(url + "/v1/chat/completions?reasoning=1", "hi", 8, 0.0,
                        protocol=OpenAIProtocol("m", chat=True), ignore_eos=True)
    assert t.ok and t.n_tokens == 2 and t.ttft_ms < 2 * CHUNK_MS  # the first chunk, not the second


def test_ending_early_is_not_a_failure(url):
    short = stream_generate(url, "hi", 12, 0.0, protocol=OpenAIProtocol("m", chat=True))  # no ignore_eos
    assert short.ok and short.output_tokens == PACK
    s = summarize([short])
    assert (s["completed"], s["failed"]) == (1, 0)


def test_without_usage_the_caller_counts_tokens():
    from labserver.measure.trace import Trace

    t = Trace(arrival_ms=[10.0, 50.0], tokens=[" a b", " c"])
    assert t.output_tokens == 2  # chunks, the last resort
    t.counted_tokens = 3  # a tokenizer's count of " a b c"
    assert (t.output_tokens, t.tpot_ms) == (3, 20.0)


def test_load_counts_tokens_with_a_tokenizer_when_the_server_sends_no_usage(url):
    from labserver.measure.datasets import random_requests
    from labserver.measure.load import run_load

    specs = random_requests(2, 3, 10)
    protocol = OpenAIProtocol("m", chat=True)
    chunks = run_load(url + "/v1/chat/completions?nousage=1", specs, protocol=protocol)
    assert [r["output_tokens"] for r in chunks.records] == [3, 3]  # chunks of 4, 4, 2: all it can count
    counted = run_load(url + "/v1/chat/completions?nousage=1", specs, protocol=protocol,
                       count_tokens=lambda text: len(text.split()))  # " t" per token: one word each
    assert [r["output_tokens"] for r in counted.records] == [10, 10]
    assert counted.summary["total_output_tokens"] == 20
