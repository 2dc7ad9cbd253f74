"""The engine core: one long-lived thread owns every torch call and runs one loop over the engine's phases.

Why a dedicated thread: on a CPU, PyTorch keeps an OpenMP thread team per calling thread. Running each
decode step on whichever pool thread is free (the first streaming version's ``run_in_executor(None, next,
gen)``) makes every step ~1.6x slower on a 2-core machine and drops ``inference_mode``. SGLang runs its
scheduler in its own thread for the same reason.

How requests flow: ``submit(ids, params, sink)`` puts a ``Request`` on a thread-safe inbox. Between two
forwards the loop (``EngineCore._loop``) takes what arrived (``Engine.begin``; a bad prompt goes straight
back as its error), drops the cancelled requests, asks its *policy* (``scheduler.TurnTaking`` or
``scheduler.Batched``) which sequences run next and how many tokens of each (decode steps, prompts,
chunks of prompts: the KV memory they need is admitted or preempted by the policy), runs that forward
(``Engine.step``), hands each ``TokenOutput`` (an id, no text) to the request's ``sink`` and retires the
finished sequences (``Engine.end`` frees their KV blocks). ``Request.abort`` (the client left) sets the
request's cancel flag; the loop checks it before the next forward, so at most one more token is computed,
and a request cancelled while it waits is never prefilled. A failed forward fails the sequences in it; the
loop goes on. ``close()`` releases everyone with ``DONE``.

Whoever submits turns the ids into text: the backends of ``serve/backends.py`` (on this process's event
loop) or the engine process's client (in the API process), each through ``output.OutputProcessor``.

Failures: a request whose consumer leaves ``max_backlog`` items unread (its client stopped reading) sits
out the decode steps until it reads again (``Request.took``), so its queue stays bounded. A failure of the
loop itself (outside any forward) kills the engine: every open request gets ``EngineDeadError`` at once,
and so does every later ``submit``. ``health()`` says whether the thread lives and how long its loop has
not come round while it has work (a forward that never ends).

The thread starts in ``start()`` or on first use, never in the constructor, so an engine core that is
never used leaves no thread behind.

Left out: admission limits (``serve/limits/``), priorities, text, restarting a dead engine (the process
backend's supervisor does).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import SamplingParams
from .protocols import EngineProtocol
from .sequence import Sequence
from .protocols import EngineDeadError, EngineHealth
from .scheduler import Policy, Step, TurnTaking

logger = logging.getLogger(__name__)

DONE = object()  # end-of-stream marker; a sentinel, never StopIteration (asyncio cannot carry that)
_STOP = object()
STALLED_WAIT_S = 0.005  # requests wait but none can run (no free slot): look at the inbox this often
# Unread events before a stream sits out decode steps: the web layer's buffers (64 KiB and more) are full by then.
MAX_BACKLOG = 64


@dataclass(eq=False)  # compared by identity: two requests for the same prompt are two requests
class Request:
    prompt: str | list[int]
    params: SamplingParams
    sink: Callable[[Any], None]  # called on the engine thread with each event, an exception, or DONE
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: Sequence | None = None  # made on the engine thread by ``Engine.begin``
    max_backlog: int | None = None  # None: the consumer keeps up by itself (a blocking ``generate``)
    sent: int = 0  # items given to ``sink``; written by the engine thread only
    taken: int = 0  # items the consumer has read; written by the consumer only

    def abort(self) -> None:
        """Stop this request before the engine's next forward (its client left)."""
        self.cancel.set()

    def took(self, n: int = 1) -> None:
        """The consumer has read ``n`` more items (called on the consumer's thread only)."""
        self.taken += n

    @property
    def held(self) -> bool:  # its consumer is ``max_backlog`` items behind: it sits out decode steps
        return self.max_backlog is not None and self.sent - self.taken >= self.max_backlog


class EngineCore:
    """Owns ``engine`` on one thread that runs ``policy`` (default ``TurnTaking``): ``submit``, ``running``,
    ``health``, ``start``, ``close``."""

    def __init__(self, engine: EngineProtocol, policy: Policy | None = None, name: str = "labserver-engine",
                 max_backlog: int = MAX_BACKLOG):
        self.engine, self.name, self.max_backlog = engine, name, max_backlog
        self.policy = policy if policy is not None else TurnTaking()  # an empty policy is falsy (len 0)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed, self._dead = False, None  # _dead: why the loop died, once it has
        self._open: set[Request] = set()  # submitted and not yet given their last item
        self._lock = threading.Lock()  # orders start, submit, close and death
        # Whether the loop is blocked on an empty inbox with nothing to do; when it last came round.
        self._idle, self._beat_at = True, time.monotonic()

    @property
    def kind(self) -> str:
        return self.policy.kind

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> EngineHealth:
        """Alive (running, or startable on first use), where, and how long the loop has not come round."""
        reason = self._dead or ("the engine thread has stopped" if self._closed else None)
        waiting = self._inbox.qsize() + sum(r.seq is not None and not r.seq.running for r in list(self.policy.requests))
        return EngineHealth(alive=reason is None, pid=os.getpid(), backend=self.kind, route=self.engine.route["quant"],
                            reason=reason, running=self.engine.running, waiting=waiting,
                            no_progress_s=0.0 if self._idle else time.monotonic() - self._beat_at,
                            prefilled=self.engine.prompts_prefilled, kv=self.engine.kv_report())

    def start(self) -> "EngineCore":
        """Start the engine thread (once; later calls do nothing). A closed backend cannot start again."""
        with self._lock:
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._closed:
            raise RuntimeError("the engine thread has stopped")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # outside any forward: the engine itself is broken
            logger.exception("the engine thread failed")
            self._die(f"the engine thread died: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self.engine.config.threads)  # the setting is per calling thread
        wait: float | None = None  # idle: block until a request arrives
        while True:
            self._idle = wait is None
            more = self._take_arrivals(wait)
            self._idle, self._beat_at = False, time.monotonic()
            if not more:
                break
            for req in self.policy:
                if req.cancel.is_set():
                    self._retire(req, DONE)
            step = self._next_step()
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
            return self._send(req, DONE)
        try:
            req.seq = self.engine.begin(req.prompt, req.params, req.cancel)
        except Exception as exc:  # e.g. PromptTooLong: the caller re-raises it
            return self._send(req, exc)
        self.policy.add(req)

    def _next_step(self) -> Step | None:
        """The policy's next step without the decode steps of held requests; asks again (once per
        request) if nothing is left."""
        for _ in range(max(1, len(self.policy))):
            step = self.policy.schedule(self.engine)
            if step is None:
                return None
            step.work = [(req, n) for req, n in step.work if not (req.held and req.seq.decoding)]
            if step.work:
                return step
        return None

    def _forward(self, step: Step) -> None:
        try:
            outputs = self.engine.step([(req.seq, n) for req, n in step.work], batched=self.policy.batched)
        except Exception as exc:  # a failed forward fails every sequence that was in it
            for req in step.requests:
                self._retire(req, exc)
            return
        for req, out in zip(step.requests, outputs):
            if out is not None:
                self._send(req, out)
            if req.seq.finished:
                self._retire(req, DONE)

    def _retire(self, req: Request, last: Any) -> None:
        self.policy.remove(req)
        finish = self.engine.end(req.seq)  # frees its cache slot before the next forward
        if last is DONE and req.seq.finished:
            self._send(req, finish)
        self._send(req, last)

    def _send(self, req: Request, item: Any) -> None:
        req.sent += 1
        if item is DONE or isinstance(item, BaseException):
            with self._lock:
                self._open.discard(req)
        req.sink(item)

    def _shutdown(self) -> None:
        for req in self.policy:
            self.policy.remove(req)
            self.engine.end(req.seq)
            self._send(req, DONE)

    def _die(self, reason: str) -> None:  # every open request hears it: running, waiting or in the inbox
        with self._lock:
            self._dead, self._idle = reason, True
            open_requests, self._open = list(self._open), set()
        self.policy.requests.clear()
        for req in open_requests:
            try:  # tell it first; then free its slot if the engine still can (the loop failed, maybe not it)
                req.sink(EngineDeadError(reason))
                if req.seq is not None:
                    self.engine.end(req.seq)
            except Exception:  # one failure must not keep the others waiting
                logger.exception("could not end a request of the dead engine thread")

    # -- the doors, called from other threads -------------------------------------------------------
    def submit(self, prompt, params: SamplingParams, sink: Callable[[Any], None],
               max_backlog: int | None = None) -> Request:
        """Queue a request for the engine thread (starting it on first use); ``sink`` gets its items, on the
        engine thread: each ``TokenOutput``, the ``Finish``, then ``DONE`` (or an exception instead).

        ``max_backlog``: items the consumer may leave unread (it reports reading with ``Request.took``)
        before the request sits out decode steps; None: it keeps up by itself.
        """
        req = Request(prompt, params, sink, max_backlog=max_backlog)
        with self._lock:
            self._start_locked()
            if not self._thread.is_alive():
                raise EngineDeadError("the engine thread is not running")
            self._open.add(req)
            self._inbox.put(req)
        return req

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
