"""The API process's side of the engine process: the ``"process"`` backend (vLLM V1's ``AsyncLLM`` and
``AsyncMPClient`` in one small class).

``EngineClient`` is a ``backends.Backend``: the base class gives it the doors every backend has
(``stream``, ``deliveries``, ``complete``, ``generate``) and runs the one output processor over the ids
the engine sends, so the pipeline and both wire formats cannot tell it from the engine thread:

- ``start()`` starts an engine process (``supervisor``) unless the frontend names one that runs,
  binds a PULL socket for its outputs, connects a DEALER (an identity of its own) to the engine's ROUTER,
  says ``Hello`` and waits for ``Ready``.
- ``submit()`` sends ``Add`` with the prompt's ids (tokenized here); its handle's ``abort`` (the client
  left) sends ``Abort``, and the engine stops the sequence before its next forward. Every ``ACK_EVERY``
  items read, ``took`` sends ``Taken``: a reader that stops reading stops costing decode steps
  ``MAX_BACKLOG`` items later, as on the engine thread.
- A receiving thread pulls ``Outputs`` and gives each request's ``TokenOutput``s and its end to that
  request's sink, as the engine thread would have. (vLLM pulls in an asyncio task; a thread serves any
  loop and the blocking ``generate`` alike.)
- A dead engine is noticed at once by its supervisor in this process, else within ``CHECK_S`` (its pid is
  gone) or ``SILENT_S`` (no beat): open streams end with ``EngineDeadError``, ``submit`` raises it, and
  ``Hello`` is repeated until a restarted engine answers ``Ready``.

Left out: retrying the requests a dead engine was running (they fail; the client may retry).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

import zmq

from ...config import SamplingParams
from ...engine.core import DONE
from ...engine.prompts import PromptTooLong
from ...engine.protocols import EngineDeadError, EngineHealth
from ...engine.sequence import Finish, TokenOutput
from ..backend import Backend
from . import messages as frames
from .core_proc import pid_exists
from .frontend import Frontend
from .supervisor import MAX_RESTARTS, EngineProcess, EngineStartError

POLL_MS = 50  # the receiving thread wakes at least this often
CHECK_S = 0.1  # how often it checks that the engine's pid still exists
SILENT_S = 20 * frames.BEAT_S  # an engine that sends nothing (not even its beat) this long is dead
HELLO_S = 0.2  # while no engine answers, say Hello again this often
READY_TIMEOUT_S = 30.0
# The engine's errors, raised here as the same class when this process knows it (else RuntimeError).
ERRORS = {"PromptTooLong": PromptTooLong, "ValueError": ValueError, "EngineDeadError": EngineDeadError}


class _Request:
    """One request sent to the engine process: where its items go, and how far its reader has read."""

    def __init__(self, client: "EngineClient", rid: int, sink: Callable[[Any], None]):
        self.client, self.rid, self.sink = client, rid, sink
        self.taken = 0

    def took(self, n: int = 1) -> None:
        """Count items read; every ``ACK_EVERY`` tell the engine (it holds back a reader that lags)."""
        before, self.taken = self.taken, self.taken + n
        if before // frames.ACK_EVERY != self.taken // frames.ACK_EVERY:
            self.client._send(frames.Taken(self.rid, self.taken))

    def abort(self) -> None:
        self.client._abort(self)

    def end(self, e: frames.End) -> list:
        if e.error_type is not None:
            return [ERRORS.get(e.error_type, RuntimeError)(e.error)]
        if e.finish_reason is not None:
            return [Finish(e.finish_reason, e.usage, e.timings), DONE]
        return [DONE]  # cancelled: no Finish, as on the engine thread


class EngineClient(Backend):
    """The ``"process"`` backend: an engine process (its own, or ``frontend.address``'s) behind ZMQ."""

    kind = "process"

    def __init__(self, frontend: Frontend, max_restarts: int = MAX_RESTARTS, stream_interval: int = 1):
        super().__init__(frontend, stream_interval)
        self.frontend, self.max_restarts = frontend, max_restarts
        self.process = None if frontend.address else EngineProcess(frontend.spec, max_restarts)
        self._requests: dict[int, _Request] = {}
        self._rids = itertools.count()
        self._lock = threading.RLock()  # start, close, the engine's state and the DEALER socket
        self._started = self._closed = False
        self._ready = threading.Event()
        self._reason: str | None = None  # why it cannot serve (dead, closed); None: it can, or can start
        self._up = False  # an engine answered Ready and has not died since
        self._pid: int | None = None
        self._restarts = self._running = self._waiting = self._prefilled = 0
        self._kv: dict | None = None
        self._no_progress_s = 0.0
        self._heard = 0.0
        self._thread: threading.Thread | None = None

    # -- state ------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        """Serving, or able to start on first use (as every backend); False once dead or closed."""
        return self._reason is None

    def health(self) -> EngineHealth:
        reason, restarts = self._reason, self._restarts
        if self.process is not None:
            reason = reason and (self.process.reason or reason)  # the supervisor knows restarts, give-ups
            restarts = max(restarts, self.process.restarts)
        return EngineHealth(alive=reason is None, pid=self._pid, backend=self.kind,
                            route=str(self.frontend.route.get("quant")), reason=reason,
                            running=self._running, waiting=self._waiting, restarts=restarts, prefilled=self._prefilled, kv=self._kv,
                            no_progress_s=self._no_progress_s if self._up else 0.0)

    # -- start and close --------------------------------------------------------------------------------
    def start(self) -> "EngineClient":
        """Start (or join) the engine process and wait for its ``Ready``; later calls do nothing."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine client is closed")
            if not self._started:
                self._connect()
                self._started = True
        if not self._ready.wait(READY_TIMEOUT_S):
            raise EngineStartError(f"the engine process did not answer within {READY_TIMEOUT_S:.0f} s")
        return self

    def _connect(self) -> None:
        if self.process is not None:
            self.process.on_death(self._engine_died)
            self.process.start()
        self._dir = tempfile.mkdtemp(prefix="labserver-api-")
        self._output = f"ipc://{self._dir}/output"
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self._output)
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.IDENTITY, f"api-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.connect(self.process.address if self.process is not None else self.frontend.address)
        self.frontend.client = self
        self._thread = threading.Thread(target=self._receive, name="labserver-engine-client", daemon=True)
        self._thread.start()
        self._send(frames.Hello(self._output, os.getpid()))

    def close(self, timeout: float = 5.0) -> None:
        """Say ``Bye`` (the engine aborts this process's requests), stop the engine process if it is ours;
        every request still open ends with ``DONE``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started, self._up, self._reason = self._started, False, "the engine client is closed"
            if started:
                self._send(frames.Bye())
            pending = list(self._requests.values())
            self._requests.clear()
        for state in pending:
            state.sink(DONE)
        if not started:
            return
        self._thread.join(timeout)
        self._dealer.close(linger=500)  # Bye gets 0.5 s to reach a live engine; a dead one costs that wait
        self._ctx.destroy(linger=0)
        if self.process is not None:
            self.process.close(timeout)
        if self.frontend.client is self:
            self.frontend.client = None
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the receiving thread ---------------------------------------------------------------------------
    def _receive(self) -> None:
        next_check = 0.0
        while not self._closed:
            if self._pull.poll(POLL_MS):
                msg = frames.decode_out(self._pull.recv())
                self._heard = time.monotonic()
                if isinstance(msg, frames.Ready):
                    self._engine_ready(msg)
                else:
                    self._deliver(msg)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_S
                self._check(now)

    def _engine_ready(self, msg: frames.Ready) -> None:
        with self._lock:
            if self._closed:
                return
            self._pid, self._restarts = msg.pid, msg.restarts
            self._up, self._reason = True, None
        self._ready.set()

    def _deliver(self, msg: frames.Outputs) -> None:
        self._running, self._waiting, self._no_progress_s = msg.running, msg.waiting, msg.no_progress_s
        self._prefilled, self._kv = msg.prefilled, msg.kv
        strays = set()
        for t in msg.tokens:
            state = self._requests.get(t.rid)
            if state is None:  # aborted here, or sent to an engine that died: the engine must stop it
                strays.add(t.rid)
                continue
            state.sink(TokenOutput(t.token_id, t.index, t.step_ms, t.prefill_time_ms, t.batch))
        for e in msg.ends:
            state = self._requests.pop(e.rid, None)
            if state is not None:
                for item in state.end(e):
                    state.sink(item)
        if strays:
            self._send(frames.Abort(sorted(strays)))

    def _check(self, now: float) -> None:
        if self._up:
            if not pid_exists(self._pid):
                self._engine_died(f"the engine process (pid {self._pid}) is gone")
            elif now - self._heard > SILENT_S:
                self._engine_died(f"the engine process (pid {self._pid}) has said nothing for {SILENT_S} s")
        elif now - self._heard > HELLO_S and not self._closed:
            self._heard = now  # ask again later: a restarted engine answers the next Hello with Ready
            self._send(frames.Hello(self._output, os.getpid()))

    def _engine_died(self, reason: str) -> None:
        """Fail every open request with ``EngineDeadError``; refuse new ones until an engine is ``Ready``."""
        with self._lock:
            if self._closed:
                return
            self._up, self._reason, self._running, self._waiting = False, reason, 0, 0
            self._ready.clear()
            doomed = list(self._requests.values())
            self._requests.clear()
        for state in doomed:
            state.sink(EngineDeadError(reason))

    def _send(self, msg) -> bool:
        """Send ``msg`` (if any) on the DEALER; False when ZMQ cannot queue it (no engine for long)."""
        with self._lock:  # a ZMQ socket is not thread-safe
            try:
                return msg is None or self._dealer.send(frames.encode(msg), zmq.NOBLOCK) is None
            except zmq.Again:
                return False

    # -- the door -------------------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, sink: Callable[[Any], None]) -> _Request:
        """Send one request to the engine (starting it on first use); ``sink`` gets its items.

        Raises ``EngineDeadError`` when no engine is alive (it died, and is restarting or gave up).
        """
        if not self._started:
            self.start()
        with self._lock:
            if not self._up:
                raise EngineDeadError(self.health().reason or "the engine process is not running")
            state = _Request(self, next(self._rids), sink)
            self._requests[state.rid] = state
            if not self._send(frames.Add(state.rid, ids, params)):
                del self._requests[state.rid]
                raise EngineDeadError("the engine process takes no requests")
        return state

    def _abort(self, state: _Request) -> None:
        with self._lock:
            if self._requests.pop(state.rid, None) is not None and self._up:
                self._send(frames.Abort([state.rid]))
