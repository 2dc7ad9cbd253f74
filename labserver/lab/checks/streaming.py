"""Checkers for notebook 02 streaming SSE; see ``checks/__init__.py`` for how checkers report.

Where a verdict depends on timing (do the tokens arrive one by one?), the checker serves ``fake_engine``,
whose steps are sleeps of a known length: a sleep never ends early, so tokens that really stream arrive
at least a step apart on any machine, however fast or busy, and a buffered answer arrives all at once.
"""
from __future__ import annotations

import json
from typing import Callable

from ...engine.fake import WORDS, fake_engine
from ...measure.client import stream_generate
from ...serve.background import ServerStartError, start_fastapi, stop
from ..checking import attempt, checker, say
from ..harness import one_by_one, read_sse, serve_student_app, stop_student_app
from ..streaming import raw_sse

FAKE_STEP_MS = 60.0  # the fake engine's prefill and decode sleeps in these checks


SSE_CASES = [
    ('data: {"token": " Paris", "index": 0}', {"token": " Paris", "index": 0}),
    ('data:{"token":"x"}', {"token": "x"}),        # the space after "data:" is optional
    ("", None),                                    # the blank line that ends an event
    ("data: [DONE]", None),                        # the end marker is not JSON
    (": keep-alive", None),                        # a comment line
    ("data: 42", None),                            # JSON, but not an event object
    ("event: token", None),                        # another field
]


@checker
def check_parse_sse_line(parse_sse_line: Callable, url: str | None = None) -> bool:
    """``parse_sse_line(line)``: the JSON payload of a ``data:`` line as a dict, else ``None``."""
    name = "parse_sse_line"
    ok = True
    for line, expected in SSE_CASES:
        got = attempt(name, parse_sse_line, line)
        ok &= say(got == expected, name, f"{line!r} -> {got!r} (expected {expected!r})")
    if url is not None:
        lines = [line for _, line in raw_sse(url, max_tokens=8, show=False)]
        events = [attempt(name, parse_sse_line, line) for line in lines]
        text = "".join(e["token"] for e in events if e and "token" in e)
        expected = "".join(json.loads(line[5:])["token"] for line in lines if line.startswith("data: {\"token"))
        ok &= say(text == expected and text != "", name, f"a live stream of {len(lines)} lines -> {text!r}")
    return ok


@checker
def check_my_stream(my_stream: Callable, url: str, prompt: str = "What is the capital of France?") -> bool:
    """``my_stream(url, prompt, max_tokens)``: [(ms after sending, token text), ...] with plain httpx, greedy.

    First against ``url`` (the real model: the same text as ``stream_generate``), then against a server of
    ``fake_engine`` with steps of FAKE_STEP_MS: the tokens must arrive as they are made.
    """
    name = "my_stream"
    got = attempt(name, my_stream, url, prompt, 16)
    ref = stream_generate(url, prompt, 16, 0.0)
    text = "".join(token for _, token in got)
    ok = say(text == ref.text, name, f"{len(got)} tokens, text {text!r} (expected {ref.text!r})")
    times = [t for t, _ in got]
    ok &= say(times == sorted(times) and len(times) > 1, name, "arrival times increase")
    fake = start_fastapi(fake_engine(prefill_ms=FAKE_STEP_MS, step_ms=FAKE_STEP_MS), name="check-my-stream")
    try:
        got = attempt(name, my_stream, fake.url, "go", 6)
    finally:
        stop("check-my-stream")
    expected = "".join(" " + w for w in WORDS[:6])
    text = "".join(token for _, token in got)
    ok &= say(text == expected, name, f"fake engine: {text!r} (expected {expected!r})")
    if len(got) > 1:
        streamed, detail = one_by_one([t for t, _ in got], FAKE_STEP_MS)
        ok &= say(streamed, name, "fake engine: " + detail)
    return ok


@checker
def check_sse_endpoint(make_sse_app: Callable) -> bool:
    """``make_sse_app(engine)``: a FastAPI app whose ``POST /generate`` streams SSE.

    Served (uvicorn, background thread) on ``fake_engine`` with steps of FAKE_STEP_MS and asked for 6
    tokens: ``text/event-stream``; one ``data: {"token": ...}`` frame per token, in order; ``data: [DONE]``
    last; and the tokens arrive as the engine makes them, not all at the end.
    """
    name = "make_sse_app"
    app = attempt(name, make_sse_app, fake_engine(prefill_ms=FAKE_STEP_MS, step_ms=FAKE_STEP_MS))
    if not callable(app):
        return say(False, name, f"make_sse_app returned {app!r}, not an app (return the FastAPI object)")
    try:
        server = serve_student_app(app)
        reading = read_sse(server.url, {"prompt": "go", "max_tokens": 6}, timeout_s=10)
    except ServerStartError as exc:
        return say(False, name, f"the app did not start: {exc}")
    finally:
        stop_student_app()
    if not say(reading.status == 200 and reading.error is None, name,
               f"POST /generate answered {reading.status}" + (f"; {reading.error}" if reading.error else "")):
        return False
    ok = say(reading.content_type.startswith("text/event-stream"), name,
             f"content-type {reading.content_type!r} (expected text/event-stream)")
    tokens, expected = reading.tokens, [" " + w for w in WORDS[:6]]
    ok &= say([t for _, t in tokens] == expected, name,
              f"{len(tokens)} token frames {[t for _, t in tokens]} (expected one per token: {expected})")
    # SSE ends an event at a blank line; data lines without one run together into one event, which a
    # client reads as a single (multi-line, unparseable) payload.
    lines = [line for _, line in reading.lines]
    unended = [line for i, line in enumerate(lines) if line.startswith("data:") and lines[i + 1:i + 2] != [""]]
    ok &= say(not unended, name, f"every data line ends its event with a blank line ({len(unended)} do not"
                                 + (f", e.g. {unended[0]!r})" if unended else ")"))
    last = reading.data[-1][1] if reading.data else None
    ok &= say(last == "[DONE]", name, f"last data line {last!r} (expected '[DONE]')")
    if len(tokens) > 1:
        streamed, detail = one_by_one([t for t, _ in tokens], FAKE_STEP_MS)
        ok &= say(streamed, name, detail)
    return ok
