"""The engine thread: one long-lived thread owns every torch call and serves requests from a queue.

Why a dedicated thread: on a CPU, PyTorch keeps an OpenMP thread team per calling thread. Running each
decode step on whichever pool thread is free (the seed's ``run_in_executor(None, next, gen)``) makes
every step ~1.6x slower on a 2-core machine and drops ``inference_mode``. SGLang runs its scheduler in
its own thread for the same reason.

How requests flow: ``stream()`` puts a request on a thread-safe inbox and awaits a per-request
``asyncio.Queue``; the engine thread advances every active generator by one step in turn (so concurrent
streams interleave token by token) and hands each event back with ``loop.call_soon_threadsafe``. Closing
the async generator (a client disconnect) sets the request's cancel flag; the engine checks it before the
next step, so at most one more token is computed.

Left out: batching several sequences into one forward pass (``scheduler.BatchScheduler`` keeps these
doors and does that), priorities and admission limits (``limits.py``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import SamplingParams
from ..engine.engine import Completion, Finish, collect

DONE = object()  # end-of-stream marker; a sentinel, never StopIteration (asyncio cannot carry that)
_STOP = object()


@dataclass
class Request:
    prompt: str | list[int]
    params: SamplingParams
    sink: Callable[[Any], None]  # called on the engine thread with each event, an exception, or DONE
    cancel: threading.Event = field(default_factory=threading.Event)
    gen: Any = None  # EngineWorker: the engine's generator
    seq: Any = None  # BatchScheduler: the engine's Sequence
    started: bool = False  # EngineWorker: its generator has run its prefill (and holds a cache slot)


class EngineWorker:
    """Owns ``engine`` on one thread; ``stream`` (async) and ``generate`` (blocking) are its doors."""

    kind = "thread"

    def __init__(self, engine, name: str = "labserver-engine"):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: list[Request] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.engine.config.threads)  # the setting is per calling thread
        while True:
            try:
                # Block only when idle; otherwise just pick up whatever arrived since the last round.
                item = self._inbox.get() if not self._busy() else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._admit(item)
                continue  # drain the inbox before the next round of steps
            self._round()
        self._shutdown()

    def _busy(self) -> bool:
        return bool(self._active)

    def _round(self) -> None:
        """One step of every active stream, in turn: concurrent streams interleave token by token."""
        for req in list(self._active):
            self._advance(req)

    def _shutdown(self) -> None:
        for req in self._active:
            req.gen.close()
            req.sink(DONE)

    def _admit(self, req: Request) -> None:
        if req.cancel.is_set():
            req.sink(DONE)
            return
        try:
            self._start(req)
        except Exception as exc:  # e.g. PromptTooLong: the caller re-raises it
            req.sink(exc)

    def _start(self, req: Request) -> None:
        req.gen = self.engine.generate_stream(req.prompt, req.params, req.cancel)
        self._active.append(req)

    def _advance(self, req: Request) -> None:
        if req.cancel.is_set():
            return self._retire(req, DONE)
        if not req.started:  # its prefill takes a cache slot, so it waits while none is free
            if getattr(getattr(self.engine, "runner", None), "free_slots", 1) < 1:
                return
            req.started = True
        try:
            item = next(req.gen, DONE)
        except Exception as exc:
            return self._retire(req, exc)
        if item is DONE:
            return self._retire(req, DONE)
        req.sink(item)
        if isinstance(item, Finish):
            self._retire(req, DONE)

    def _retire(self, req: Request, last: Any) -> None:
        self._active.remove(req)
        req.gen.close()  # runs the generator's finally now, on this thread, so `running` drops at once
        req.sink(last)

    # -- the doors, called from other threads -------------------------------------------------------
    def submit(self, prompt, params: SamplingParams, sink: Callable[[Any], None]) -> Request:
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread has stopped")
        req = Request(prompt, params, sink)
        self._inbox.put(req)
        return req

    async def stream(self, prompt, params: SamplingParams):
        """Async generator of ``TokenEvent``s then a ``Finish``; re-raises engine errors."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                req.cancel.set()

        req = self.submit(prompt, params, sink)
        try:
            while (item := await events.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancel.set()

    async def complete(self, prompt, params: SamplingParams) -> Completion:
        return collect([item async for item in self.stream(prompt, params)])

    def generate(self, prompt, params: SamplingParams) -> Completion:
        """Blocking form for threads that are not an event loop (the Flask baseline, scripts)."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt, params, events.put)

        def items():
            while (item := events.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item

        try:
            return collect(items())
        finally:
            req.cancel.set()

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)
