"""The backends the web apps can run an engine from, and ``make_backend``, which makes one by name.

Each is a ``backend.Backend`` (the doors they share: ``stream``, ``deliveries``, ``complete``,
``generate``, ``running``, ``alive``, ``health``, ``start``, ``close``) and supplies how outputs arrive:

- ``ThreadBackend`` (``"batched"``, the server's default, and ``"thread"``): the engine core on a thread
  of this process (``engine.core.EngineCore``), ``submit(ids, params, sink)``; its sink runs on the
  engine thread and hands each output to the event loop with ``loop.call_soon_threadsafe``.
- ``process.client.EngineClient`` (``"process"``): the same engine core in a process of its own, behind ZMQ.
- The lab's variants, kept so it can measure them: ``ExecutorBackend``, the first streaming version's
  pattern (each ``next(gen)`` sent to a thread pool with ``loop.run_in_executor``; the event loop stays
  free, but every step may land on another thread: one OpenMP team per calling thread makes steps slower;
  it uses a sentinel, ``next(gen, DONE)``: its original ``except StopIteration`` hangs forever after the
  last token, because asyncio cannot put a ``StopIteration`` into a Future), and ``BlockingBackend``, the
  naive one, calling the engine inside ``async def``: tokens still trickle out, but the event loop is
  blocked during every step, so ``/health`` waits. Neither is meant for serving.

Left out: stop strings (the OpenAI wire format's), admission limits (``limits``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Executor

from ..config import SamplingParams
from ..engine.core import DONE, EngineCore
from ..engine.sequence import Completion
from ..engine.protocols import EngineHealth, EngineProtocol
from ..engine.scheduler import Batched, TurnTaking
from .backend import Backend


class ThreadBackend(Backend):
    """The engine core on a thread of this process, with the ``Batched`` or ``TurnTaking`` policy."""

    def __init__(self, engine: EngineProtocol, policy=None, stream_interval: int = 1, core: EngineCore | None = None):
        super().__init__(engine, stream_interval)
        self.core = core or EngineCore(engine, policy)

    @property
    def kind(self) -> str:
        return self.core.kind

    @property
    def alive(self) -> bool:
        return self.core.alive

    def health(self) -> EngineHealth:
        return self.core.health()

    def start(self) -> "ThreadBackend":
        self.core.start()
        return self

    def submit(self, ids, params: SamplingParams, sink):
        return self.core.submit(ids, params, sink, max_backlog=self.core.max_backlog)

    def close(self, timeout: float = 5.0) -> None:
        self.core.close(timeout)


class _DirectBackend(Backend):
    """The lab's variants: the engine runs wherever the caller's code does, one generator per request."""

    kind = "direct"

    def health(self) -> EngineHealth:
        """Always alive: the engine runs in the caller's own process and thread, so it dies with it."""
        return EngineHealth(alive=True, pid=os.getpid(), backend=self.kind, route=self.engine.route["quant"],
                            running=self.engine.running, kv=self.engine.kv_report())

    def generate(self, prompt, params: SamplingParams) -> Completion:
        return self.engine.generate(prompt, params)


class ExecutorBackend(_DirectBackend):
    """``await loop.run_in_executor(executor, next, gen, DONE)`` per token (``None``: asyncio's default pool)."""

    kind = "executor"

    def __init__(self, engine: EngineProtocol, executor: Executor | None = None, stream_interval: int = 1):
        super().__init__(engine, stream_interval)
        self.executor = executor

    async def outputs(self, ids, params: SamplingParams):
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        gen = self.engine.steps(ids, params, cancel)
        # A step may still be running on a pool thread when the client leaves; a generator cannot be
        # closed while it executes, so closing waits for this lock on a pool thread too.
        lock = threading.Lock()

        def step():
            with lock:
                return next(gen, DONE)

        def close():
            with lock:
                gen.close()

        try:
            while (item := await loop.run_in_executor(self.executor, step)) is not DONE:
                if self.stopping is not None:  # the server stops (end_all): no sink to hand it to
                    raise self.stopping
                yield [item]
            yield [DONE]
        finally:
            cancel.set()
            loop.run_in_executor(self.executor, close)


class BlockingBackend(_DirectBackend):
    """Runs the engine on the event loop's own thread: the mistake the lab shows on purpose."""

    kind = "blocking"

    async def outputs(self, ids, params: SamplingParams):
        gen = self.engine.steps(ids, params)
        try:
            for item in gen:  # each next() blocks the whole event loop for one model step
                if self.stopping is not None:  # the server stops (end_all): no sink to hand it to
                    raise self.stopping
                yield [item]
                await asyncio.sleep(0)  # lets the response send this token; /health still waits per step
            yield [DONE]
        finally:
            gen.close()


def _process(engine, stream_interval: int = 1) -> Backend:
    from .process.client import EngineClient  # zmq and msgspec only for those who ask for a process
    from .process.frontend import Frontend

    return EngineClient(Frontend.of(engine), stream_interval=stream_interval)


BACKENDS = {
    "batched": lambda engine, **kw: ThreadBackend(engine, Batched.of(engine.config), **kw),
    "process": _process,
    "thread": lambda engine, **kw: ThreadBackend(engine, TurnTaking.of(engine.config), **kw),
    "executor": ExecutorBackend,
    "blocking": BlockingBackend,
}


def make_backend(engine: EngineProtocol, kind: str = "auto", stream_interval: int = 1) -> Backend:
    """``"batched"`` or ``"thread"`` (the server's designs: one engine thread, streams batched or taking
    turns), ``"process"`` (the batched engine in a process of its own), ``"executor"`` (the first streaming
    version's) or ``"blocking"`` (naive); ``"auto"`` is ``"batched"``.

    Nothing starts here: a ``ThreadBackend`` starts its thread, an ``EngineClient`` its engine process, in
    ``start()`` or on first use.
    """
    try:
        make = BACKENDS["batched" if kind == "auto" else kind]
    except KeyError:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {kind!r}") from None
    return make(engine, stream_interval=stream_interval)
