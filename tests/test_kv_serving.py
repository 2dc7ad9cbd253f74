"""The KV cache while serving: a cached prefix, a prompt cut into chunks, and more streams than the memory
holds at once, end to end; what /health and /metrics say about it.

The fake engine's pool is bookkeeping only, so memory pressure is hand-checkable; the real model shows the
cache changes no token (greedy), in one process and across the engine-process boundary.
"""

import asyncio

import httpx
import pytest

from labserver import Engine, EngineConfig, SamplingParams, fake_engine
from labserver.engine.scheduler import Batched
from labserver.serve.app import create_app
from labserver.serve.backends import ThreadBackend
from labserver.serve.limits import ServerLimits

SYSTEM = ("You are a patient teacher of computer science. Answer in one short paragraph, with a concrete "
          "example, and never use jargon without explaining it. ") * 4
QUESTIONS = ["What is a hash table?", "Why do CPUs have caches?", "What does a compiler do?"]


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def post_all(app, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def test_more_streams_than_the_memory_holds_all_finish_in_order_none_lost():
    """16 streams of 24-token prompts and 40 tokens each need 16 x 4 blocks of 16; the pool has 20. New
    requests wait for blocks, running ones that cannot grow are preempted and computed again: every one
    still gets its whole answer, once, in order."""
    engine = fake_engine(prefill_ms=2, step_ms=1, kv_blocks=20,
                         config=EngineConfig(model="fake", threads=1, block_size=16, chat_template=False))
    app = create_app(engine, limits=ServerLimits(max_concurrent=16))
    prompt = " ".join(["two"] * 24)
    bodies = [{"prompt": prompt, "max_tokens": 40, "temperature": 0} for _ in range(16)]

    async def run():
        responses = await post_all(app, "/generate", bodies)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return responses, (await client.get("/health")).json()

    responses, health = asyncio.run(run())
    expected = [i % 8 for i in range(40)]  # the fake's words: one two three ... eight, again
    assert [r.status_code for r in responses] == [200] * 16
    assert all([t["token_id"] for t in r.json()["tokens"]] == expected for r in responses)
    kv = health["engine"]["kv"]
    assert kv["preemptions"] > 0 and kv["blocks_used"] == 0 and health["running"] == 0


def test_a_prompt_longer_than_the_whole_pool_is_a_400():
    engine = fake_engine(0, 0, kv_blocks=4, config=EngineConfig(model="fake", threads=1, block_size=16))
    responses = asyncio.run(post_all(create_app(engine), "/generate", [{"prompt": " ".join(["one"] * 80)}]))
    assert responses[0].status_code == 400 and "limit is 63" in responses[0].json()["detail"]


def test_health_and_metrics_report_the_kv_cache_and_the_prefix_hits():
    engine = fake_engine(0, 0, config=EngineConfig(model="fake", threads=1, block_size=4))
    app = create_app(engine)
    body = {"messages": [{"role": "user", "content": " ".join(["three"] * 10)}], "max_tokens": 2}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            usages = [(await client.post("/v1/chat/completions", json=body)).json()["usage"] for _ in range(2)]
            return usages, (await client.get("/health")).json(), (await client.get("/metrics")).text

    usages, health, metrics = asyncio.run(run())
    # 10 prompt tokens in blocks of 4: the second request finds 9, two named blocks and a row of the first
    # request's last block (written in part: prompt tokens 9 and 10, and its first answer token), not 10:
    # the last prompt token is always computed.
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 9]
    assert health["engine"]["kv"]["prefix_cache_hits"] == 9 and health["engine"]["kv"]["prefix_cache_queries"] == 20
    assert 'labserver:prefix_cache_hits_total{model_name="fake"} 9.0' in metrics
    assert "labserver:kv_cache_usage_perc" in metrics


@pytest.mark.model
def test_a_cached_prefix_and_chunks_give_the_same_greedy_tokens_as_none(default_engine):
    no_cache = Engine(default_engine.source, default_engine.tokenizer, EngineConfig(threads=2, prefix_caching=False))
    params = SamplingParams(max_tokens=16, temperature=0)
    reference = [no_cache.generate(no_cache.encode_messages(chat(q)), params) for q in QUESTIONS]
    hits = []
    for q, ref in zip(QUESTIONS, reference):
        seq = default_engine.begin(default_engine.encode_messages(chat(q)), params)
        out = default_engine.generate(seq.ids, params)
        assert out.token_ids == ref.token_ids
        hits.append(out.finish.usage["prompt_tokens_details"]["cached_tokens"])
    # Reused to the token (the block after the whole ones copied from the one that agrees longest): all
    # the tokens the chats have in common with the first question's, the system prompt and more.
    prompts = [default_engine.encode_messages(chat(q)) for q in QUESTIONS]
    common = [max(next(i for i, (a, b) in enumerate(zip(p, q)) if a != b) for q in prompts[:k])
              for k, p in enumerate(prompts) if k]
    system_tokens = len(default_engine.encode_messages([{"role": "system", "content": SYSTEM}]))
    assert hits[1:] == common and min(common) >= system_tokens - default_engine.kv.block_size, (hits, common)
    assert any(c % default_engine.kv.block_size for c in common)  # a prefix that ends inside a block
    assert all(r.finish.usage["prompt_tokens_details"]["cached_tokens"] == 0 for r in reference)
    # Prefilled in chunks of 32 tokens inside other streams' forwards: the same tokens again.
    backend = ThreadBackend(no_cache, Batched(max_batch=4, max_num_batched_tokens=32))
    try:
        async def all_streams():
            async def one(q):
                return [e.token_id async for e in backend.stream(no_cache.encode_messages(chat(q)), params)
                        if hasattr(e, "token_id")]
            return await asyncio.gather(*(one(q) for q in QUESTIONS))
        assert asyncio.run(all_streams()) == [r.token_ids for r in reference]
    finally:
        backend.close()


@pytest.mark.model
@pytest.mark.timeout(300)
def test_the_prefix_cache_lives_in_the_engine_process_and_changes_no_token(default_engine):
    from labserver.serve.background import start_fastapi, stop

    params = SamplingParams(max_tokens=12, temperature=0)
    expected = [default_engine.generate(default_engine.encode_messages(chat(q)), params).text for q in QUESTIONS[:2]]
    server = start_fastapi(default_engine, backend="process", name="test-kv-process")
    try:
        got = []
        for q in QUESTIONS[:2]:
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                           json={"messages": chat(q), "max_tokens": 12, "temperature": 0})
            got.append(r.json())
        health = httpx.get(server.url + "/health").json()
    finally:
        stop("test-kv-process")
    assert [g["choices"][0]["message"]["content"] for g in got] == expected
    cached = [g["usage"]["prompt_tokens_details"]["cached_tokens"] for g in got]
    assert cached[0] == 0 and cached[1] > 0 and health["engine"]["kv"]["prefix_cache_hits"] == cached[1]
