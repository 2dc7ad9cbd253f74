"""Run a server in a background thread of this process: for notebooks, tests and demos.

Each server runs its own event loop (uvicorn) or its own WSGI loop (werkzeug) in a daemon thread, so a
notebook can call it with a synchronous client without deadlocking its own kernel loop. ``start()``
returns only once the server accepts connections, or raises ``ServerStartError`` within seconds (a busy
port, an app that fails its startup); it never hangs. Port 0 picks a free port; ``.port`` and ``.url``
report the real one.

Re-running a notebook cell must not leave two servers behind: ``start_fastapi``/``start_flask`` keep a
registry by name and stop the previous server of that name first; ``stop_all()`` stops them all.

Left out: TLS, several worker processes, reloading on code changes. For a real deployment run
``python -m labserver serve`` (uvicorn in the foreground) instead.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from werkzeug.serving import make_server

from .limits.wsgi import guarded_handler

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class ServerStartError(RuntimeError):
    """The server did not come up: the message says why (port in use, startup failure, timeout)."""


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without
    # it Nagle's algorithm meets delayed ACKs and holds small writes (an SSE token, a /health reply) ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Lets a restarted server take its port back at once (old connections linger in TIME_WAIT); a port
    # that another server is *listening* on still fails with EADDRINUSE.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}. Is another "
                               f"server running there? Stop it, or pass port=0 for a free port.") from exc
    return sock


class BackgroundServer:
    """Common start/stop/context-manager logic; subclasses make and run the actual server."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.requested_port = host, port
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running: call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "BackgroundServer":
        if self.running:
            raise ServerStartError(f"{type(self).__name__} is already running at {self.url}")
        self._error = None
        self._prepare()  # binds the port now: a busy one fails here, at once
        self._thread = threading.Thread(target=self._run_guarded, name=f"{type(self).__name__}-{self.port}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if not self._thread.is_alive():
                self._thread, self.port = None, None
                self._cleanup()
                raise ServerStartError(f"the server exited during startup ({self._error!r}); "
                                       "its log above says why")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"the server did not start within {timeout_s:.0f} s")
            time.sleep(0.01)
        return self

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # SystemExit too: uvicorn exits that way when startup fails
            self._error = exc

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self._thread is not None:
            if self._thread.is_alive():
                self._shutdown()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"the server thread did not stop within {timeout_s:.0f} s")
            self._thread = None
        self._cleanup()
        self.port = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"<{type(self).__name__} {where}>"

    # Subclass hooks.
    def _prepare(self) -> None: ...
    def _run(self) -> None: ...
    def _ready(self) -> bool: ...
    def _shutdown(self) -> None: ...
    def _cleanup(self) -> None: ...


class UvicornServer(BackgroundServer):
    """An ASGI app (the FastAPI server) on uvicorn with its own asyncio loop in a thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", limits=None):
        super().__init__(host, port)
        self.app, self.log_level = app, log_level
        # The connection limits: given, else the app's own (create_app keeps them), else the defaults.
        self.limits = limits or getattr(getattr(app, "state", None), "limits", None)
        self.server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None

    def _prepare(self) -> None:
        self._sock = bind_socket(self.host, self.requested_port)
        self.port = self._sock.getsockname()[1]
        # A fresh Server each time: a stopped one keeps should_exit=True. Open streams get 2 s to end.
        from .limits.connections import uvicorn_config

        config = uvicorn_config(self.app, self.limits, loop="asyncio", log_level=self.log_level,
                                lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)

    def _run(self) -> None:
        # Off the main thread uvicorn installs no signal handlers, so Ctrl-C stays with the notebook.
        self.server.run(sockets=[self._sock])

    def _ready(self) -> bool:
        return self.server.started

    def _shutdown(self) -> None:
        self.server.should_exit = True

    def _cleanup(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class FlaskServer(BackgroundServer):
    """A WSGI app on werkzeug, one request at a time (``threaded=False``), as the Blog-1 baseline, with the
    connection deadlines of ``limits`` (``limits.wsgi``; None: the defaults)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limits=None):
        super().__init__(host, port)
        self.app, self.limits = app, limits
        self.server = None

    def _prepare(self) -> None:
        # Bind here rather than in make_server: on a busy port werkzeug prints and calls sys.exit.
        sock = bind_socket(self.host, self.requested_port)
        try:
            sock.listen(128)
            self.server = make_server(self.host, 0, self.app, threaded=False, fd=sock.fileno(),
                                      request_handler=guarded_handler(self.limits))
        finally:
            sock.close()  # the server holds its own duplicate of the descriptor
        self.port = self.server.port

    def _run(self) -> None:
        self.server.serve_forever(poll_interval=0.05)  # shutdown() waits at most one poll

    def _ready(self) -> bool:
        return True  # make_server has already bound and is listening: connections queue until served

    def _shutdown(self) -> None:
        self.server.shutdown()

    def _cleanup(self) -> None:
        if self.server is not None:
            self.server.server_close()
            self.server = None


_servers: dict[str, BackgroundServer] = {}


def start_server(name: str, server: BackgroundServer) -> BackgroundServer:
    """Stop the server registered as ``name`` (if any), then start ``server`` under that name."""
    stop(name)
    _servers[name] = server.start()
    return server


def start_fastapi(engine, port: int = 0, backend: str = "auto", name: str = "fastapi",
                  host: str = "127.0.0.1", limits=None) -> UvicornServer:
    """Serve ``engine`` with the FastAPI app in the background; re-running replaces the old one.

    ``backend="process"`` runs the engine in a process of its own: the app gets a ``Frontend`` (the
    engine's tokenizer and limits) and the engine process is started here, before the server, since
    loading a model there may take longer than a server may take to start.
    """
    from .app import create_app

    stop(name)  # first, so a fixed port is free again before we bind it
    if backend == "process":
        from .process.frontend import Frontend

        engine = Frontend.of(engine)
    app = create_app(engine, backend, limits=limits)
    if backend == "process":
        app.state.backend.start()
    try:
        return start_server(name, UvicornServer(app, host, port))
    except BaseException:
        if app.state.backend is not None:
            app.state.backend.close()
        raise


def start_flask(engine, port: int = 0, name: str = "flask", host: str = "127.0.0.1", limits=None) -> FlaskServer:
    """Serve ``engine`` with the blocking Flask baseline in the background; re-running replaces it."""
    from .flask_app import create_flask_app

    stop(name)
    return start_server(name, FlaskServer(create_flask_app(engine, limits), host, port, limits))


def stop(name: str) -> None:
    server = _servers.pop(name, None)
    if server is not None:
        server.stop()


def stop_all() -> None:
    for name in list(_servers):
        stop(name)


def running_servers() -> dict[str, str]:
    """Name -> URL of every registered server that is still running."""
    return {name: server.url for name, server in _servers.items() if server.running}
