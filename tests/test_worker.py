"""The engine thread and the lab's variants: ordering, interleaving, errors, cancellation, thread ownership."""

import asyncio
import threading
import time

import pytest

from labserver import FakeEngine, Finish, SamplingParams, TokenEvent, make_backend
from labserver.serve.engine_thread import EngineWorker

KINDS = ["thread", "executor", "blocking"]


async def drain(backend, prompt="a b c", n=5):
    return [item async for item in backend.stream(prompt, SamplingParams(max_tokens=n))]


@pytest.fixture
def fast_engine():
    return FakeEngine(prefill_ms=5, step_ms=5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_ends_with_finish_and_returns(fast_engine, kind):
    backend = make_backend(fast_engine, kind)
    try:
        items = asyncio.run(asyncio.wait_for(drain(backend), 10))  # the seed's StopIteration trap would hang
        assert [type(i) for i in items] == [TokenEvent] * 5 + [Finish]
        assert [i.index for i in items[:-1]] == list(range(5))
    finally:
        backend.close()


class ThreadRecordingEngine(FakeEngine):
    def _stream(self, *args):
        for item in super()._stream(*args):
            self.threads.add(threading.get_ident())
            yield item


def test_every_step_runs_on_the_engine_thread():
    engine = ThreadRecordingEngine(prefill_ms=1, step_ms=1)
    engine.threads = set()
    worker = EngineWorker(engine)

    async def many():
        return await asyncio.gather(*(drain(worker, n=4) for _ in range(3)))

    try:
        asyncio.run(many())
        assert engine.threads == {worker._thread.ident}
    finally:
        worker.close()


def test_concurrent_streams_interleave_token_by_token():
    worker = EngineWorker(FakeEngine(prefill_ms=10, step_ms=10))
    order = []

    async def consume(tag):
        async for item in worker.stream("x", SamplingParams(max_tokens=6)):
            if isinstance(item, TokenEvent):
                order.append(tag)

    async def both():
        await asyncio.gather(consume("a"), consume("b"))

    try:
        asyncio.run(both())
        assert order.count("a") == order.count("b") == 6
        # Interleaved, not one after the other: b has tokens before a's last one.
        assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    finally:
        worker.close()


@pytest.mark.parametrize("kind", ["thread", "executor"])
def test_closing_the_stream_cancels_within_a_step(kind):
    engine = FakeEngine(prefill_ms=5, step_ms=20)
    backend = make_backend(engine, kind)

    async def take_three():
        agen = backend.stream("x", SamplingParams(max_tokens=200))
        got = [await agen.__anext__() for _ in range(3)]
        await agen.aclose()
        return got

    try:
        got = asyncio.run(take_three())
        deadline = time.monotonic() + 1.0
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
        assert engine.tokens_generated <= len(got) + 2
    finally:
        backend.close()


@pytest.mark.parametrize("kind", KINDS)
def test_engine_error_reaches_the_caller_and_the_backend_survives(kind):
    engine = FakeEngine(prefill_ms=1, step_ms=1, fail_at=2)
    backend = make_backend(engine, kind)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            asyncio.run(drain(backend))
        engine.fail_at = None
        assert isinstance(asyncio.run(drain(backend))[-1], Finish)
        assert engine.running == 0
    finally:
        backend.close()


def test_blocking_generate_from_another_thread(fast_engine):
    worker = EngineWorker(fast_engine)
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
