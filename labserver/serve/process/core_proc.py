"""The engine core in its own process: the model, the scheduler and batching, fed over ZMQ.

This is the process side of vLLM V1's split (``EngineCoreProc`` in vllm/v1/engine/core.py). The process
loads the model itself from an ``EngineSpec`` (a config, or the fake runner's delays: something that
pickles, never a loaded model), runs the same ``engine.core.EngineCore`` with the ``Batched`` policy
the thread backend runs, and puts two sockets beside it:

- the main thread reads a ROUTER socket bound at ``address``: every API process's DEALER connects there
  (vLLM's API processes bind and the engine connects; here the engine binds, so a restarted engine and
  any number of API processes meet at one fixed address). ``Add`` becomes ``EngineCore.submit`` with
  the prompt's token ids, ``Abort`` sets the request's cancel flag (the engine thread drops it before its
  next forward, so at most one more token is computed);
- an output thread owns one PUSH socket per API process (connected to the PULL address its ``Hello``
  named) and sends what the engine thread's sinks queued, grouped per API process, one message per
  wake-up, with the engine's running and waiting counts; idle, it sends an empty ``Outputs`` every
  ``BEAT_S`` seconds.

The engine core never makes text: only ids and step times leave the process, and the API process's
output processor makes the text. If the engine thread dies, the process exits (code 3), so its
supervisor (``supervisor``) sees it and restarts it. Left out: data parallelism (several engine
processes), and shared memory for large inputs (prompts here are small).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace

import zmq

from ...config import QUANTS, EngineConfig
from ...engine.engine import Engine
from ...engine.sequence import Finish, TokenOutput
from . import messages as frames
from ...engine.core import DONE, MAX_BACKLOG, EngineCore
from ...engine.scheduler import Batched

ENGINE_THREAD_DIED = 3  # the exit code when the engine thread stops under the process


@dataclass(frozen=True)
class EngineSpec:
    """How to build the engine in another process: a config, or ``fake`` (``FakeRunner``'s delays)."""

    config: EngineConfig
    fake: dict | None = None  # {"prefill_ms", "step_ms", "fail_at"}

    @classmethod
    def of(cls, engine) -> "EngineSpec":
        """The spec that rebuilds ``engine``: the same fake delays, or the same config and weight format."""
        from ...engine.fake import FakeRunner

        runner = engine.runner
        if isinstance(runner, FakeRunner):
            return cls(engine.config, {"prefill_ms": runner.prefill_ms, "step_ms": runner.step_ms,
                                       "fail_at": runner.fail_at})
        quant = engine.route.get("quant")
        config = engine.config
        if config.quant == "auto" and quant in QUANTS:  # the route already measured: do not measure again
            config = replace(config, quant=quant)
        return cls(config)

    def build(self) -> Engine:
        if self.fake is not None:
            from ...engine.fake import fake_engine

            return fake_engine(config=self.config, **self.fake)
        return Engine.from_config(self.config)

    def tokenizer(self):
        """The engine's tokenizer, loaded without its weights (for the API processes)."""
        if self.fake is not None:
            from ...engine.fake import WordTokenizer

            return WordTokenizer()
        from ...engine.loading import model_folder
        from ...engine.tokenizer import load_tokenizer

        return load_tokenizer(model_folder(self.config))


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # PermissionError too: it exists


def run_engine_core(spec: EngineSpec, address: str, restarts: int, ready) -> None:
    """The engine process's main: load, bind, tell the supervisor through ``ready`` (a Pipe end), serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it closes us in order
    try:
        engine = spec.build()
    except Exception as exc:  # e.g. ModelNotFound: the supervisor raises it in the parent
        ready.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    info = frames.Ready(os.getpid(), engine.context_len, engine.route, restarts)
    core = EngineCoreProc(engine, address, info)
    ready.send(("ready", {"pid": info.pid, "context_len": info.context_len, "route": info.route}))
    ready.close()
    raise SystemExit(core.serve())


class EngineCoreProc:
    """The engine core's thread with its input loop (this thread) and its output thread."""

    def __init__(self, engine: Engine, address: str, info: frames.Ready):
        self.engine, self.info = engine, info
        self.thread = EngineCore(engine, Batched.of(engine.config), name="labserver-core")
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # (client, rid, item) from sinks; commands
        self.requests: dict[tuple[bytes, int], object] = {}  # (client, rid) -> core.Request
        self.clients: set[bytes] = set()  # the API processes that said Hello to this engine
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a request may end (on the engine thread) before submit returns

    def serve(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        self.thread.start()
        sender = threading.Thread(target=self._send_loop, name="labserver-core-out", daemon=True)
        sender.start()
        code, parent = 0, os.getppid()
        while not self._stop.is_set():
            if self.router.poll(100):
                client, payload = self.router.recv_multipart()
                self._handle(client, frames.decode_in(payload))
            if not self.thread.alive:
                code = ENGINE_THREAD_DIED
                break
            if os.getppid() != parent:  # the supervisor is gone (killed): nobody would ever stop us
                break
        self.thread.close()
        self._stop.set()
        sender.join(2)
        self.ctx.destroy(linger=0)
        return code

    def _handle(self, client: bytes, msg) -> None:
        if isinstance(msg, frames.Add):
            if client not in self.clients:  # sent to an engine that died, before this one: long failed
                return
            key = (client, msg.rid)

            def sink(item, key=key):
                if item is DONE or isinstance(item, BaseException):
                    with self._lock:
                        self.requests.pop(key, None)
                self.out.put((key, item))

            with self._lock:
                try:
                    # Its reader is in another process: it tells how far it has read with Taken.
                    self.requests[key] = self.thread.submit(msg.prompt, msg.params, sink, MAX_BACKLOG)
                except Exception as exc:  # the engine thread has stopped: this process is about to exit
                    self.out.put((key, exc))
        elif isinstance(msg, frames.Taken):
            req = self.requests.get((client, msg.rid))
            if req is not None:
                req.taken = msg.taken
        elif isinstance(msg, frames.Abort):
            for rid in msg.rids:
                req = self.requests.get((client, rid))
                if req is not None:
                    req.cancel.set()
        elif isinstance(msg, frames.Hello):
            self.clients.add(client)
            self.out.put((client, msg))
        elif isinstance(msg, frames.Bye):
            self._forget(client)
            self.out.put((client, msg))

    def _forget(self, client: bytes) -> None:
        """Cancel every request of ``client``; it must say Hello again before it sends more."""
        self.clients.discard(client)
        with self._lock:
            mine = [req for (owner, _), req in self.requests.items() if owner == client]
        for req in mine:
            req.cancel.set()

    # -- the output thread: the only user of the PUSH sockets ------------------------------------------
    def _send_loop(self) -> None:
        pushes: dict[bytes, zmq.Socket] = {}
        finishes: dict[tuple[bytes, int], Finish] = {}
        pids: dict[bytes, int] = {}  # the API processes' pids, from their Hello
        checked = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - checked > frames.BEAT_S:  # an API process killed without a Bye
                checked = time.monotonic()
                for client in [c for c, pid in pids.items() if pid and not pid_exists(pid)]:
                    pushes.pop(client).close(linger=0)
                    del pids[client]
                    self._forget(client)
            try:
                items = [self.out.get(timeout=frames.BEAT_S)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self.out.get_nowait())
                except queue.Empty:
                    break
            batches: dict[bytes, frames.Outputs] = {}
            new = lambda: frames.Outputs(0, 0, 0.0, [], [])  # noqa: E731
            for key, item in items:
                if isinstance(item, (frames.Hello, frames.Bye)):
                    self._connect(pushes, key, item)
                    if key in pushes:
                        pids[key] = item.pid
                    else:
                        pids.pop(key, None)
                    continue
                client, rid = key
                batch = batches.setdefault(client, new())
                if isinstance(item, TokenOutput):
                    batch.tokens.append(frames.Token(rid, item.token_id, item.index, item.step_ms,
                                                     item.prefill_time_ms, item.batch))
                elif isinstance(item, Finish):
                    finishes[key] = item
                elif isinstance(item, BaseException):
                    finishes.pop(key, None)
                    batch.ends.append(frames.End(rid, error_type=type(item).__name__, error=str(item)))
                else:  # DONE: after its Finish, if it finished; cancelled requests have none
                    fin = finishes.pop(key, None)
                    batch.ends.append(frames.End(rid) if fin is None else
                                      frames.End(rid, fin.finish_reason, fin.usage, fin.timings))
            health = self.thread.health()
            for client, push in list(pushes.items()):
                batch = batches.get(client) or new()
                batch.running, batch.waiting, batch.no_progress_s = health.running, health.waiting, health.no_progress_s
                batch.prefilled, batch.kv = health.prefilled, health.kv
                try:
                    push.send(frames.encode(batch), zmq.NOBLOCK)
                except zmq.Again:  # its API process is gone (or stopped reading): it would block us all
                    pushes.pop(client).close(linger=0)
                    pids.pop(client, None)
                    self._forget(client)  # it hears nothing more, so it counts us dead and says Hello
        for push in pushes.values():
            push.close(linger=0)

    def _connect(self, pushes: dict, client: bytes, msg) -> None:
        """``Hello``: connect a PUSH to the client's PULL (again only if the address changed: a repeated
        Hello must not drop what is in flight) and answer ``Ready``. ``Bye``: close it."""
        push = pushes.get(client)
        if push is not None and (isinstance(msg, frames.Bye) or push.last_endpoint != msg.output.encode()):
            pushes.pop(client).close(linger=0)
            push = None
        if isinstance(msg, frames.Hello):
            if push is None:
                push = pushes[client] = self.ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 0)
                push.connect(msg.output)
            push.send(frames.encode(self.info), zmq.NOBLOCK)
