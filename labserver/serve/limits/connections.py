"""Deadlines on a connection before its request reaches the app, and what the kernel says a client read.

uvicorn waits forever for a request's headers and body, and keeps a fresh connection that sends nothing
open for good: a slowloris client (a header byte a second), a body that stops half-way and a crowd of idle
sockets each hold a file descriptor without limit. ``GuardedH11Protocol`` gives every phase a deadline,
as nginx's ``client_header_timeout``/``client_body_timeout`` do (here a deadline for the whole phase, not
between reads, so a trickle does not reset it):

- a fresh connection that sends nothing for ``idle_timeout_s`` is closed (after a response, uvicorn's own
  keep-alive timeout does the same with the same value);
- the headers must be complete ``header_timeout_s`` after the first byte, the body ``body_timeout_s``
  after the headers: else a 408 and the connection is closed.

``uvicorn_config`` also caps open connections (uvicorn's ``limit_concurrency``: a request on a connection
beyond the cap gets a 503) and puts the socket in the request's scope, so a stream can ask the kernel
whether its client acknowledged anything (``unacknowledged``): a send that completed only means the bytes
fit in the kernel's buffers, which on loopback hold megabytes.

Left out: HTTP/2 and WebSockets (uvicorn serves neither here), TLS handshake deadlines, a minimum rate.
"""

from __future__ import annotations

import socket
import struct

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

SOCKET_KEY = "labserver.socket"  # in scope["extensions"]
_SIOCOUTQ = 0x5411  # Linux: bytes in the send queue not yet acknowledged (TIOCOUTQ)
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info


def unacknowledged(sock) -> tuple[int, int] | None:
    """(bytes waiting in the send queue, bytes the client acknowledged so far), or None where the
    kernel does not say (not Linux, not TCP, a closed socket)."""
    import fcntl

    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_ACKED + 8)
    except (OSError, ValueError, AttributeError):
        return None
    if len(info) < _TCPI_BYTES_ACKED + 8:
        return None
    return queued, struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]


def _timeout_response(message: str) -> bytes:
    body = message.encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with an idle, a header and a body deadline (see the module docstring)."""

    idle_timeout_s = header_timeout_s = body_timeout_s = None  # set by uvicorn_config on a subclass

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._seen_cycle, self._phase, self._timer = None, "idle", None
        self._arm(self.idle_timeout_s)

    def connection_lost(self, exc) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":
            self._phase = "headers"
            self._arm(self.header_timeout_s)
        super().data_received(data)
        self._follow_cycle()

    def on_response_complete(self) -> None:
        self._phase = "idle"  # uvicorn's keep-alive timer now runs; a next request's first byte restarts ours
        super().on_response_complete()
        self._follow_cycle()  # a pipelined request already buffered starts here, not in data_received

    def _follow_cycle(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:  # the headers of a new request are in
            self._seen_cycle = cycle
            sock = self.transport.get_extra_info("socket")
            cycle.scope.setdefault("extensions", {})[SOCKET_KEY] = sock
            self._phase = "body"
            self._arm(self.body_timeout_s)
        if self._phase == "body" and cycle is not None and not cycle.more_body:
            self._phase = "app"  # the app has the whole request: its own limits apply from here
            self._arm(None)

    def _arm(self, seconds: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._expired) if seconds else None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "headers":
            self.transport.write(_timeout_response(f"the request headers did not arrive within "
                                                   f"{self.header_timeout_s:g} s"))
        elif self._phase == "body" and not (self.cycle and self.cycle.response_started):
            self.transport.write(_timeout_response(f"the request body did not arrive within "
                                                   f"{self.body_timeout_s:g} s"))
        self.transport.close()  # idle: nothing to answer; the app sees a disconnect if it was waiting


def uvicorn_config(app, limits, **kwargs) -> uvicorn.Config:
    """A ``uvicorn.Config`` for ``app`` with the connection limits of ``limits`` (a ``ServerLimits``;
    None: the defaults)."""
    from . import ServerLimits

    limits = limits or ServerLimits()
    protocol = type("GuardedH11", (GuardedH11Protocol,), {
        "idle_timeout_s": limits.idle_timeout_s, "header_timeout_s": limits.header_timeout_s,
        "body_timeout_s": limits.body_timeout_s})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=limits.idle_timeout_s,
                          limit_concurrency=limits.max_connections, **kwargs)
