"""Checkers for notebook 04 cancellation; see ``checks/__init__.py`` for how checkers report."""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import httpx

from ...engine.loading import off_thread
from ...engine.fake import fake_engine
from ...measure.client import stream_generate
from ..cancellation import hang_up, start_json_app, wait_idle
from ..checking import Todo, attempt, checker, say

LONG_PROMPT = "Write a long story about a lighthouse keeper."


def _generated_by(engine, fn: Callable, name: str, *args) -> tuple:
    """Run ``fn``; return (its result, tokens the engine generated, whether it went idle within 5 s)."""
    wait_idle(engine)
    before = engine.tokens_generated
    result = attempt(name, fn, *args)
    wait_idle(engine, timeout_s=5.0)
    idle = engine.running == 0
    time.sleep(0.3)  # a generation that kept going would add tokens now
    return result, engine.tokens_generated - before, idle


@checker
def check_hang_up(hang_up_after: Callable, engine, url: str) -> bool:
    """``hang_up_after(url, n)``: read n token events of a long stream, close it, return how many were read."""
    name = "hang_up_after"
    got, generated, idle = _generated_by(engine, hang_up_after, name, url, 4)
    ok = say(got == 4, name, f"read {got} token events (expected 4)")
    # Both bounds: a function that returns 4 without asking the server read nothing (0 generated).
    return ok & say(idle and 4 <= generated <= 4 + 2, name,
                     f"the engine generated {generated} tokens and {'stopped' if idle else 'is STILL RUNNING'} "
                     "(at least the 4 read, at most 2 more)")


def _pick_stop(tokens: list[str]) -> str:
    """A stop string the answer contains, first complete about a third of the way in (a '.' if one is
    there by then), so that a client that does not hang up there computes many tokens too many."""
    text = "".join(tokens[:len(tokens) // 3 + 1])
    if "." in text:
        return "."
    return next(t.strip() for t in reversed(tokens[:len(tokens) // 3 + 1]) if t.strip())


@checker
def check_stop_string(stream_until: Callable, engine, url: str, prompt: str = LONG_PROMPT,
                      stop: str | None = None) -> bool:
    """``stream_until(url, prompt, stop)``: greedy stream, hang up at the first ``stop``; the text up to it.

    ``stop=None`` picks one from the model's own greedy answer, so there is always something to check.
    """
    name = "stream_until"
    full = stream_generate(url, prompt, 64, 0.0)
    stop = _pick_stop(full.tokens) if stop is None else stop
    cut = full.text.find(stop)
    needed = next((i + 1 for i in range(full.n_tokens) if stop in "".join(full.tokens[:i + 1])), None)
    if cut < 0 or needed is None or needed + 4 > full.n_tokens:
        return say(False, name, f"cannot check: {stop!r} must appear well before the end of the greedy "
                                f"answer {full.text!r}")
    expected = full.text[:cut + len(stop)]
    got, generated, idle = _generated_by(engine, stream_until, name, url, prompt, stop)
    ok = say(got == expected, name, f"stop {stop!r}: {got!r} (expected {expected!r})")
    return ok & say(idle and generated <= needed + 2, name,
                     f"the engine generated {generated} tokens for {needed} needed, of {full.n_tokens} "
                     f"({'stopped' if idle else 'STILL RUNNING'}; at most 2 more than needed)")


def _probe_stub(wait_or_cancel: Callable) -> None:
    """Raise Todo if the function is still the stub (it raises NotImplementedError when awaited)."""
    async def answer():
        return "answer"

    async def run():
        work = answer()
        try:
            return await asyncio.wait_for(wait_or_cancel(None, work), 1.0)
        finally:
            work.close()

    try:
        off_thread(asyncio.run, run())
    except NotImplementedError:
        print("TODO  wait_or_cancel: not written yet (it raises NotImplementedError)")
        raise Todo from None
    except BaseException:
        pass  # e.g. it used the request, which is None here: the live checks below decide


@checker
def check_wait_or_cancel(wait_or_cancel: Callable, step_ms: float = 25.0) -> bool:
    """``async def wait_or_cancel(request, work)``: ``await work``'s result, or ``None`` once the client has
    gone (``http.disconnect`` from ``request.receive()``), with ``work`` cancelled.

    Runs it as the handler of ``lab.json_app`` on ``fake_engine`` (``step_ms`` per step), so the verdict
    counts engine tokens, not the time of a busy machine.
    """
    name = "wait_or_cancel"
    _probe_stub(wait_or_cancel)
    engine = fake_engine(prefill_ms=step_ms, step_ms=step_ms)
    server = start_json_app(engine, wait_or_cancel, name="check-wait-or-cancel")
    try:
        response = httpx.post(server.url + "/generate", json={"prompt": "a", "max_tokens": 4}, timeout=30)
        text = response.json().get("text") if response.status_code == 200 else response.text[:80]
        ok = say(text == " one two three four", name, f"a client that stays gets {response.status_code} "
                                                      f"{text!r} (expected 200 ' one two three four')")
        if not ok:
            return False
        ask = 100
        run = hang_up(engine, server.url, stream=False, after_s=8 * step_ms / 1000, max_tokens=ask,
                      linger_s=4 * step_ms / 1000, interval_ms=2.0)
        # The step in flight when the client left, one more while the cancel crosses to the engine thread,
        # and two of margin for a busy machine: 4. A handler that does not listen computes ~90 more.
        ok &= say(run.timed_out and run.after_left <= 4, name,
                  f"a client that gave up after {run.hangup_ms:.0f} ms (timeout fired: {run.timed_out}): the "
                  f"engine computed {run.after_left} tokens after it left, {run.generated} of {ask} in all "
                  f"(at most 4 after)")
        return ok
    finally:
        from ...serve.background import stop

        stop("check-wait-or-cancel")
