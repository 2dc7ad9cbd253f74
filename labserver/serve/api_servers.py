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
it by name like the other background servers. Left out: restarting a dead API process (its
clients see the connection drop; the others serve on), and balancing connections by load.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from multiprocessing.connection import wait

from .background import BackgroundServer, bind_socket, start_server, stop
from .process.core_proc import EngineSpec
from .process.supervisor import EngineProcess

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
                 log_level: str = "warning"):
        if n < 1:
            raise ValueError(f"api_servers must be >= 1, got {n}")
        super().__init__(host, port)
        self.spec, self.n, self.limits, self.log_level = spec, n, limits, log_level
        self.engine: EngineProcess | None = None
        self.workers: list = []
        self._sock = None
        self._started: list = []

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
        ctx = multiprocessing.get_context("spawn")
        self._started = [ctx.Event() for _ in range(self.n)]
        self.workers = [ctx.Process(target=serve_api, name=f"labserver-api-{i}", daemon=True,
                                    args=(self.spec, self.engine.info, self.engine.address, self._sock,
                                          self.limits, self.log_level, started))
                        for i, started in enumerate(self._started)]
        for worker in self.workers:
            worker.start()

    def _run(self) -> None:
        wait([w.sentinel for w in self.workers])  # the first API process to end ends the service
        self._shutdown()
        for worker in self.workers:
            worker.join()

    def _ready(self) -> bool:
        return all(e.is_set() for e in self._started)

    def _shutdown(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: uvicorn closes its streams (2 s) and exits

    def _cleanup(self) -> None:
        for worker in self.workers:
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
