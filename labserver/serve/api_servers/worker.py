"""One API process of ``--api-servers N``: its main (``serve_api``), started by ``api_servers.ApiServers``.

It builds a ``Frontend`` (the tokenizer, no weights) for the engine process's address and serves the
FastAPI app on the socket the launcher bound and handed over; its engine client connects to the engine's
ROUTER with an identity of its own, so the engine sends every output back to the process that asked.
Every response carries ``X-Api-Server: <pid>`` (``_Tagged``). ``/health`` adds the launcher's view of
all the API processes (``status``). SIGTERM drains its open streams (``drain.DrainingServer``);
Ctrl-C is ignored here, since the terminal sends it to every process of the group and the launcher
answers it with a SIGTERM to each. A watch thread stops the server if the launcher dies.

Left out: anything shared between API processes but the socket, the engine and the status file.
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial

from .status import read_status
from ..process.core_proc import EngineSpec

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


def serve_api(spec: EngineSpec, info: dict, address: str, sock, limits, log_level: str, started,
              status_path: str) -> None:
    """One API process's main: the app on the shared socket, its engine client at ``address``; SIGTERM
    drains its streams (``drain``), Ctrl-C is left to the launcher."""
    from ..app import create_app
    from ..limits.connections import uvicorn_config
    from ..drain import DrainingServer
    from ..process.frontend import Frontend

    app = create_app(Frontend.for_engine_process(spec, info, address), "process", limits=limits)
    app.state.api_servers = partial(read_status, status_path)
    server = DrainingServer(uvicorn_config(_Tagged(app), limits, log_level=log_level, lifespan="on"), app,
                            app.state.limits.drain_timeout_s, ignore_sigint=True)

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
