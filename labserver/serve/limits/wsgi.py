"""Deadlines on a connection of the Flask baseline before its request reaches the app (werkzeug's twin of
``limits.connections``).

werkzeug's development server, which serves the baseline one request at a time, reads a request with
blocking socket reads and no timeout: one client that connects and sends nothing, or sends its headers a
byte at a time (slowloris), holds the only thread, and every other client waits behind it for good.
``GuardedRequestHandler`` reads the socket through ``_PhaseReader``, which gives every read the time left
in its phase, so a trickle cannot stretch a phase (a plain socket timeout would start again at each byte):

- a connection that sends nothing for ``idle_timeout_s`` is closed (no answer: nothing was asked);
- the request line and headers must be complete ``header_timeout_s`` after their first byte, the body
  ``body_timeout_s`` after the headers: else a 408 and the connection is closed. The handler reads the
  body (at most ``max_body_bytes`` + 1, what the app would read) before the app runs, under that
  deadline, and hands it to the app from memory.

    >>> reader = _PhaseReader(None, idle_timeout_s=5.0)
    >>> reader.start("body", 30.0, "too slow", now=100.0); reader.time_left(now=110.0)
    20.0

Left out: a deadline on writing the answer (the baseline's bodies are small: they fit in the socket's
buffers), a cap on connections (they wait in the listening socket's backlog while one request runs: one
at a time is the baseline's point), and a deadline on the generation itself, as in the FastAPI app.
"""

from __future__ import annotations

import io
import socket
import time

from werkzeug.serving import WSGIRequestHandler


class PhaseTimeout(TimeoutError):
    """A phase of the request outlasted its deadline (http.server closes the connection on a TimeoutError)."""


class _PhaseReader(io.RawIOBase):
    """The socket's bytes, each read allowed only the time left in its phase (``start``)."""

    def __init__(self, sock: socket.socket | None, idle_timeout_s: float, header_timeout_s: float = 10.0):
        self.sock, self.idle_timeout_s, self.header_timeout_s = sock, idle_timeout_s, header_timeout_s
        self.phase, self.deadline, self.message = "idle", None, None

    def start(self, phase: str, seconds: float | None, message: str | None = None, now: float | None = None) -> None:
        self.phase, self.message = phase, message
        self.deadline = None if seconds is None else (time.monotonic() if now is None else now) + seconds

    def time_left(self, now: float | None = None) -> float | None:
        if self.phase == "idle":
            return self.idle_timeout_s
        return None if self.deadline is None else self.deadline - (time.monotonic() if now is None else now)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.time_left()
        if left is not None and left <= 0:
            raise PhaseTimeout(self.message)
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            raise PhaseTimeout(self.message) from None
        if n and self.phase == "idle":  # the first byte of a request: its headers' deadline starts now
            self.start("headers", self.header_timeout_s,
                       f"the request headers did not arrive within {self.header_timeout_s:g} s")
        return n


def _timeout_response(message: str) -> bytes:
    body = message.encode()
    return (b"HTTP/1.0 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class GuardedRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler with the idle, header and body deadlines (see the module docstring).
    ``guarded_handler`` makes one with the values of a ``ServerLimits``."""

    idle_timeout_s, header_timeout_s, body_timeout_s, max_body_bytes = 5.0, 10.0, 30.0, 1024 * 1024

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: left open, it would keep the socket from closing
        self._reader = _PhaseReader(self.connection, self.idle_timeout_s, self.header_timeout_s)
        self.rfile = io.BufferedReader(self._reader)

    def log_request(self, *args) -> None:  # one stderr line per request would flood a notebook
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()  # http.server answers a TimeoutError by closing the connection
        finally:
            if self._reader.phase in ("headers", "body") and self._reader.time_left() <= 0:
                self._answer_timeout()

    def _answer_timeout(self) -> None:
        try:
            self.connection.settimeout(1.0)
            self.connection.sendall(_timeout_response(self._reader.message))
        except OSError:
            pass  # the client is gone already
        self.close_connection = True

    def log_error(self, format: str, *args) -> None:
        if not (args and isinstance(args[0], PhaseTimeout)):  # a deadline is expected, not an error
            super().log_error(format, *args)

    def make_environ(self):
        """The environ, with the body read now under its deadline; then the app has all the time it needs."""
        environ = super().make_environ()
        self._reader.start("body", self.body_timeout_s, f"the request body did not arrive within {self.body_timeout_s:g} s")
        environ["wsgi.input"] = io.BytesIO(self._read_body(environ))
        self._reader.start("app", None)
        return environ

    def _read_body(self, environ) -> bytes:
        stream, limit = environ["wsgi.input"], self.max_body_bytes + 1  # one more: the app tells "too large"
        if environ.get("wsgi.input_terminated"):  # chunked: werkzeug's reader ends at the last chunk
            chunks, total = [], 0
            while total < limit and (data := stream.read(limit - total)):
                chunks.append(data)
                total += len(data)
            return b"".join(chunks)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > limit:
            return b""  # the app refuses it by its Content-Length alone (413), unread
        body = stream.read(length)
        if len(body) < length:  # the client closed the connection half-way through its body
            raise ConnectionError("the client closed the connection before its body was complete")
        return body


def guarded_handler(limits) -> type[GuardedRequestHandler]:
    """A ``GuardedRequestHandler`` with ``limits``' deadlines and body size (a ``ServerLimits``; None: its
    defaults)."""
    if limits is None:
        return GuardedRequestHandler
    return type("Guarded", (GuardedRequestHandler,), {
        "idle_timeout_s": limits.idle_timeout_s, "header_timeout_s": limits.header_timeout_s,
        "body_timeout_s": limits.body_timeout_s, "max_body_bytes": limits.max_body_bytes})
