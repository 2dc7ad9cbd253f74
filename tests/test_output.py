"""The output processor: ids into text once for every backend, and the stream interval.

Hand-checkable on the fake engine (one word per id); the real tokenizer's multi-byte case is in
tests/test_detokenize.py, which the processor's text relies on.
"""

import asyncio

import httpx
import pytest

from labserver import EngineConfig, Finish, SamplingParams, TokenEvent, fake_engine, make_backend
from labserver.engine.fake import WordTokenizer
from labserver.engine.output import OutputProcessor
from labserver.engine.sequence import TokenOutput
from labserver.serve.app import create_app
from labserver.serve.limits import ServerLimits

FINISH = Finish("length", {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8}, {})


def released(interval: int, n: int = 7, finish: bool = True) -> list[list]:
    """What ``OutputProcessor`` hands out after each of ``n`` outputs (and the finish): the groups."""
    out = OutputProcessor(WordTokenizer(), max_tokens=n, interval=interval)
    groups = [out.add(TokenOutput(i % 8, i, 1.0)) for i in range(n)]
    groups.append(out.add(FINISH) if finish else out.release())
    return [[e.token if isinstance(e, TokenEvent) else "FINISH" for e in g] for g in groups]


def test_interval_one_sends_every_token_at_once():
    assert released(1) == [[" one"], [" two"], [" three"], [" four"], [" five"], [" six"], [" seven"], ["FINISH"]]


def test_interval_sends_the_first_at_once_then_groups_then_the_rest_with_the_finish():
    assert released(3) == [[" one"], [], [], [" two", " three", " four"], [], [],
                           [" five", " six", " seven"], ["FINISH"]]
    assert released(4) == [[" one"], [], [], [], [" two", " three", " four", " five"], [], [],
                           [" six", " seven", "FINISH"]]


def test_a_cancelled_request_still_gets_what_was_held():
    assert released(4, finish=False)[-1] == [" six", " seven"]


def test_the_last_token_carries_the_detokenizers_flush():
    class HoldsBack(WordTokenizer):  # decodes a trailing "two" only once something follows it
        def decode(self, ids, skip_special_tokens=False):
            text = super().decode(ids, skip_special_tokens)
            return text + "\ufffd" if ids and ids[-1] == 1 else text

    out = OutputProcessor(HoldsBack(), max_tokens=2)
    assert out.add(TokenOutput(0, 0, 1.0))[0].token == " one"
    assert out.add(TokenOutput(1, 1, 1.0))[0].token == " two\ufffd"  # the last: flushed, nothing kept back
    assert OutputProcessor(HoldsBack(), max_tokens=3).event(TokenOutput(1, 1, 1.0)).token == ""


def test_a_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        OutputProcessor(WordTokenizer(), 4, interval=0)
    with pytest.raises(ValueError, match="stream_interval"):
        ServerLimits(stream_interval=0)


@pytest.mark.parametrize("kind", ["batched", "thread", "executor", "blocking"])
def test_every_backend_groups_its_stream_the_same_way(kind):
    backend = make_backend(fake_engine(prefill_ms=1, step_ms=1), kind, stream_interval=4)

    async def groups():
        return [[e.token_id if isinstance(e, TokenEvent) else "F" for e in g]
                async for g in backend.deliveries("a", SamplingParams(max_tokens=10))]

    try:
        got = asyncio.run(groups())
    finally:
        backend.close()
    assert got == [[0], [1, 2, 3, 4], [5, 6, 7, 0], [1, "F"]]


def test_the_stream_interval_keeps_one_sse_event_per_token():
    """With an interval the events go out in fewer writes, each still its own event, with the same text."""
    bodies = {}
    for interval in (1, 5):
        app = create_app(fake_engine(prefill_ms=1, step_ms=1, config=EngineConfig(model="fake", threads=1)),
                         limits=ServerLimits(stream_interval=interval))

        async def call():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                r = await client.post("/generate", json={"prompt": "a", "max_tokens": 12, "stream": True})
                return r.text

        bodies[interval] = asyncio.run(call())
    events = {k: [line for line in v.split("\n\n") if line] for k, v in bodies.items()}
    strip = lambda e: e.split('"step_ms"')[0].split('"timings"')[0]  # noqa: E731  (times differ between runs)
    assert [strip(e) for e in events[1]] == [strip(e) for e in events[5]]
    assert len(events[5]) == 12 + 2  # 12 token events, the summary, [DONE]
