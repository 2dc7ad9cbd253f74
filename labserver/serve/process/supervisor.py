"""Start the engine process, notice when it dies, restart it a bounded number of times.

``EngineProcess.start()`` spawns ``core_proc.run_engine_core`` (the spawn start method: a fresh
interpreter, no copy of this process's threads or torch state) and waits until the engine has loaded its
model and bound its socket, or raises ``EngineStartError`` with the child's own message (a model that
cannot be found, a startup crash, a timeout). A monitor thread then waits on the process's sentinel (a
file descriptor that becomes readable the moment the process ends, however it ends: ``kill -9`` too),
tells its listeners at once (the engine client fails every open stream with ``EngineDeadError``) and
spawns a new engine at the same address, at most ``max_restarts`` times over the supervisor's life
(then ``gave_up``: the launcher of ``--api-servers`` stops the service). API processes reconnect by
themselves (ZMQ reconnects; their next ``Hello`` meets the new engine).

Left out: backing off between restarts, and telling a crash loop from bad luck (every death counts).
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import threading
import time
from multiprocessing.connection import wait
from typing import Callable

from .core_proc import EngineSpec, run_engine_core

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # a first start may convert a GGUF or measure the weight formats: minutes
MAX_RESTARTS = 3


class EngineStartError(RuntimeError):
    """The engine process did not come up; the message says why."""


class EngineProcess:
    """One engine process at a time at ``address``, restarted after a death (``restarts`` so far)."""

    def __init__(self, spec: EngineSpec, max_restarts: int = MAX_RESTARTS,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.spec, self.max_restarts, self.start_timeout_s = spec, max_restarts, start_timeout_s
        self._dir = tempfile.mkdtemp(prefix="labserver-engine-")
        self.address = f"ipc://{self._dir}/input"
        self.info: dict | None = None  # {"pid", "context_len", "route"} of the engine that runs now
        self.restarts = 0
        self.reason: str | None = None  # why no engine runs now (dead, restarting, gave up)
        self.gave_up = False  # restarts used up: no engine will run again
        self._proc = None
        self._closing = False
        self._monitor: threading.Thread | None = None
        self._listeners: list[Callable[[str], None]] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self.reason is None

    def on_death(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` on the monitor thread each time the engine process dies."""
        self._listeners.append(listener)

    def start(self) -> "EngineProcess":
        if self._monitor is None:
            self._proc = self._spawn()
            self._monitor = threading.Thread(target=self._watch, name="labserver-engine-monitor", daemon=True)
            self._monitor.start()
        return self

    def _spawn(self):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=run_engine_core, args=(self.spec, self.address, self.restarts, child),
                           name="labserver-engine-core", daemon=True)
        proc.start()
        child.close()
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                ready = wait([parent, proc.sentinel], timeout=max(left, 0))
                if parent in ready:
                    try:
                        kind, payload = parent.recv()
                    except EOFError:  # it died between loading and answering
                        continue
                    if kind == "error":
                        raise EngineStartError(f"the engine process could not start: {payload}")
                    self.info = payload
                    return proc
                if proc.sentinel in ready:
                    raise EngineStartError(f"the engine process exited during startup (code {proc.exitcode})")
                if left <= 0:
                    raise EngineStartError(f"the engine process did not start within {self.start_timeout_s:.0f} s")
        except BaseException:
            proc.kill()
            proc.join()
            raise
        finally:
            parent.close()

    def _watch(self) -> None:
        while not self._closing:
            proc = self._proc
            wait([proc.sentinel])
            proc.join()  # reap it now, so its pid is gone for anyone who looks
            if self._closing:
                return
            self.reason = f"the engine process (pid {proc.pid}) died (exit code {proc.exitcode})"
            logger.error("%s; %d of %d restarts used", self.reason, self.restarts, self.max_restarts)
            for listener in self._listeners:
                listener(self.reason)
            if not self._restart():
                return

    def _restart(self) -> bool:
        while self.restarts < self.max_restarts and not self._closing:
            self.restarts += 1
            self.reason += f"; restarting ({self.restarts} of {self.max_restarts})"
            try:
                self._proc = self._spawn()
            except EngineStartError as exc:
                self.reason = str(exc)
                continue
            if self._closing:  # closed while the new one was loading
                self._proc.kill()
                return False
            self.reason = None
            logger.warning("the engine process restarted (pid %d)", self._proc.pid)
            return True
        self.reason += f"; not restarted again (it died {self.restarts + 1} times)"
        self.gave_up = not self._closing
        return False

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()  # SIGTERM: the engine finishes its forward and exits
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self._monitor is not None:
            self._monitor.join(timeout)
        shutil.rmtree(self._dir, ignore_errors=True)
