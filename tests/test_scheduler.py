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
        assert first.prefill_time_ms is not None and first.batch in (None, 2)
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


def request(n_prompt: int, running: bool = False):
    """What a policy reads of a request: its sequence's prompt length and whether it holds a slot."""
    return NS(seq=NS(ids=[0] * n_prompt, running=running))


def run_prefill(step) -> None:
    for req in step.requests:
        req.seq.running = True


def test_batched_prefills_the_waiting_prompts_that_fit_the_budget():
    policy = Batched(prefill_tokens=10)
    waiting = [request(n) for n in (4, 5, 2, 30, 1)]
    for req in waiting:
        policy.add(req)
    assert policy.joining(free_slots=16, n_running=0) == waiting[:2]  # 4 + 5 fit, + 2 would not
    step = policy.schedule(free_slots=16)
    assert step.prefill and step.requests == waiting[:2]
    run_prefill(step)
    decode = policy.schedule(free_slots=14)  # after a prefill, the running streams get their step
    assert not decode.prefill and decode.requests == waiting[:2]
    step = policy.schedule(free_slots=14)
    assert step.requests == waiting[2:3]  # 2 + 30 would not fit
    run_prefill(step), policy.schedule(13)
    step = policy.schedule(free_slots=13)
    assert step.requests == waiting[3:4]  # longer than the budget: alone
    run_prefill(step), policy.schedule(12)
    assert policy.schedule(free_slots=12).requests == waiting[4:]


def test_batched_is_held_to_free_slots_and_max_batch():
    policy = Batched(prefill_tokens=100, max_batch=3)
    reqs = [request(1, running=True)] + [request(1) for _ in range(4)]
    for req in reqs:
        policy.add(req)
    assert policy.schedule(free_slots=1).requests == reqs[1:2]  # one free slot
    run_prefill(NS(requests=reqs[1:2]))
    assert policy.schedule(free_slots=0).requests == reqs[:2]  # a decode step: waiting ones wait
    assert policy.schedule(free_slots=8).requests == reqs[2:3]  # max_batch 3: room for one more
    run_prefill(NS(requests=reqs[2:3]))
    step = policy.schedule(free_slots=8)
    assert not step.prefill and step.requests == reqs[:3]
    assert policy.schedule(free_slots=8).requests == reqs[:3]  # full: decode again, nobody joins
    policy.remove(reqs[0])  # finished: it left between two steps
    assert policy.schedule(free_slots=8).requests == reqs[3:4]
    assert Batched().schedule(free_slots=8) is None  # nothing to do


def test_turn_taking_gives_everyone_a_step_in_turn():
    policy = TurnTaking()
    a, b, c = request(3, running=True), request(2, running=True), request(1)
    for req in (a, b, c):
        policy.add(req)
    steps = [policy.schedule(free_slots=1) for _ in range(3)]
    assert [s.requests for s in steps] == [[a], [b], [c]] and [s.prefill for s in steps] == [False, False, True]
    run_prefill(steps[2])
    assert [policy.schedule(free_slots=0).requests for _ in range(4)] == [[a], [b], [c], [a]]
    waiting = request(1)
    policy.add(waiting)
    assert [policy.schedule(free_slots=0).requests for _ in range(3)] == [[b], [c], [a]]  # no slot: it waits
    policy.remove(a), policy.remove(b), policy.remove(c)
    assert policy.schedule(free_slots=0) is None and policy.schedule(free_slots=1).requests == [waiting]


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
    real = tiny_engine.runner.decode

    def spy(seqs):
        seen.add(threading.current_thread().name)
        return real(seqs)

    tiny_engine.runner.decode = spy
    try:
        scheduler.generate("hi", SamplingParams(max_tokens=4, temperature=0))
    finally:
        del tiny_engine.runner.decode
    assert seen == {"labserver-engine"}
