"""Notebook 3's experiments (the event loop): a heartbeat that shows a blocked loop, the StopIteration
trap of the server's first streaming version (each ``next(gen)`` sent to a thread pool with
``run_in_executor``) run safely, and grad mode lost between threads.

    >>> try_stream(sentinel_stream, lambda: iter("abc")).outcome
    'completed'
    >>> try_stream(stop_iteration_stream, lambda: iter("abc"), timeout_s=0.3).outcome  # never returns
    'hung'

Everything that needs its own event loop (the trap, the heartbeat) runs it on a helper thread, so it
works the same in a script and in a Jupyter kernel, whose loop is already running (no nest_asyncio).
The notebook reaches these names as ``lab.NAME``, with ``measure``, ``runs_table``, ``plot_runs`` and
``ThreadRecorder`` (which thread ran each step) from ``runs``, and the display helpers. Left out: anything the server uses; the server never imports it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..config import SamplingParams
from ..engine.loading import off_thread
from .display import LABELS, PROMPT, print_table, show_source
from .runs import ThreadRecorder, measure, plot_runs, runs_table
from .sizing import measure_speed, probe_interval_ms, tokens_for

__all__ = ["LABELS", "PROMPT", "print_table", "show_source", "measure", "plot_runs", "runs_table",
           "heartbeat_gaps", "stop_iteration_stream", "sentinel_stream", "DONE", "TrapResult", "try_stream",
           "inference_mode_stream", "InferenceModeDemo", "inference_mode_steps", "ThreadRecorder",
           "two_streams_with_heartbeat", "measure_speed", "probe_interval_ms", "tokens_for"]

DONE = object()  # the sentinel of `sentinel_stream`


def heartbeat_gaps(work: Callable[[], Any], offload: bool, interval_ms: float = 5.0) -> list[float]:
    """Gaps (ms) between the beats of a coroutine that wakes every ``interval_ms``, while ``work()`` runs.

    ``offload=False`` calls ``work()`` inside a coroutine on the loop (what the naive server does);
    ``offload=True`` awaits it in a worker thread (``asyncio.to_thread``). A beat that is late by hundreds
    of ms means the loop could answer nobody during that time. Runs on a fresh loop in a helper thread.
    """
    async def main():
        beats, running = [], True

        async def heartbeat():
            while True:
                beats.append(time.perf_counter())  # one beat after the work, too: the last gap counts
                if not running:
                    return
                await asyncio.sleep(interval_ms / 1000)

        async def job():
            if offload:
                return await asyncio.to_thread(work)
            return work()

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(3 * interval_ms / 1000)  # the heartbeat is going before the work starts
        await job()
        running = False
        await beat
        return [(b - a) * 1000 for a, b in zip(beats, beats[1:])]

    return off_thread(asyncio.run, main())


# -- the first streaming version's StopIteration trap --------------------------------------------------
async def stop_iteration_stream(gen):
    """The first streaming version's loop: each next(gen) in the default thread pool, stop on StopIteration."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            item = await loop.run_in_executor(None, next, gen)
        except StopIteration:  # never reached: asyncio cannot put a StopIteration into a Future
            break
        yield item


async def sentinel_stream(gen):
    """The fix: next(gen, DONE) returns a sentinel at the end instead of raising StopIteration."""
    loop = asyncio.get_running_loop()
    while (item := await loop.run_in_executor(None, next, gen, DONE)) is not DONE:
        yield item


@dataclass
class TrapResult:
    outcome: str                  # "completed", "hung" (timed out) or "error"
    items: list = field(default_factory=list)
    elapsed_s: float = 0.0
    asyncio_errors: list[str] = field(default_factory=list)  # what the loop's exception handler saw
    error: str | None = None

    def __str__(self) -> str:
        said = f"; asyncio logged: {self.asyncio_errors[0]}" if self.asyncio_errors else ""
        failed = f"; raised {self.error}" if self.error else ""
        return f"{self.outcome} after {self.elapsed_s:.2f} s with {len(self.items)} items{said}{failed}"


def try_stream(stream: Callable[[Any], Any], make_gen: Callable[[], Iterator], timeout_s: float = 2.0) -> TrapResult:
    """Consume ``stream(make_gen())`` (an async generator function) on a fresh loop, for at most ``timeout_s``.

    It can never hang the caller: the loop runs on a helper thread and ``asyncio.wait_for`` gives up after
    ``timeout_s``. Errors the loop swallows (raised in callbacks, where no ``await`` sees them) are collected.
    """
    result = TrapResult("hung")

    async def consume():
        async for item in stream(make_gen()):
            result.items.append(item)

    async def main():
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, ctx: result.asyncio_errors.append(repr(ctx.get("exception") or ctx["message"])))
        try:
            await asyncio.wait_for(consume(), timeout_s)
            result.outcome = "completed"
        except asyncio.TimeoutError:
            result.outcome = "hung"
        except Exception as exc:
            result.outcome, result.error = "error", repr(exc)

    start = time.perf_counter()
    off_thread(asyncio.run, main())
    result.elapsed_s = time.perf_counter() - start
    return result


# -- grad mode is thread-local ---------------------------------------------------------------------------
def inference_mode_stream(engine, prompt: str = PROMPT, steps: int = 6):
    """A generator as the first streaming version wrote it: the whole loop inside one
    ``with torch.inference_mode()``.

    Yields, per decode step, which thread ran it, whether inference mode / grad mode were on there, whether
    autograd recorded a graph for the logits, and the step's time.
    """
    import torch
    from transformers import DynamicCache

    ids = engine.encode(prompt)
    with torch.inference_mode():
        cache = DynamicCache(config=engine.model.config)
        logits = engine.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            token = int(logits[0, -1].argmax())
            logits = engine.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
            yield {"step": step, "thread": threading.current_thread().name,
                   "inference_mode": torch.is_inference_mode_enabled(), "grad_enabled": torch.is_grad_enabled(),
                   "graph_recorded": logits.requires_grad, "step_ms": round((time.perf_counter() - t0) * 1000, 1)}


@dataclass
class InferenceModeDemo:
    steps: list[dict]                 # one row per decode step
    left_in_inference_mode: dict      # thread -> in inference mode while the generator waits between steps?


def inference_mode_steps(engine, prompt: str = PROMPT, steps: int = 6, hop: bool = True) -> InferenceModeDemo:
    """Drive ``inference_mode_stream`` with ``next()`` calls sent to worker threads, as ``run_in_executor`` does.

    ``hop=True`` alternates between two single-thread pools, one way a shared pool hands out its threads
    (``run_in_executor`` promises no particular thread); ``hop=False`` keeps every step on one thread.
    An error inside a step ends the demo and is recorded in that step's row.
    """
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # engine.model may load the transformers model now: no widget in a notebook
    _ = engine.model  # loaded here, outside the steps it would otherwise slow down
    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"pool-{i}") for i in range(2 if hop else 1)]
    gen = inference_mode_stream(engine, prompt, steps)
    rows = []
    try:
        for i in range(steps):
            try:
                rows.append(pools[i % len(pools)].submit(next, gen).result())
            except Exception as exc:
                rows.append({"step": i + 1, "error": f"{type(exc).__name__}: {exc}"[:120]})
                break
        left = {f"pool-{i}_0": pool.submit(torch.is_inference_mode_enabled).result() for i, pool in enumerate(pools)}
    finally:
        pools[0].submit(gen.close).result()
        for pool in pools:
            pool.shutdown()
    return InferenceModeDemo(rows, left)


def two_streams_with_heartbeat(stream_fn, engine, max_tokens: int, timeout_s: float) -> dict:
    """Two streams of ``stream_fn`` at once on a fresh loop, with a 5 ms heartbeat; on a helper thread."""
    out = {"items": [[], []], "beats": [], "outcome": "hung", "error": None}

    async def consume(i):
        async for item in stream_fn(engine.generate_stream("a b", SamplingParams(max_tokens))):
            out["items"][i].append(item)

    async def heartbeat(stop):
        while not stop.is_set():
            out["beats"].append(time.perf_counter())
            await asyncio.sleep(0.005)
        out["beats"].append(time.perf_counter())

    async def main():
        out["loop_thread"] = threading.current_thread().name
        stop = asyncio.Event()
        beat = asyncio.create_task(heartbeat(stop))
        try:
            await asyncio.wait_for(asyncio.gather(consume(0), consume(1)), timeout_s)
            out["outcome"] = "completed"
        except asyncio.TimeoutError:
            pass
        except Exception as exc:
            out["outcome"], out["error"] = "error", exc
        stop.set()
        await beat

    off_thread(asyncio.run, main())
    out["max_gap_ms"] = max((b - a) * 1000 for a, b in zip(out["beats"], out["beats"][1:]))
    return out
