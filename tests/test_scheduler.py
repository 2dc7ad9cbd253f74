"""The scheduling policies: what each schedules (by hand, no thread), and the batched engine thread on a
model: the same tokens as one sequence alone, joins and leaves between steps, limits.

Tests marked ``model`` batch SmolLM2-135M on the lean float32 runner; the others use the tiny random llama
or no model at all.
"""

import asyncio
import threading
from types import SimpleNamespace as NS

import pytest

from labserver import Engine, EngineConfig, Finish, SamplingParams, TokenEvent
from labserver.serve.backends import ThreadBackend
from labserver.engine.scheduler import Batched, TurnTaking

GREEDY = SamplingParams(max_tokens=16, temperature=0)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain recursion in one sentence."]


async def gather_streams(scheduler, prompts, params):
    async def one(prompt):
        return [item async for item in scheduler.stream(prompt, params)]
    return await asyncio.gather(*(one(p) for p in prompts))


def run(scheduler, prompts, params=GREEDY, timeout=300):
    return asyncio.run(asyncio.wait_for(gather_streams(scheduler, prompts, params), timeout))


@pytest.fixture
def scheduler_of():
    made = []

    def make(engine):
        made.append(ThreadBackend(engine, Batched(max_batch=engine.config.max_batch)))
        return made[-1]
    yield make
    for s in made:
        s.close()


@pytest.mark.model
@pytest.mark.timeout(300)
def test_batched_greedy_equals_each_sequence_alone(default_engine, scheduler_of):
    alone = [default_engine.generate(p, GREEDY) for p in PROMPTS]
    streams = run(scheduler_of(default_engine), PROMPTS)
    for ref, items in zip(alone, streams):
        events, finish = items[:-1], items[-1]
        assert [e.token_id for e in events] == ref.token_ids
        assert "".join(e.token for e in events) == ref.text
        assert isinstance(finish, Finish) and finish.finish_reason == ref.finish.finish_reason
    # They really shared forwards: some decode step carried all four sequences.
    assert max(e.batch or 0 for items in streams for e in items[:-1]) == len(PROMPTS)
    assert default_engine.running == 0 and default_engine.runner.free_slots == default_engine.config.max_batch


@pytest.mark.model
@pytest.mark.timeout(300)
def test_step_events_say_what_the_step_did(default_engine, scheduler_of):
    streams = run(scheduler_of(default_engine), PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0))
    firsts = [items[0] for items in streams]
    for items in streams:
        first, decodes = items[0], items[1:-1]
        # Prefilled alone (no batch), or together with the other prompt if it had arrived by then.
        assert first.prefill_time_ms is not None and first.batch in (1, 2)
        assert ("batch" in first.to_dict()) == (first.batch is not None)
        assert all(e.batch in (1, 2) and e.step_ms > 0 for e in decodes)
        assert "batch" in decodes[0].to_dict()
    if firsts[0].batch == 2:  # one forward for both: the same time
        assert firsts[0].prefill_time_ms == firsts[1].prefill_time_ms and firsts[1].batch == 2


@pytest.mark.model
def test_prompts_prefilled_together_equal_each_prefilled_alone(default_engine):
    params = SamplingParams(max_tokens=4, temperature=0)
    alone = [default_engine.generate(p, params).token_ids[0] for p in PROMPTS]
    seqs = [default_engine.begin(p, params) for p in PROMPTS]
    try:
        events = default_engine.prefill_steps(seqs)
    finally:
        for s in seqs:
            default_engine.end(s)
    assert [e.token_id for e in events] == alone
    assert {e.batch for e in events} == {len(PROMPTS)} and len({e.prefill_time_ms for e in events}) == 1
    assert default_engine.running == 0


def engine_of(kv_blocks: int | None = None, block_size: int = 4, **config) -> Engine:
    """The real engine on the fake runner (no sleeps), with a KV pool of ``kv_blocks`` blocks."""
    from labserver import fake_engine

    return fake_engine(0, 0, config=EngineConfig(model="fake", threads=1, block_size=block_size, **config),
                       kv_blocks=kv_blocks)


def request(engine: Engine, n_prompt: int, max_tokens: int = 50, first: int = 0):
    """What a policy schedules: a request whose sequence has a prompt of ``n_prompt`` words."""
    words = ["two", "three", "four", "five", "six", "seven", "eight", "one"]
    prompt = " ".join(words[(first + i) % 8] for i in range(n_prompt))
    return NS(seq=engine.begin(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)), held=False)


def run_step(engine: Engine, policy) -> list[tuple[int, int]]:
    """Schedule and run one forward; what it fed, as (request number, tokens) pairs."""
    step = policy.schedule(engine)
    if step is None:
        return []
    engine.step([(req.seq, n) for req, n in step.work], batched=policy.batched)
    return [(policy.number[id(req)], n) for req, n in step.work]


def numbered(policy, reqs):
    policy.number = {id(r): i for i, r in enumerate(reqs)}
    for req in reqs:
        policy.add(req)
    return policy


def test_batched_feeds_decodes_first_then_chunks_of_a_long_prompt_within_the_budget():
    engine = engine_of(max_num_batched_tokens=8, max_batch=4)
    reqs = [request(engine, 3), request(engine, 2), request(engine, 20)]
    policy = numbered(Batched.of(engine.config), reqs)
    assert run_step(engine, policy) == [(0, 3), (1, 2), (2, 3)]  # newcomers in order, the budget's rest
    # From now on the two streams get their token in every forward; the long prompt the rest: 6 a forward.
    assert run_step(engine, policy) == [(0, 1), (1, 1), (2, 6)]
    assert run_step(engine, policy) == [(0, 1), (1, 1), (2, 6)]
    assert run_step(engine, policy) == [(0, 1), (1, 1), (2, 5)]  # its last chunk: its first token
    assert run_step(engine, policy) == [(0, 1), (1, 1), (2, 1)]
    assert [len(r.seq.tokens) - len(r.seq.ids) for r in reqs] == [5, 5, 2]
    assert reqs[2].seq.step_ms[0] >= 0 and engine.running == 3


def test_batched_admits_by_memory_first_come_first_served():
    engine = engine_of(kv_blocks=6, block_size=4)  # 24 tokens of K/V
    reqs = [request(engine, 10, first=0), request(engine, 10, first=1), request(engine, 1, first=2)]
    policy = numbered(Batched.of(engine.config), reqs)
    # 3 + 3 blocks: both prompts fit; the third (1 block) must wait, and nobody overtakes it later.
    assert run_step(engine, policy) == [(0, 10), (1, 10)]
    assert not reqs[2].seq.running and engine.kv.num_free_blocks == 0
    engine.end(reqs[0].seq), policy.remove(reqs[0])
    assert run_step(engine, policy)[-1] == (2, 1)  # admitted once blocks came back


def test_a_stream_that_cannot_grow_preempts_the_latest_arrival_which_is_recomputed():
    engine = engine_of(kv_blocks=5, block_size=4, max_num_batched_tokens=64)
    reqs = [request(engine, 8, max_tokens=6, first=0), request(engine, 8, max_tokens=6, first=3)]
    policy = numbered(Batched.of(engine.config), reqs)
    run_step(engine, policy)  # 2 + 2 blocks; one free
    fed = [run_step(engine, policy) for _ in range(3)]
    # The first one needs a third block and takes the free one. Then the second needs one: none left, so
    # the latest arrival, itself, gives its blocks back; the first goes on and the second waits (its
    # full blocks stay named until someone needs them).
    assert fed[0] == [(0, 1)] and reqs[1].seq.running is False and reqs[1].seq.computed == 0
    assert fed[1] == fed[2] == [(0, 1)]
    outputs = {i: r.seq.tokens[len(r.seq.ids):] for i, r in enumerate(reqs)}
    resumed = []
    while any(not r.seq.finished for r in reqs):
        for req in [r for r in policy if r.seq.finished]:
            engine.end(req.seq), policy.remove(req)
        fed_now = run_step(engine, policy)
        resumed += [n for i, n in fed_now if i == 1 and not resumed]
    # The first one's fourth block evicted the second's tail block (tails go first); its first block was
    # still cached, so it fed 9 - 4 tokens again, not 9. (`cached` is what its first admission found.)
    assert resumed == [5] and reqs[1].seq.cached == 0
    alone = [engine_of().generate(" ".join(["x"] * 8), SamplingParams(max_tokens=6)).token_ids] * 2
    assert [r.seq.tokens[len(r.seq.ids):] for r in reqs] == alone  # nothing lost, nothing repeated
    assert all(outputs[i] == alone[i][:len(outputs[i])] for i in outputs)


def test_a_cached_prefix_is_not_fed_again():
    engine = engine_of(block_size=4)
    first, second = request(engine, 13), request(engine, 13)
    assert engine.generate_stream is not None
    policy = numbered(Batched.of(engine.config), [first])
    run_step(engine, policy)
    assert first.seq.cached == 0
    policy = numbered(Batched.of(engine.config), [second])
    assert run_step(engine, policy) == [(0, 1)]  # 12 of 13 from the cache: the last token is always fed
    assert second.seq.cached == 12 and second.seq.finish().usage["prompt_tokens_details"] == {"cached_tokens": 12}
    assert engine.kv.stats.hits == 12


def test_turn_taking_gives_everyone_a_step_in_turn():
    engine = engine_of()
    a, b, c = (request(engine, n) for n in (3, 2, 1))
    policy = numbered(TurnTaking.of(engine.config), [a, b, c])
    assert [run_step(engine, policy) for _ in range(3)] == [[(0, 3)], [(1, 2)], [(2, 1)]]  # whole prompts
    assert [run_step(engine, policy) for _ in range(4)] == [[(0, 1)], [(1, 1)], [(2, 1)], [(0, 1)]]
    late = request(engine, 4, first=4)  # its own words: no prefix of a's cached block to reuse
    policy.number[id(late)] = 3
    policy.add(late)
    assert [run_step(engine, policy) for _ in range(4)] == [[(1, 1)], [(2, 1)], [(0, 1)], [(3, 4)]]


@pytest.mark.timeout(240)
def test_a_late_request_joins_and_a_cancelled_one_leaves(tiny_engine, scheduler_of):
    scheduler = scheduler_of(tiny_engine)
    long = SamplingParams(max_tokens=100, temperature=0)

    async def scenario():
        seen = {"a": [], "b": []}

        async def read(name, prompt, params, stop_after=None):
            gen = scheduler.stream(prompt, params)
            async for item in gen:
                seen[name].append(item)
                if stop_after and len(seen[name]) == stop_after:
                    await gen.aclose()  # what a client disconnect does
                    break

        a = asyncio.create_task(read("a", "one two three", long))
        while len(seen["a"]) < 5:
            await asyncio.sleep(0.001)
        await read("b", "four five", long, stop_after=10)
        await a
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 110))
    a_batches = [e.batch for e in seen["a"] if isinstance(e, TokenEvent) and e.batch]
    assert a_batches[0] == 1 and 2 in a_batches  # alone first, then b joined its steps
    assert a_batches[-1] == 1  # b left at once when it was cancelled; a ran on alone
    assert isinstance(seen["a"][-1], Finish) and seen["a"][-1].usage["completion_tokens"] == 100
    assert tiny_engine.running == 0 and tiny_engine.runner.free_slots == tiny_engine.config.max_batch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["batched", "thread"])
def test_requests_wait_for_a_free_slot(tiny_engine, kind):
    from labserver import make_backend

    engine = Engine(tiny_engine.model, tiny_engine.tokenizer, EngineConfig(model="tiny-random", max_batch=2))
    backend = make_backend(engine, kind)
    try:
        streams = run(backend, ["a", "b c", "d e f", "g", "h i"], SamplingParams(max_tokens=6, temperature=0))
    finally:
        backend.close()
    assert all(isinstance(s[-1], Finish) for s in streams)  # no "all 2 cache slots are in use" error
    assert [len(s) - 1 for s in streams] == [s[-1].usage["completion_tokens"] for s in streams]
    if kind == "batched":
        assert max(e.batch or 0 for s in streams for e in s[:-1]) == 2  # never more than the slots
    assert engine.running == 0 and engine.runner.free_slots == 2


@pytest.mark.timeout(120)
def test_a_failed_step_fails_its_sequences_and_the_scheduler_survives(tiny_engine, scheduler_of, fail_decode):
    scheduler = scheduler_of(tiny_engine)
    fail_decode(tiny_engine.runner, 3, "injected fault")
    with pytest.raises(RuntimeError, match="injected fault"):
        scheduler.generate("hello", SamplingParams(max_tokens=10, temperature=0))
    assert tiny_engine.running == 0 and tiny_engine.runner.free_slots == tiny_engine.config.max_batch
    done = scheduler.generate("hello again", SamplingParams(max_tokens=4, temperature=0))
    assert len(done.token_ids) == 4 and scheduler.alive


def test_scheduler_runs_on_its_own_thread(tiny_engine, scheduler_of):
    scheduler = scheduler_of(tiny_engine)
    seen = set()
    real = tiny_engine.runner.forward

    def spy(entries):
        seen.add(threading.current_thread().name)
        return real(entries)

    tiny_engine.runner.forward = spy
    try:
        scheduler.generate("hi", SamplingParams(max_tokens=4, temperature=0))
    finally:
        del tiny_engine.runner.forward
    assert seen == {"labserver-engine"}
