"""Checkers for notebook 07, the engine in its own process; see ``checks/__init__.py`` for how checkers report.

``check_sse_from_ids`` feeds the student's API-side loop what an engine process sends (token ids and
step times, no text), from hand-made byte tokens and from the real engine on the fake runner, and reads
the SSE frames it yields. ``ByteTokenizer`` (one id per UTF-8 byte) makes a wrong answer visible at once:
decoding one id alone turns every non-ASCII character into U+FFFD.
"""
from __future__ import annotations

import json
from typing import Callable

from ...config import SamplingParams
from ...engine.sequence import collect
from ...engine.fake import fake_engine
from ...engine.sequence import Finish
from ..checking import attempt, checker, say

REPLACEMENT = "\ufffd"


class ByteTokenizer:
    """One id per UTF-8 byte (0-255): ``decode`` joins the bytes and decodes them, like byte-level BPE.

    >>> ByteTokenizer().decode(list("é".encode())), ByteTokenizer().decode([0xC3])
    ('é', '�')
    """

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def engine_outputs(ids: list[int], finish: dict, step_ms: float = 1.0) -> list[dict]:
    """What an engine process sends for one request: a message per token id, then its finish."""
    tokens = [{"token_id": i, "index": n, "step_ms": step_ms} for n, i in enumerate(ids)]
    if tokens:
        tokens[0]["prefill_time_ms"] = step_ms
    return tokens + [finish]


def _finish(n: int, reason: str = "length") -> dict:
    return {"finish_reason": reason, "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
            "timings": {"prefill_time_ms": 1.0}}


def _fake_case() -> tuple[list[dict], str, dict]:
    """The real engine on the fake runner: its events with the text dropped, as the boundary drops it."""
    events = list(fake_engine(prefill_ms=0, step_ms=0).generate_stream("hi", SamplingParams(max_tokens=10)))
    done = collect(events)
    outputs = [{k: v for k, v in e.to_dict().items() if k != "token"} for e in events if not isinstance(e, Finish)]
    return outputs + [done.finish.to_dict()], done.text, done.finish.to_dict()


def _parse(frames) -> tuple[list[dict], bool, str]:
    """(the JSON payloads, whether the last frame was [DONE] and nothing came after it, a problem or "")."""
    payloads, done, problem = [], False, ""
    for frame in frames:
        frame = frame.decode() if isinstance(frame, bytes) else str(frame)
        if done:
            return payloads, False, f"a frame after [DONE]: {frame!r}"
        if not (frame.startswith("data:") and frame.endswith("\n\n")):
            return payloads, False, f"{frame!r} is not one SSE event ('data: ...' and a blank line)"
        data = frame[5:].strip()
        if data == "[DONE]":
            done = True
        else:
            payloads.append(json.loads(data))
    return payloads, done, problem


def _stop_index(ids: list[int], tokenizer, stop: list[str]) -> int | None:
    """The index of the token that completes the first stop string (None: none does)."""
    for n in range(len(ids)):
        if any(s in tokenizer.decode(ids[:n + 1], skip_special_tokens=True) for s in stop):
            return n
    return None


def _case(name, fn, label, outputs, tokenizer, stop, text, finish_reason, one_per_token) -> bool:
    read = [0]

    def engine():  # counts what the loop took from the engine
        for out in outputs:
            read[0] += 1
            yield out

    frames = attempt(name, lambda: list(fn(engine(), tokenizer, list(stop))))
    payloads, done, problem = _parse(frames)
    tokens = [p for p in payloads if "token" in p]
    summaries = [p for p in payloads if "finish_reason" in p]
    got = "".join(p["token"] for p in tokens)
    ok = say(got == text and REPLACEMENT not in got, name, f"{label}: text {got!r} (expected {text!r})")
    ids = [o["token_id"] for o in outputs if "token_id" in o]
    if one_per_token:
        in_order = ([p.get("token_id") for p in tokens] == ids
                    and [p.get("index") for p in tokens] == list(range(len(ids))))
        ok &= say(in_order, name, f"{label}: one event per token id, in order, with its index "
                                  f"({len(tokens)} for {len(ids)})")
    last = _stop_index(ids, tokenizer, stop) if finish_reason == "stop" else None
    if last is not None:
        ok &= say(read[0] <= last + 1, name, f"{label}: stopped reading the engine at the token that completed "
                                             f"the stop string (read {read[0]}, the stop ends at token {last + 1})")
    reason = summaries[-1].get("finish_reason") if summaries else None
    ok &= say(len(summaries) == 1 and payloads[-1] is summaries[0] and reason == finish_reason, name,
              f"{label}: one summary after the tokens, finish_reason {reason!r} (expected {finish_reason!r})")
    ending = f"{label}: ends with data: [DONE]" + (f" ({problem})" if problem else "")
    return ok & say(done and not problem, name, ending)


@checker
def check_sse_from_ids(sse_from_ids: Callable) -> bool:
    """``sse_from_ids(outputs, tokenizer, stop)``: SSE frames from an engine process's token ids.

    Byte tokens ("Grüße aus 東京 🙂": one id per UTF-8 byte) with and without a stop string, and the real
    engine on the fake runner with a stop string that spans two tokens.
    """
    name = "sse_from_ids"
    text = "Grüße aus 東京 🙂"
    ids = list(text.encode())
    ok = _case(name, sse_from_ids, "bytes", engine_outputs(ids, _finish(len(ids))), ByteTokenizer(), [], text,
               "length", one_per_token=True)
    ok &= _case(name, sse_from_ids, "bytes, stop '東京'", engine_outputs(ids, _finish(len(ids))), ByteTokenizer(),
                ["東京"], "Grüße aus ", "stop", one_per_token=False)
    # '🙂!' never matches, but the output ends in '🙂', which could have begun it: held back, then sent.
    ok &= _case(name, sse_from_ids, "bytes, stop '🙂!'", engine_outputs(ids, _finish(len(ids))), ByteTokenizer(),
                ["🙂!"], text, "length", one_per_token=False)
    outputs, full, finish = _fake_case()
    ok &= _case(name, sse_from_ids, "fake runner", outputs, fake_engine().tokenizer, [], full,
                finish["finish_reason"], one_per_token=True)
    ok &= _case(name, sse_from_ids, "fake runner, stop 'four five'", outputs, fake_engine().tokenizer,
                ["four five"], full.split("four five")[0], "stop", one_per_token=False)
    return ok


@checker
def check_should_restart(should_restart: Callable) -> bool:
    """``should_restart(deaths_s, now_s, max_restarts, window_s)``: restart unless the engine has died
    more than ``max_restarts`` times within the last ``window_s`` seconds (a crash loop)."""
    name = "should_restart"
    cases = [  # (deaths, now, max_restarts, window, expected, why)
        ([100.0], 100.0, 3, 60.0, True, "the first death"),
        ([10.0, 20.0, 30.0], 30.0, 3, 60.0, True, "3 deaths in 60 s, 3 restarts allowed"),
        ([10.0, 20.0, 30.0, 40.0], 40.0, 3, 60.0, False, "a 4th death within 60 s: a crash loop"),
        ([10.0, 20.0, 30.0, 100.0], 100.0, 3, 60.0, True, "the first three are older than 60 s"),
        ([2.0, 50.0, 60.0, 61.0], 61.0, 3, 60.0, False, "all four within the last 60 s"),
        ([10.0, 20.0, 30.0, 70.0], 70.0, 3, 60.0, True, "the death at 10 s is exactly 60 s old: out of the window"),
        ([5.0, 6.0], 6.0, 1, 10.0, False, "max_restarts 1: the second death gives up"),
        ([5.0], 5.0, 0, 10.0, False, "max_restarts 0: never restart"),
    ]
    ok = True
    for deaths, now, limit, window, expected, why in cases:
        got = attempt(name, should_restart, list(deaths), now, limit, window)
        ok &= say(got is expected or got == expected, name, f"deaths at {deaths}, now {now}, max {limit} in "
                                                          f"{window:g} s -> {got!r} (expected {expected}: {why})")
    return ok


@checker
def check_new_text(new_text: Callable) -> bool:
    """``new_text(tokenizer, ids, prefix, read) -> (text, prefix, read)``: the text the last id of ``ids``
    adds, decoding ``ids[prefix:read]`` and ``ids[prefix:]`` and sending the difference ("" while a
    character is incomplete). Fed byte tokens one id at a time, and the fake runner's word tokens."""
    name = "new_text"
    ok = True
    for label, tokenizer, ids in (("bytes", ByteTokenizer(), list("Grüße aus 東京 🙂".encode())),
                                  ("fake runner words", fake_engine().tokenizer, [0, 1, 2, 3])):
        whole = tokenizer.decode(ids)
        pieces, prefix, read = [], 0, 0
        for n in range(len(ids)):
            text, prefix, read = attempt(name, new_text, tokenizer, ids[:n + 1], prefix, read)
            pieces.append(text)
        ok &= say("".join(pieces) == whole and not any(REPLACEMENT in t for t in pieces), name,
                  f"{label}: the pieces join to {''.join(pieces)!r} (expected {whole!r}, no U+FFFD)")
        # A character is complete when the bytes so far decode without a replacement at their end.
        due = [not tokenizer.decode(ids[:n + 1]).endswith(REPLACEMENT) for n in range(len(ids))]
        got = [bool(t) for t in pieces]
        ok &= say(got == due, name, f"{label}: text came out at {sum(got)} of {len(ids)} ids (expected "
                                    f"{sum(due)}: each at the id that completes a character)")
    return ok


HOLD_CASES = [  # (text, stop strings, expected (send, held, stopped), why)
    ("Hello", [], ("Hello", "", False), "no stop strings: send it all"),
    ("Hello wor", ["world"], ("Hello ", "wor", False), "'wor' may still become 'world'"),
    ("say 東京 now", ["東京"], ("say ", "", True), "a stop string: the text before it, then stop"),
    ("x. y", ["y", "."], ("x", "", True), "the first match in the text, not in the list"),
    ("ab", ["abc", "b!"], ("", "ab", False), "the longest tail that could begin a stop string"),
    ("end🙂", ["🙂!"], ("end", "🙂", False), "a whole character held back"),
    ("one two", ["three"], ("one two", "", False), "'o' is not the start of 'three'"),
]


@checker
def check_hold_back(hold_back: Callable) -> bool:
    """``hold_back(text, stop) -> (send, held, stopped)``: of the text not yet sent, what to send now, the
    tail to hold back (it may still become a stop string), and whether a stop string was found (then
    ``send`` is the text before the first one and nothing is held)."""
    name = "hold_back"
    ok = True
    for text, stop, expected, why in HOLD_CASES:
        got = attempt(name, hold_back, text, list(stop))
        got = tuple(got) if isinstance(got, (tuple, list)) else got
        ok &= say(got == expected, name, f"{text!r}, stop {stop} -> {got!r} (expected {expected!r}: {why})")
    return ok
