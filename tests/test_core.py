"""The engine thread and the lab's variants: ordering, interleaving, batching, errors, cancellation, threads.

Every backend runs the same real ``Engine`` on a ``FakeRunner`` (fixed sleeps, " one two three ..."), so
what a stream must contain, and roughly when, can be written down by hand.
"""

import asyncio
import threading
import time

import pytest

from labserver import EngineConfig, Finish, SamplingParams, TokenEvent, fake_engine, make_backend
from labserver.engine.core import DONE
from labserver.engine.sequence import TokenOutput
from labserver.serve.backends import ThreadBackend

KINDS = ["batched", "thread", "executor", "blocking"]
ENGINE_THREAD = ["batched", "thread"]


async def drain(backend, prompt="a b c", n=5):
    return [item async for item in backend.stream(prompt, SamplingParams(max_tokens=n))]


@pytest.fixture
def fast_engine():
    return fake_engine(prefill_ms=5, step_ms=5)


@pytest.fixture
def backends():
    made = []

    def make(engine, kind):
        made.append(make_backend(engine, kind))
        return made[-1]
    yield make
    for backend in made:
        backend.close()


def spy_threads(engine) -> set[str]:
    """The names of the threads that run the runner's forwards from now on."""
    names, runner = set(), engine.runner
    real = runner.forward

    def spy(entries):
        names.add(threading.current_thread().name)
        return real(entries)
    runner.forward = spy
    return names


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_ends_with_finish_and_returns(fast_engine, backends, kind):
    backend = backends(fast_engine, kind)
    items = asyncio.run(asyncio.wait_for(drain(backend), 10))  # a StopIteration-based loop would hang
    assert [type(i) for i in items] == [TokenEvent] * 5 + [Finish]
    assert [i.index for i in items[:-1]] == list(range(5))
    assert "".join(i.token for i in items[:-1]) == " one two three four five"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ENGINE_THREAD)
def test_one_stream_times_are_the_sleeps(backends, kind):
    # A fake forward sleeps prefill_ms or step_ms, and the engine times the forward around the sleep:
    # each time is at least its sleep; the small overhead (sampling 10 logits) gets a step's worth of slack
    # for a busy machine.
    engine = fake_engine(prefill_ms=30, step_ms=10)
    items = asyncio.run(drain(backends(engine, kind), n=6))
    events, finish = items[:-1], items[-1]
    assert 30 <= events[0].prefill_time_ms == events[0].step_ms < 30 + 10
    assert all(10 <= e.step_ms < 20 for e in events[1:])
    assert finish.timings["decode_time_ms"] == pytest.approx(sum(e.step_ms for e in events[1:]), abs=0.01)


@pytest.mark.parametrize("kind", ENGINE_THREAD)
def test_every_forward_runs_on_the_engine_thread(backends, kind):
    engine = fake_engine(prefill_ms=1, step_ms=1)
    names = spy_threads(engine)
    backend = backends(engine, kind)

    async def many():
        return await asyncio.gather(*(drain(backend, n=4) for _ in range(3)))

    asyncio.run(many())
    assert names == {"labserver-engine"}


def test_no_thread_before_start_and_start_is_idempotent(fast_engine):
    before = set(threading.enumerate())
    backend = make_backend(fast_engine, "batched")
    assert not backend.alive and set(threading.enumerate()) == before  # an app never served leaves none
    try:
        assert backend.start() is backend and backend.alive
        thread = backend.core._thread
        backend.start()
        assert backend.core._thread is thread and len(set(threading.enumerate()) - before) == 1
    finally:
        backend.close()
    assert not backend.alive
    with pytest.raises(RuntimeError, match="stopped"):
        backend.start()


def test_an_app_that_is_never_served_starts_no_thread(fast_engine):
    from labserver import create_app

    before = set(threading.enumerate())
    app = create_app(fast_engine)
    assert app.state.backend.kind == "batched" and not app.state.backend.alive
    assert set(threading.enumerate()) == before


def test_first_use_starts_the_thread(fast_engine, backends):
    backend = backends(fast_engine, "thread")
    assert not backend.alive
    assert backend.generate("a", SamplingParams(max_tokens=2)).text == " one two" and backend.alive


def test_turn_taking_streams_interleave_token_by_token(backends):
    backend = backends(fake_engine(prefill_ms=10, step_ms=10), "thread")
    order = []

    async def consume(tag):
        async for item in backend.stream("x", SamplingParams(max_tokens=6)):
            if isinstance(item, TokenEvent):
                order.append((tag, item.batch))

    async def both():
        await asyncio.gather(consume("a"), consume("b"))

    asyncio.run(both())
    tags = [tag for tag, _ in order]
    assert tags.count("a") == tags.count("b") == 6 and {batch for _, batch in order} == {None}
    # Interleaved, not one after the other: b has tokens before a's last one.
    assert tags.index("b") < len(tags) - 1 - tags[::-1].index("a")


def test_batched_streams_share_each_step(backends):
    # Three streams, 20 ms a decode step whatever the batch: once all three are in, every step carries
    # all of them, so each stream still gets a token per ~20 ms (turn-taking would give one per ~60 ms).
    backend = backends(fake_engine(prefill_ms=20, step_ms=20), "batched")

    async def three():
        return await asyncio.gather(*(drain(backend, p, n=8) for p in ("a", "b c", "d e f")))

    streams = asyncio.run(three())
    for items in streams:
        assert "".join(e.token for e in items[:-1]) == " one two three four five six seven eight"
        assert items[-1].finish_reason == "length"
        assert items[-2].batch == 3  # the last steps carried all three
    assert max(e.batch or 0 for items in streams for e in items[:-1]) == 3


@pytest.mark.parametrize("kind", ["batched", "thread", "executor"])
def test_closing_the_stream_cancels_within_a_step(backends, kind):
    engine = fake_engine(prefill_ms=5, step_ms=20)
    backend = backends(engine, kind)

    async def take_three():
        agen = backend.stream("x", SamplingParams(max_tokens=200))
        got = [await agen.__anext__() for _ in range(3)]
        await agen.aclose()
        return got

    got = asyncio.run(take_three())
    deadline = time.monotonic() + 1.0
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and backend.running == 0
    assert engine.tokens_generated <= len(got) + 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ENGINE_THREAD)
def test_a_request_cancelled_while_waiting_is_never_prefilled(kind):
    # One cache slot: the second request waits while the first one runs, and is cancelled meanwhile.
    engine = fake_engine(prefill_ms=5, step_ms=10, config=EngineConfig(model="fake", threads=1, max_batch=1))
    backend = make_backend(engine, kind)
    prefilled = []
    real = engine.runner.forward
    engine.runner.forward = lambda entries: prefilled.extend(e[0] for e in entries if e[1] == 0) or real(entries)
    first, second = [], []
    try:
        backend.submit("a", SamplingParams(max_tokens=10), first.append)
        while len(first) < 2:
            time.sleep(0.005)
        waiting = backend.submit("b", SamplingParams(max_tokens=10), second.append)
        time.sleep(0.05)  # several steps of the first: the second is admitted and waits for the slot
        waiting.cancel.set()
        while not (first and first[-1] is DONE):
            time.sleep(0.005)
    finally:
        backend.close()
    assert second == [DONE] and len(prefilled) == 1
    assert isinstance(first[-2], Finish) and first[-2].usage["completion_tokens"] == 10
    assert engine.running == 0 and engine.runner.free_slots == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ENGINE_THREAD)
def test_close_releases_everyone_with_done(kind):
    engine = fake_engine(prefill_ms=5, step_ms=10, config=EngineConfig(model="fake", threads=1, max_batch=1))
    backend = make_backend(engine, kind)
    running, waiting = [], []
    backend.submit("a", SamplingParams(max_tokens=1000), running.append)
    backend.submit("b", SamplingParams(max_tokens=1000), waiting.append)  # no slot for it
    while len(running) < 2:
        time.sleep(0.005)
    backend.close()
    assert running[-1] is DONE and isinstance(running[0], TokenOutput) and waiting == [DONE]
    assert engine.running == 0 and engine.runner.free_slots == 1 and not backend.alive
    with pytest.raises(RuntimeError, match="stopped"):
        backend.generate("c", SamplingParams(max_tokens=1))


@pytest.mark.parametrize("kind", KINDS)
def test_engine_error_reaches_the_caller_and_the_backend_survives(backends, kind):
    engine = fake_engine(prefill_ms=1, step_ms=1, fail_at=2)
    backend = backends(engine, kind)
    with pytest.raises(RuntimeError, match="injected fault"):
        asyncio.run(drain(backend))
    engine.runner.fail_at = None
    assert isinstance(asyncio.run(drain(backend))[-1], Finish)
    assert engine.running == 0 and engine.runner.free_slots == engine.config.max_batch


@pytest.mark.parametrize("kind", ENGINE_THREAD)
def test_a_failed_forward_fails_only_the_sequences_in_it(backends, kind):
    # fail_at=6 fails the step that makes a 7th token. The 2-token request has joined by a's 3rd token at
    # the latest (one prefill waits for at most one decode step) and left one step later: never in that step.
    engine = fake_engine(prefill_ms=1, step_ms=5, fail_at=6)
    backend = backends(engine, kind)

    async def both():
        return await asyncio.gather(drain(backend, "a", n=10), drain(backend, "b", n=2), return_exceptions=True)

    long, short = asyncio.run(both())
    assert isinstance(long, RuntimeError) and str(long) == "injected fault"
    assert [type(i) for i in short] == [TokenEvent] * 2 + [Finish]
    assert backend.alive and engine.running == 0


def test_blocking_generate_from_another_thread(fast_engine):
    worker = ThreadBackend(fast_engine)
    try:
        out = worker.generate("a b", SamplingParams(max_tokens=4))
        assert out.text == " one two three four" and out.finish.finish_reason == "length"
        with pytest.raises(Exception, match="limit"):
            worker.generate("x" * 10**6, SamplingParams())
        assert worker.alive
    finally:
        worker.close()
    assert not worker.alive


def test_unknown_backend_is_a_clear_error(fast_engine):
    with pytest.raises(ValueError, match="backend must be .auto. or one of"):
        make_backend(fast_engine, "gpu")
    assert make_backend(fast_engine).kind == "batched"
