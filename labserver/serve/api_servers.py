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
shuts the whole server down when one API process dies.) Left out: balancing connections by load, backing
off between replacements, and draining the streams of the other processes when the whole service stops
(each process gets uvicorn's 2 s graceful shutdown).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import wait

from .background import BackgroundServer, bind_socket, start_server, stop
from .process.supervisor import MAX_RESTARTS
from .process.core_proc import EngineSpec
from .process.supervisor import EngineProcess

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # N fresh interpreters import FastAPI and torch at once on a small machine
API_SERVER_HEADER = "x-api-server"


class _Tagged:
    """ASGI middleware: every HTTP response says which process answered it."""

    def __init__(self, app):
        self.app, self.pid = app, str(os.getpid()).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (API_SERVER_HEADER.encode(), self.pid)]}
            await send(message)

        await self.app(scope, receive, tagged)


def serve_api(spec: EngineSpec, info: dict, address: str, sock, limits, log_level: str, started) -> None:
    """One API process's main: the app on the shared socket, its engine client at ``address``."""
    import uvicorn

    from .app import create_app
    from .connections import uvicorn_config
    from .process.frontend import Frontend

    app = create_app(Frontend.for_engine_process(spec, info, address), "process", limits=limits)
    server = uvicorn.Server(uvicorn_config(_Tagged(app), limits, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=2))

    def watch():
        """Say when the server accepts connections; stop it if the parent process dies."""
        parent = os.getppid()
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        started.set()
        while os.getppid() == parent:
            time.sleep(0.5)
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    server.run(sockets=[sock])


class ApiServers(BackgroundServer):
    """N API processes on one port, one engine process behind them (``engine_pid``)."""

    def __init__(self, spec: EngineSpec, n: int = 2, host: str = "127.0.0.1", port: int = 0, limits=None,
                 log_level: str = "warning", max_restarts: int = MAX_RESTARTS):
        if n < 1:
            raise ValueError(f"api_servers must be >= 1, got {n}")
        super().__init__(host, port)
        self.spec, self.n, self.limits, self.log_level = spec, n, limits, log_level
        self.max_restarts = max_restarts
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
        return super().start(timeout_s)

    def _prepare(self) -> None:
        self._sock = bind_socket(self.host, self.requested_port)
        self._sock.listen(2048)
        self.port = self._sock.getsockname()[1]
        try:
            self.engine = EngineProcess(self.spec).start()
        except BaseException:
            self._cleanup()
            raise
        self._stopping.clear()
        self.api_restarts, self.api_reason, self._dead = 0, None, set()
        self._started, self.workers = [None] * self.n, [None] * self.n
        for i in range(self.n):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._started[i] = ctx.Event()
        self.workers[i] = ctx.Process(target=serve_api, name=f"labserver-api-{i}", daemon=True,
                                      args=(self.spec, self.engine.info, self.engine.address, self._sock,
                                            self.limits, self.log_level, self._started[i]))
        self.workers[i].start()

    def _run(self) -> None:
        """Replace each API process that dies (bounded); end when asked to, or when none is left."""
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

    def _ready(self) -> bool:
        return all(e.is_set() for e in self._started)

    def _shutdown(self) -> None:
        self._stopping.set()
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: uvicorn closes its streams (2 s) and exits

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


def start_api_servers(engine, n: int = 2, port: int = 0, name: str = "fastapi", host: str = "127.0.0.1",
                      limits=None) -> ApiServers:
    """Serve ``engine`` (an ``Engine``, a fake one too, or an ``EngineSpec``) from ``n`` API processes and
    one engine process, in the background; re-running replaces the server of that name."""
    spec = engine if isinstance(engine, EngineSpec) else EngineSpec.of(engine)
    stop(name)
    return start_server(name, ApiServers(spec, n, host, port, limits))
