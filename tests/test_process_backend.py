"""The process backend on the fake runner: the same events as the engine thread, aborts across the
boundary, and the failure model (a killed engine process: errors, refusals, a bounded restart)."""

import asyncio
import os
import signal
import time

import pytest

from labserver import SamplingParams, fake_engine
from labserver.engine.prompts import PromptTooLong
from labserver.serve.process import messages as frames
from labserver.serve.process.client import EngineClient
from labserver.serve.process.frontend import Frontend
from labserver.engine.protocols import EngineDeadError
from labserver.serve.backends import make_backend
from labserver.serve.health import engine_state
from tests.waiting import seconds_until

STEP_MS = 20


def untimed(item):
    """An event or a Finish without its measured times (they differ from run to run)."""
    d = item.to_dict()
    d.pop("step_ms", None), d.pop("prefill_time_ms", None), d.pop("timings", None)
    return d


@pytest.fixture(scope="module")
def backend():
    backend = make_backend(fake_engine(prefill_ms=30, step_ms=STEP_MS), "process").start()
    yield backend
    backend.close()


async def collect_stream(backend, prompt, params):
    return [item async for item in backend.stream(prompt, params)]


def test_the_engine_runs_in_another_process(backend):
    health = backend.health()
    assert backend.kind == "process" and health.backend == "process"
    assert health.ok and health.alive and health.route == "fake" and health.restarts == 0
    assert health.pid != os.getpid()
    os.kill(health.pid, 0)  # a live process


@pytest.mark.parametrize("prompt", ["hi there", [3, 4, 5]])
def test_stream_equals_the_engine_thread(backend, prompt):
    params = SamplingParams(max_tokens=11, temperature=0)
    thread = make_backend(fake_engine(prefill_ms=0, step_ms=0), "batched")
    try:
        expected = asyncio.run(collect_stream(thread, prompt, params))
    finally:
        thread.close()
    got = asyncio.run(collect_stream(backend, prompt, params))
    assert [untimed(i) for i in got] == [untimed(i) for i in expected]
    assert "".join(e.token for e in got[:-1]) == " one two three four five six seven eight one two three"
    assert got[-1].finish_reason == "length" and got[-1].usage["completion_tokens"] == 11
    # The step times are the engine process's own measurements, carried as numbers.
    assert got[0].prefill_time_ms >= 30 and all(e.step_ms >= STEP_MS for e in got[1:-1])


def test_blocking_generate_and_complete(backend):
    params = SamplingParams(max_tokens=3)
    assert backend.generate("hi", params).text == " one two three"
    assert asyncio.run(backend.complete("hi", params)).text == " one two three"


def test_a_prompt_too_long_is_refused_in_the_api_process(backend):
    with pytest.raises(PromptTooLong):
        backend.generate("x " * (backend.frontend.config.max_prompt_tokens + 1), SamplingParams())


def test_a_fault_in_the_engine_reaches_the_stream_and_the_engine_serves_on():
    backend = make_backend(fake_engine(prefill_ms=5, step_ms=5, fail_at=2), "process").start()
    try:
        got = []

        async def run():
            async for item in backend.stream("hi", SamplingParams(max_tokens=10)):
                got.append(item)

        with pytest.raises(RuntimeError, match="injected fault"):
            asyncio.run(run())
        assert [e.token for e in got] == [" one", " two"]
        assert backend.generate("hi", SamplingParams(max_tokens=2)).text == " one two"
    finally:
        backend.close()


def test_leaving_a_stream_aborts_it_in_the_engine_process(backend):
    async def read_three_then_leave():
        stream = backend.stream("hi", SamplingParams(max_tokens=1000))
        async for event in stream:
            if event.index == 2:
                break
        assert backend.running == 1  # still counted by the engine until the abort arrives
        await stream.aclose()

    asyncio.run(read_three_then_leave())
    # 1000 tokens would take 20 s; the abort stops the sequence before its next forward.
    waited = seconds_until(lambda: backend.running == 0, timeout_s=1.0)
    assert backend.running == 0 and backend.health().running == 0, f"still running {waited:.2f} s later"


def test_concurrent_streams_are_batched_in_the_engine_process(backend):
    async def many():
        return await asyncio.gather(*[collect_stream(backend, "hi", SamplingParams(max_tokens=6))
                                      for _ in range(4)])

    results = asyncio.run(many())
    assert all("".join(e.token for e in r[:-1]) == " one two three four five six" for r in results)
    assert max(e.batch or 0 for r in results for e in r[:-1]) > 1  # one forward served several streams


def test_frames_carry_numbers_and_validate_params():
    add = frames.Add(7, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    assert frames.decode_in(frames.encode(add)) == add
    bad = frames.encode(frames.Add(7, [1], {"max_tokens": 0}))  # a struct is not checked when made...
    with pytest.raises(Exception, match="max_tokens"):  # ...but SamplingParams is, when decoded
        frames.decode_in(bad)


def test_a_killed_engine_process_fails_open_streams_refuses_then_restarts():
    backend = EngineClient(Frontend.of(fake_engine(prefill_ms=5, step_ms=STEP_MS)), max_restarts=1).start()
    try:
        first_pid = backend.health().pid
        outcome = {}

        async def stream_until_killed():
            start = None
            try:
                async for event in backend.stream("hi", SamplingParams(max_tokens=10_000)):
                    if event.index == 3:
                        os.kill(first_pid, signal.SIGKILL)
                        start = time.perf_counter()
            except EngineDeadError as exc:
                outcome["error"], outcome["after_s"] = str(exc), time.perf_counter() - start

        asyncio.run(asyncio.wait_for(stream_until_killed(), timeout=10))
        assert outcome["after_s"] < 2.0 and str(first_pid) in outcome["error"]
        health = backend.health()
        if not health.alive:  # a request meanwhile is refused, and /health says why
            assert not health.ok and health.reason
            with pytest.raises(EngineDeadError):
                backend.generate("hi", SamplingParams(max_tokens=2))
        # The supervisor restarts the engine process once: a new pid, and it serves.
        seconds_until(lambda: backend.health().ok, timeout_s=60)
        health = backend.health()
        assert health.ok and health.restarts == 1 and health.pid not in (first_pid, None)
        assert backend.generate("hi", SamplingParams(max_tokens=2)).text == " one two"
        # The second death exhausts max_restarts=1: refused, reported, nothing hangs.
        os.kill(health.pid, signal.SIGKILL)
        seconds_until(lambda: not backend.alive, timeout_s=2)
        seconds_until(lambda: "not restarted" in (backend.health().reason or ""), timeout_s=2)
        assert not backend.health().ok and "not restarted" in backend.health().reason
        assert engine_state(backend.health(), backend.max_restarts, 300) == {"state": "failed"}
        with pytest.raises(EngineDeadError):
            backend.generate("hi", SamplingParams(max_tokens=2))
    finally:
        backend.close()


STEP_MS, PAUSE_S, TOKENS = 10, 2.0, 400  # unheld, the pause would buffer 200 events


def test_a_reader_that_stops_reading_stops_costing_decode_steps():
    # The reader is in this process, the engine in another: every ACK_EVERY events the client says how
    # far it has read, and a request MAX_BACKLOG events ahead of its reader sits out the decode steps.
    from labserver.engine.core import MAX_BACKLOG

    backend = make_backend(fake_engine(prefill_ms=1, step_ms=STEP_MS), "process").start()
    try:
        async def read_pause_read():
            stream = backend.stream("hi", SamplingParams(max_tokens=TOKENS))
            first = [await stream.__anext__() for _ in range(5)]
            await asyncio.sleep(PAUSE_S)  # PAUSE_S / STEP_MS steps: far past the backlog, were it not held
            held = backend.running
            buffered, last = 0, time.perf_counter()
            rest = []
            async for item in stream:
                now = time.perf_counter()
                # Already here: it came sooner than half a step (a preempted loop only makes this count
                # smaller, so it can not hide a stream that was not held).
                buffered += (now - last) * 1000 < STEP_MS / 2 and len(rest) == buffered
                last = now
                rest.append(item)
            return first, held, buffered, rest

        first, held, buffered, rest = asyncio.run(read_pause_read())
        assert held == 1  # still running (not finished, not cancelled), only held
        assert 1 <= buffered <= MAX_BACKLOG + frames.ACK_EVERY < PAUSE_S * 1000 / STEP_MS, buffered
        tokens = first + rest[:-1]
        assert [e.index for e in tokens] == list(range(TOKENS)) and rest[-1].finish_reason == "length"
    finally:
        backend.close()


CLIENT_THAT_DIES = """
import asyncio, json, sys
from labserver import SamplingParams
from labserver.serve.process.client import EngineClient
from labserver.serve.process.frontend import Frontend
from labserver.serve.process.core_proc import EngineSpec
spec, info, address = EngineSpec.of(__import__("labserver").fake_engine()), *json.loads(sys.argv[1])
client = EngineClient(Frontend.for_engine_process(spec, info, address)).start()
async def main():
    async for event in client.stream("hi", SamplingParams(max_tokens=100_000)):
        if event.index == 2:
            print("streaming", flush=True)
asyncio.run(main())
"""


def test_an_api_process_killed_without_a_word_loses_its_requests_in_the_engine():
    import json
    import subprocess
    import sys

    from labserver.serve.process.core_proc import EngineSpec
    from labserver.serve.process.supervisor import EngineProcess

    engine = EngineProcess(EngineSpec.of(fake_engine(prefill_ms=1, step_ms=5))).start()
    watcher = EngineClient(Frontend.for_engine_process(engine.spec, engine.info, engine.address)).start()
    other = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_DIES, json.dumps([engine.info, engine.address])],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert other.stdout.readline().strip() == "streaming"
        assert seconds_until(lambda: watcher.running == 1, timeout_s=5) < 5  # the engine runs its request
        other.kill()  # no Bye, no Abort: the engine notices that its pid is gone
        other.wait()
        waited = seconds_until(lambda: watcher.running == 0, timeout_s=3)
        assert watcher.running == 0, f"the engine still runs a dead process's request {waited:.2f} s later"
        assert watcher.generate("hi", SamplingParams(max_tokens=2)).text == " one two"
    finally:
        other.kill()
        watcher.close()
        engine.close()
