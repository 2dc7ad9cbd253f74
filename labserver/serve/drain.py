"""Stopping the whole server without losing a stream silently: a graceful drain with a deadline.

When the server must stop (SIGTERM or SIGINT, or its engine gone for good), ``DrainingServer`` runs the
app's ``Drain`` on the event loop before uvicorn's own shutdown:

1. from then on a new generating request gets a 503 (``/health`` too, with the reason); the listening
   socket stays open meanwhile, so a client hears why instead of meeting a refused connection;
2. the requests already open may finish by themselves for ``drain_timeout_s`` (``--drain-timeout``);
3. those still open then end as on an engine's death (``Backend.end_all``): a stream gets an error event
   (``ServerStopping``, an ``EngineDeadError``) and ``[DONE]``, a JSON request a 503;
4. uvicorn's shutdown follows: it closes the listening socket and the idle connections and gives the
   last writes ``FINAL_WRITE_S`` before it cancels what is left; then the lifespan closes the backend.

The process then exits 0 after a signal (uvicorn's own handler would raise the signal again once it
stopped, and a SIGTERM would then kill the process: exit status 143), 1 after its engine failed for good,
so a supervisor such as systemd's ``Restart=on-failure`` tells a requested stop from a failure. A second
signal stops at once. uvicorn alone waits for open streams without end (or cuts them after
``timeout_graceful_shutdown`` with no last event): its app hears of the shutdown only in the lifespan,
after the connections are done. vLLM's ``--shutdown-timeout`` drains the same way (its default, 0, ends
open requests at once).

    >>> drain = Drain()
    >>> drain.reason is None
    True
    >>> drain.begin("SIGTERM", 5.0, now=100.0); drain.begin("SIGINT", 0.0, now=101.0)  # the first one counts
    >>> drain.reason, drain.deadline
    ('the server is stopping (SIGTERM)', 105.0)

Left out: a client that reads nothing gets its error event only if its socket buffers have room for it,
and is cut after ``FINAL_WRITE_S``; the lab's variants (``executor``, ``blocking``) end a stream at its next
token, not at once; a background server (``background.UvicornServer``) stops as before, without a drain.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Callable

import uvicorn

from ..engine.protocols import EngineDeadError
from .health import engine_state

logger = logging.getLogger(__name__)

FINAL_WRITE_S = 2.0  # for the last events of the streams that were ended, once the drain is over


class ServerStopping(EngineDeadError):
    """The whole server stops: for a request still open at the drain's deadline, as if its engine died."""


class Drain:
    """The app's side of a drain (``app.state.drain``): whether it stopped taking requests, and until when
    open requests may finish by themselves."""

    def __init__(self):
        self.reason: str | None = None  # None: serving; else why new requests get a 503
        self.deadline: float | None = None  # time.monotonic() at which the open requests are ended
        self.ended = 0  # requests ended by the drain (the others finished by themselves)

    def begin(self, why: str, timeout_s: float, now: float | None = None) -> None:
        if self.reason is None:
            self.reason = f"the server is stopping ({why})"
            self.deadline = (time.monotonic() if now is None else now) + timeout_s


class DrainingServer(uvicorn.Server):
    """A uvicorn ``Server`` that drains ``app`` (a FastAPI app from ``create_app``) before it stops.

    ``stop_when``: called every tick, returns why the server must stop on its own (its engine failed), or
    None; ``ignore_sigint``: leave Ctrl-C to a parent process, which stops this one with SIGTERM. The exit
    code to use is ``exit_code`` once ``run`` returns.
    """

    def __init__(self, config: uvicorn.Config, app, drain_timeout_s: float,
                 stop_when: Callable[[], str | None] | None = None, ignore_sigint: bool = False):
        config.timeout_graceful_shutdown = FINAL_WRITE_S
        super().__init__(config)
        self.app, self.drain_timeout_s = app, drain_timeout_s
        self.stop_when, self.ignore_sigint = stop_when, ignore_sigint
        self.exit_code = 0

    @property
    def drain(self) -> Drain:
        return self.app.state.drain

    def begin_drain(self, why: str) -> None:
        if self.drain.reason is None:
            logger.warning("stopping (%s): new requests get a 503; open ones may finish for %g s",
                           why, self.drain_timeout_s)
        self.drain.begin(why, self.drain_timeout_s)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without raising the signal again at the end: a drained server exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may set handlers (a server in a thread is stopped by its owner)
            return
        handled = {signal.SIGTERM: self.handle_exit,
                   signal.SIGINT: signal.SIG_IGN if self.ignore_sigint else self.handle_exit}
        before = {sig: signal.signal(sig, handler) for sig, handler in handled.items()}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler runs between two bytecodes of the loop's thread: it only sets flags; on_tick acts.
        if self.drain.reason is not None:
            self.should_exit = self.force_exit = True  # a second signal: stop at once
        else:
            self.begin_drain(signal.Signals(sig).name)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        drain = self.drain
        if drain.reason is None and self.stop_when is not None and (why := self.stop_when()) is not None:
            self.exit_code = 1
            self.begin_drain(why)
        if drain.reason is None:
            return False
        open_now = self.app.state.admission.active
        if open_now and time.monotonic() >= drain.deadline:
            backend = self.app.state.backend
            ended = backend.end_all(ServerStopping(drain.reason)) if backend is not None else 0
            drain.ended += ended
            logger.warning("drain deadline: %d open request(s) ended with an error event", ended)
            drain.deadline = float("inf")  # once; what is still open now gets FINAL_WRITE_S in shutdown
        # Ended streams release their slot as they send the error event; uvicorn's shutdown then waits
        # (FINAL_WRITE_S at most) for the [DONE] to go out.
        return open_now == 0 or drain.deadline == float("inf")


def engine_failed(app) -> str | None:
    """Why ``app``'s engine is gone for good (``health.engine_state`` says ``failed``), or None."""
    backend = app.state.backend
    if backend is None:
        return None
    health = backend.health()
    state = engine_state(health, getattr(backend, "max_restarts", 0), app.state.limits.wedged_after_s)
    return f"the engine failed: {health.reason}" if state["state"] == "failed" else None


def serve_app(app, limits, sockets=None, **config) -> int:
    """Serve ``app`` (from ``create_app``) in the foreground until a signal or its engine's failure, drain
    it, and return the exit code (``python -m labserver serve``). ``sockets``: listening sockets bound
    already (else ``config``'s host and port); ``config``: ``uvicorn.Config``'s."""
    from .limits.connections import uvicorn_config

    server = DrainingServer(uvicorn_config(app, limits, **config), app, limits.drain_timeout_s,
                            stop_when=lambda: engine_failed(app))
    server.run(sockets=sockets)
    return server.exit_code
