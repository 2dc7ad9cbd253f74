"""Several API server processes in front of one engine process (vLLM's ``--api-server-count``).

One process parses JSON, tokenizes, detokenizes and frames SSE for every client; when that work, not
the model, is what limits a server, more API processes help, as long as they share one engine (one
copy of the weights, one batch). ``ApiServers`` does what ``python -m labserver serve --backend process
--api-servers N`` runs:

1. starts the engine process (``process.supervisor.EngineProcess``, which restarts it if it dies);
2. binds one listening socket and spawns N API processes, handing each the socket (as uvicorn's
   workers and vLLM's API servers get theirs); the kernel gives each new connection to whichever
   process accepts it first;
3. each API process builds a ``Frontend`` (the tokenizer, no weights) for the engine's address and
   serves the FastAPI app on the shared socket; its engine client connects to the engine's ROUTER with
   an identity of its own, so the engine sends every output back to the process that asked for it.

Every response carries ``X-Api-Server: <pid>``, the API process that answered it. ``ApiServers`` is a
``background.BackgroundServer`` (``start()``, ``stop()``, ``url``), and ``start_api_servers`` registers
it by name like the other background servers.

A dead API process is replaced, as gunicorn replaces a dead worker: its own clients see their
connections drop, the other processes serve on on the same port and the engine process keeps running.
At most ``max_restarts`` replacements over the service's life (``api_restarts``, ``api_reason``); once
they are used up a dead process stays dead and the others serve on. (vLLM's ``--api-server-count``
shuts the whole server down when one API process dies.) Every API process's ``/health`` reports them
all under ``"api_servers"`` (from a file the launcher rewrites: ``status``).

When the whole service stops (``run_foreground``: SIGTERM or Ctrl-C to the launcher, or the engine process
gone for good), each API process gets SIGTERM and drains its own streams (``drain``: new requests get a
503, open ones may finish for ``drain_timeout_s``, then an error event and ``[DONE]``); the engine process
is stopped only after they have all exited. Left out: balancing connections by load, backing off between
replacements, and a connection that arrives once every API process has closed its listening socket (it
waits in the kernel's queue until the launcher closes the socket, then is reset).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import wait

from .status import api_state, write_status
from .worker import API_SERVER_HEADER, serve_api  # noqa: F401 (the header's name is used with ApiServers)
from ..background import BackgroundServer, bind_socket, start_server, stop
from ..drain import FINAL_WRITE_S
from ..limits import ServerLimits
from ..process.supervisor import MAX_RESTARTS
from ..process.core_proc import EngineSpec
from ..process.supervisor import EngineProcess

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # N fresh interpreters import FastAPI and torch at once on a small machine


class ApiServers(BackgroundServer):
    """N API processes on one port, one engine process behind them (``engine_pid``)."""

    def __init__(self, spec: EngineSpec, n: int = 2, host: str = "127.0.0.1", port: int = 0, limits=None,
                 log_level: str = "warning", max_restarts: int = MAX_RESTARTS, engine_restarts: int = MAX_RESTARTS):
        if n < 1:
            raise ValueError(f"api_servers must be >= 1, got {n}")
        super().__init__(host, port)
        self.spec, self.n, self.limits, self.log_level = spec, n, limits or ServerLimits(), log_level
        self.max_restarts, self.engine_restarts = max_restarts, engine_restarts
        self.failed: str | None = None  # why the service stopped by itself (its engine is gone for good)
        self._status_dir = self._status_path = None
        self._status: dict | None = None
        self._publishing = threading.Lock()  # start() and the monitor thread both publish
        self.engine: EngineProcess | None = None
        self.workers: list = []
        self._sock = None
        self._started: list = []
        self.api_restarts = 0
        self.api_reason: str | None = None  # the last API process death, and what came of it
        self._stopping = threading.Event()
        self._dead: set = set()  # API processes whose death was handled

    @property
    def engine_pid(self) -> int | None:
        return self.engine.pid if self.engine is not None else None

    @property
    def api_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "ApiServers":
        super().start(timeout_s)
        self._publish()  # all serve now: /health must not wait for the monitor's next round to say so
        return self

    def _prepare(self) -> None:
        self._sock = bind_socket(self.host, self.requested_port)
        self._sock.listen(2048)
        self.port = self._sock.getsockname()[1]
        try:
            self.engine = EngineProcess(self.spec, self.engine_restarts).start()
        except BaseException:
            self._cleanup()
            raise
        self._stopping.clear()
        self.api_restarts, self.api_reason, self._dead, self.failed = 0, None, set(), None
        self._started, self.workers = [None] * self.n, [None] * self.n
        self._status_dir = tempfile.mkdtemp(prefix="labserver-api-servers-")
        self._status_path = os.path.join(self._status_dir, "status.json")
        for i in range(self.n):
            self._spawn(i)
        self._publish()

    def _spawn(self, i: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._started[i] = ctx.Event()
        self.workers[i] = ctx.Process(target=serve_api, name=f"labserver-api-{i}", daemon=True,
                                      args=(self.spec, self.engine.info, self.engine.address, self._sock,
                                            self.limits, self.log_level, self._started[i], self._status_path))
        self.workers[i].start()

    def _run(self) -> None:
        """Replace each API process that dies (bounded); end when asked to, when none is left, or when the
        engine is gone for good (then every API process drains, as on SIGTERM)."""
        while not self._stopping.is_set():
            alive = [w for w in self.workers if w.exitcode is None]
            if not alive:
                break
            wait([w.sentinel for w in alive], timeout=0.2)
            for i, worker in enumerate(self.workers):
                if worker.exitcode is None or self._stopping.is_set() or worker in self._dead:
                    continue
                self._dead.add(worker)
                self._replace(i, worker)
            self._publish()
            if self.engine.gave_up and not self._stopping.is_set():
                self.failed = f"the engine failed: {self.engine.reason}"
                logger.error("%s; stopping the service", self.failed)
                self._shutdown()
        for worker in self.workers:
            worker.join()

    def _replace(self, i: int, worker) -> None:
        self.api_reason = f"API process {worker.pid} ended (exit code {worker.exitcode})"
        if self.api_restarts >= self.max_restarts:
            self.api_reason += f"; not replaced (all {self.max_restarts} replacements used)"
            logger.error("%s; %d API process(es) serve on", self.api_reason,
                         sum(w.exitcode is None for w in self.workers))
            return
        self.api_restarts += 1
        self.api_reason += f"; replaced ({self.api_restarts} of {self.max_restarts})"
        logger.warning("%s", self.api_reason)
        self._spawn(i)

    @property
    def api_alive(self) -> int:
        return sum(w is not None and w.exitcode is None for w in self.workers)

    def _publish(self) -> None:
        """Rewrite the status file the API processes' /health reads (``status``) when it changed."""
        serving = sum(w is not None and w.exitcode is None and e.is_set()
                      for w, e in zip(self.workers, self._started))
        replacing = any(w is not None and w.exitcode is None and not e.is_set()
                        for w, e in zip(self.workers, self._started))
        status = {"alive": serving, "of": self.n, "restarts": self.api_restarts, "max_restarts": self.max_restarts,
                  **api_state(serving, self.n, self.api_restarts, self.max_restarts, replacing),
                  "reason": self.api_reason}
        with self._publishing:
            if status != self._status:
                write_status(self._status_path, status)
                self._status = status

    def _ready(self) -> bool:
        return all(e.is_set() for e in self._started)

    def stop(self, timeout_s: float | None = None) -> None:
        """Drain every API process (SIGTERM: each ends its own streams), then stop the engine process."""
        super().stop(self.limits.drain_timeout_s + FINAL_WRITE_S + 10 if timeout_s is None else timeout_s)

    def run_foreground(self) -> int:
        """Serve until SIGTERM or SIGINT (a second one stops at once), or until the engine is gone for good;
        then drain and stop. Returns the exit code: 0 when asked to stop, 1 when the engine failed."""
        signals = []

        def on_signal(sig, frame):
            signals.append(sig)
            if len(signals) > 1:  # runs on the main thread, also while stop() below waits for the drain
                for worker in self.workers:
                    if worker is not None and worker.is_alive():
                        worker.kill()

        before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.running and not signals:
                time.sleep(0.2)
            self.stop()
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
        return 1 if self.failed else 0

    def _shutdown(self) -> None:
        self._stopping.set()
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: it drains its streams (drain.DrainingServer) and exits 0

    def _cleanup(self) -> None:
        for worker in filter(None, self.workers):
            if worker.is_alive():
                worker.kill()
            worker.join()
        if self.engine is not None:
            self.engine.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._status_dir is not None:
            shutil.rmtree(self._status_dir, ignore_errors=True)
            self._status_dir = None


def start_api_servers(engine, n: int = 2, port: int = 0, name: str = "fastapi", host: str = "127.0.0.1",
                      limits=None) -> ApiServers:
    """Serve ``engine`` (an ``Engine``, a fake one too, or an ``EngineSpec``) from ``n`` API processes and
    one engine process, in the background; re-running replaces the server of that name."""
    spec = engine if isinstance(engine, EngineSpec) else EngineSpec.of(engine)
    stop(name)
    return start_server(name, ApiServers(spec, n, host, port, limits))
