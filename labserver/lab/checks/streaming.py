"""Checkers for notebook 02 streaming SSE; see ``checks/__init__.py`` for how checkers report."""
from __future__ import annotations

import json
from typing import Callable

from ...measure.client import stream_generate
from ...measure.trace import Trace
from ..checking import attempt, checker, near, say
from ..streaming import raw_sse


SSE_CASES = [
    ('data: {"token": " Paris", "index": 0}', {"token": " Paris", "index": 0}),
    ('data:{"token":"x"}', {"token": "x"}),        # the space after "data:" is optional
    ("", None),                                    # the blank line that ends an event
    ("data: [DONE]", None),                        # the end marker is not JSON
    (": keep-alive", None),                        # a comment line
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
def check_itl_tpot(itl_and_tpot: Callable, trace: Trace) -> bool:
    """``itl_and_tpot(arrival_ms)``: (list of gaps, TPOT) as vllm bench serve defines them."""
    name = "itl_and_tpot"
    itl, tpot = attempt(name, itl_and_tpot, [100.0, 130.0, 170.0])
    ok = say(list(itl) == [30.0, 40.0] and near(tpot, 35.0), name,
              f"[100, 130, 170] -> ({list(itl)}, {tpot}) (expected ([30.0, 40.0], 35.0))")
    itl, tpot = attempt(name, itl_and_tpot, list(trace.arrival_ms))
    same = len(itl) == len(trace.itl_ms) and all(near(a, b) for a, b in zip(itl, trace.itl_ms))
    return ok & say(same and near(tpot, trace.tpot_ms), name,
                     f"your trace -> TPOT {tpot:.1f} ms (Trace says {trace.tpot_ms:.1f} ms), {len(itl)} gaps")


@checker
def check_my_stream(my_stream: Callable, url: str, prompt: str = "What is the capital of France?") -> bool:
    """``my_stream(url, prompt, max_tokens)``: [(ms after sending, token text), ...] with plain httpx, greedy."""
    name = "my_stream"
    got = attempt(name, my_stream, url, prompt, 16)
    ref = stream_generate(url, prompt, 16, 0.0)
    text = "".join(token for _, token in got)
    ok = say(text == ref.text, name, f"{len(got)} tokens, text {text!r} (expected {ref.text!r})")
    times = [t for t, _ in got]
    ok &= say(times == sorted(times) and len(times) > 1, name, "arrival times increase")
    if ok:
        # A decode step takes well over 5 ms on any CPU; a buffered answer arrives all in one instant.
        spread = times[-1] - times[0]
        ok &= say(spread >= 5 * (len(times) - 1), name, f"first token at {times[0]:.0f} ms, last at "
                                                        f"{times[-1]:.0f} ms: they arrived one by one")
    return ok
