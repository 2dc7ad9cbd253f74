"""Other places to run the engine from an async server, kept so the lab can measure them.

- ``ExecutorBackend``: the first streaming version's pattern, each ``next(gen)`` sent to a thread pool with
  ``loop.run_in_executor``. The event loop stays free, but every step may land on a different thread
  (slower steps on a CPU: one OpenMP team per calling thread). It uses a sentinel (``next(gen, DONE)``):
  its original ``except StopIteration`` hangs forever after the last token, because asyncio cannot put a
  ``StopIteration`` into a Future.
- ``BlockingBackend``: the naive one, calling the engine directly inside ``async def``. Tokens still
  trickle out, but the event loop is blocked during every step, so ``/health`` waits.

Both offer what ``engine.protocols.Backend`` says, as ``engine_thread.EngineThread`` does (``stream``,
``complete``, ``generate``, ``running``, ``health``, ``start``, ``close``). Neither is meant for serving;
``make_backend`` picks a backend by name.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Executor

from ..config import SamplingParams
from ..engine.engine import Completion, collect
from ..engine.protocols import Backend, EngineProtocol
from ..engine.core import DONE, EngineThread
from ..engine.protocols import EngineHealth
from ..engine.scheduler import Batched, TurnTaking


class _DirectBackend:
    kind = "direct"

    def __init__(self, engine: EngineProtocol):
        self.engine = engine

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def alive(self) -> bool:
        return True  # no thread of its own: it runs wherever its caller does

    def health(self) -> EngineHealth:
        """Always alive: the engine runs in the caller's own process and thread, so it dies with it."""
        return EngineHealth(alive=True, pid=os.getpid(), backend=self.kind, route=self.engine.route["quant"],
                            running=self.engine.running)

    def start(self) -> "_DirectBackend":
        return self

    async def complete(self, prompt, params: SamplingParams) -> Completion:
        return collect([item async for item in self.stream(prompt, params)])

    def generate(self, prompt, params: SamplingParams) -> Completion:
        return self.engine.generate(prompt, params)

    def close(self) -> None:
        pass


class ExecutorBackend(_DirectBackend):
    """``await loop.run_in_executor(executor, next, gen, DONE)`` per token (``None``: asyncio's default pool)."""

    kind = "executor"

    def __init__(self, engine: EngineProtocol, executor: Executor | None = None):
        super().__init__(engine)
        self.executor = executor

    async def stream(self, prompt, params: SamplingParams):
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        gen = self.engine.generate_stream(prompt, params, cancel)
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
                yield item
        finally:
            cancel.set()
            loop.run_in_executor(self.executor, close)


class BlockingBackend(_DirectBackend):
    """Runs the engine on the event loop's own thread: the mistake the lab shows on purpose."""

    kind = "blocking"

    async def stream(self, prompt, params: SamplingParams):
        gen = self.engine.generate_stream(prompt, params)
        try:
            for item in gen:  # each next() blocks the whole event loop for one model step
                yield item
                await asyncio.sleep(0)  # lets the response send this token; /health still waits per step
        finally:
            gen.close()


def _process(engine) -> Backend:
    from .process.client import EngineClient  # zmq and msgspec only for those who ask for a process
    from .process.frontend import Frontend

    return EngineClient(Frontend.of(engine))


BACKENDS = {
    "batched": lambda engine: EngineThread(engine, Batched(max_batch=engine.config.max_batch)),
    "process": _process,
    "thread": lambda engine: EngineThread(engine, TurnTaking()),
    "executor": ExecutorBackend,
    "blocking": BlockingBackend,
}


def make_backend(engine: EngineProtocol, kind: str = "auto") -> Backend:
    """``"batched"`` or ``"thread"`` (the server's designs: one engine thread, streams batched or taking
    turns), ``"process"`` (the batched engine in a process of its own, ``engine_client.EngineClient``),
    ``"executor"`` (the first streaming version's) or ``"blocking"`` (naive); ``"auto"`` is ``"batched"``.

    Nothing starts here: an ``EngineThread`` starts its thread, an ``EngineClient`` its engine process,
    in ``start()`` or on first use.
    """
    try:
        make = BACKENDS["batched" if kind == "auto" else kind]
    except KeyError:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {kind!r}") from None
    return make(engine)
