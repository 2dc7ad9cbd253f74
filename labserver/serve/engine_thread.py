"""The engine thread: one long-lived thread owns every torch call and runs one loop over the engine's phases.

Why a dedicated thread: on a CPU, PyTorch keeps an OpenMP thread team per calling thread. Running each
decode step on whichever pool thread is free (the first streaming version's ``run_in_executor(None, next, gen)``) makes
every step ~1.6x slower on a 2-core machine and drops ``inference_mode``. SGLang runs its scheduler in
its own thread for the same reason.

How requests flow: ``stream()`` puts a ``Request`` on a thread-safe inbox and awaits a per-request
``asyncio.Queue``. Between two forwards the loop (``EngineThread._run``) takes what arrived
(``Engine.begin`` encodes it; a bad prompt goes straight back as its error), drops the cancelled requests,
asks its *policy* (``policies.TurnTaking`` or ``policies.Batched``) which sequences run next, runs that
forward (``Engine.prefill_steps`` or ``Engine.decode_step``), hands each event back with
``loop.call_soon_threadsafe`` and retires the finished sequences (``Engine.end`` frees their slots).
Closing the async generator (a client disconnect) sets the request's cancel flag; the loop checks it
before the next forward, so at most one more token is computed, and a request cancelled while it waits
is never prefilled. A failed forward fails the sequences in it; the loop goes on. ``close()`` releases
everyone with ``DONE``.

The thread starts in ``start()``, never in the constructor, so an app that is never served leaves no
thread behind: the FastAPI lifespan calls it, and ``submit`` (so ``stream``, ``generate``) calls it on
first use, for the Flask app's callers and scripts.

Left out: admission limits (``limits.py``), priorities, an engine in another process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import SamplingParams
from ..engine.engine import Completion, collect
from ..engine.protocols import EngineProtocol
from ..engine.sequence import Sequence
from .policies import Policy, Step, TurnTaking

DONE = object()  # end-of-stream marker; a sentinel, never StopIteration (asyncio cannot carry that)
_STOP = object()
STALLED_WAIT_S = 0.005  # requests wait but none can run (no free slot): look at the inbox this often


@dataclass(eq=False)  # compared by identity: two requests for the same prompt are two requests
class Request:
    prompt: str | list[int]
    params: SamplingParams
    sink: Callable[[Any], None]  # called on the engine thread with each event, an exception, or DONE
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: Sequence | None = None  # made on the engine thread by ``Engine.begin``


class EngineThread:
    """Owns ``engine`` on one thread that runs ``policy`` (default ``TurnTaking``); the backend doors are
    ``stream`` (async), ``complete``, ``generate`` (blocking), ``running``, ``start``, ``close``."""

    def __init__(self, engine: EngineProtocol, policy: Policy | None = None, name: str = "labserver-engine"):
        self.engine, self.name = engine, name
        self.policy = policy if policy is not None else TurnTaking()  # an empty policy is falsy (len 0)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()  # orders start, submit and close

    @property
    def kind(self) -> str:
        return self.policy.kind

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "EngineThread":
        """Start the engine thread (once; later calls do nothing). A closed backend cannot start again."""
        with self._lock:
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self._closed:
            raise RuntimeError("the engine thread has stopped")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.engine.config.threads)  # the setting is per calling thread
        wait: float | None = None  # idle: block until a request arrives
        while self._take_arrivals(wait):
            for req in self.policy:
                if req.cancel.is_set():
                    self._retire(req, DONE)
            step = self.policy.schedule(self.engine.runner.free_slots)
            if step is not None:
                self._forward(step)
            wait = 0 if step is not None else STALLED_WAIT_S if len(self.policy) else None
        self._shutdown()

    def _take_arrivals(self, wait: float | None) -> bool:
        """Admit everything in the inbox, waiting up to ``wait`` seconds for a first item (None: for ever);
        False once ``close`` asked the loop to stop."""
        try:
            item = self._inbox.get(block=wait != 0, timeout=wait or None)
            while True:
                if item is _STOP:
                    return False
                self._admit(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _admit(self, req: Request) -> None:
        if req.cancel.is_set():
            return req.sink(DONE)
        try:
            req.seq = self.engine.begin(req.prompt, req.params, req.cancel)
        except Exception as exc:  # e.g. PromptTooLong: the caller re-raises it
            return req.sink(exc)
        self.policy.add(req)

    def _forward(self, step: Step) -> None:
        seqs = [req.seq for req in step.requests]
        try:
            if step.prefill:
                events = self.engine.prefill_steps(seqs)
            else:
                events = self.engine.decode_step(seqs, batched=self.policy.batched)
        except Exception as exc:  # a failed forward fails every sequence that was in it
            for req in step.requests:
                self._retire(req, exc)
            return
        for req, event in zip(step.requests, events):
            if event is not None:
                req.sink(event)
            if req.seq.finished:
                self._retire(req, DONE)

    def _retire(self, req: Request, last: Any) -> None:
        self.policy.remove(req)
        finish = self.engine.end(req.seq)  # frees its cache slot before the next forward
        if last is DONE and req.seq.finished:
            req.sink(finish)
        req.sink(last)

    def _shutdown(self) -> None:
        for req in self.policy:
            self.policy.remove(req)
            self.engine.end(req.seq)
            req.sink(DONE)

    # -- the doors, called from other threads -------------------------------------------------------
    def submit(self, prompt, params: SamplingParams, sink: Callable[[Any], None]) -> Request:
        """Queue a request for the engine thread (starting it on first use); ``sink`` gets its items."""
        req = Request(prompt, params, sink)
        with self._lock:
            self._start_locked()
            if not self._thread.is_alive():
                raise RuntimeError("the engine thread has stopped")
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
        """Stop the loop after its current forward; every request still in it ends with ``DONE``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._inbox.put(_STOP)  # after every request submitted so far: each gets an answer
        if thread is not None:
            thread.join(timeout)
