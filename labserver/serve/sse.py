"""Server-Sent Events: the frames, and the response that sends a stream, which closes its body however it
ends, keeps a waiting stream alive and drops a client that reads nothing.

Frames: every event here is one ``data:`` line carrying a JSON object (``sse_frame``), a stream ends with
``data: [DONE]``, and a keep-alive is an SSE comment that every parser skips. Several frames may go out in
one write (a stream interval above 1): they are still one event each.

Closing: when a client leaves, Starlette cancels the task that sends the body, and a body generator
suspended at ``yield`` is not closed until garbage collection; one never started is not closed at all.
``ClosingStreamingResponse`` closes it (shielded from the cancellation) and then calls its ``on_close``
callbacks, so the engine stops and the slot is free within a step.

Slow ends: a task pulls the body into a one-chunk buffer while the response sends it, and one timer per
response looks at both ends every ``keepalive_s`` (or a quarter of ``send_timeout_s``):

- nothing was sent since its last look and nothing waits to be sent (no token yet): it puts an SSE
  comment, ``: keep-alive``, in the buffer; SSE clients skip it, proxies see a live connection;
- one send has been stuck longer than ``send_timeout_s`` (the socket's buffers are full: the client has
  read nothing meanwhile), or bytes have waited in the kernel's send queue that long with none of them
  acknowledged (``connections.unacknowledged``; a completed send only means the bytes fit in the
  buffers, which on loopback hold megabytes): it cancels the sending task, which drops the client. The
  body is closed (its generation cancelled, its slot freed) and the connection is reset, so the bytes
  the client never read do not hold the socket open.

A timer rather than a timeout around every send and every wait: the work per token stays what a plain
``StreamingResponse`` does (a timeout scope per await costs ~15-30 us a token on the event loop).

Left out: SSE ``event:``/``id:``/``retry:`` fields; the acknowledged-bytes check and the reset need the
socket, which only ``connections.GuardedH11Protocol`` puts in the scope (elsewhere a stuck send is the
only sign, and a dropped client's connection closes once it reads what was written). Keep-alive during
a long silence is at most two ``keepalive_s`` apart, not exactly one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from typing import Callable

import anyio
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event

from .limits.connections import SOCKET_KEY, unacknowledged

logger = logging.getLogger(__name__)

KEEPALIVE_FRAME = b": keep-alive\n\n"  # an SSE comment: every SSE parser skips it
DONE_FRAME = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream
# One SSE event as OpenAPI documents a text/event-stream response (each event; before OpenAPI 3.2's
# itemSchema): its `data` is one JSON object, or the final "[DONE]".
SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string", "description": "a JSON object, or [DONE]"},
                                   "event": {"type": "string"}}}


def sse_frame(payload: dict) -> bytes:
    """One SSE event carrying ``payload`` as JSON.

    >>> sse_frame({"token": " hi", "index": 0})
    b'data: {"token": " hi", "index": 0}\\n\\n'
    """
    return format_sse_event(data_str=json.dumps(payload))
_END = object()


class ClientTooSlow(Exception):  # not an OSError: Starlette would take that for a disconnect
    """The client read nothing for ``send_timeout_s``: one send stayed stuck that long."""


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body generator however the response ends.

    ``on_close`` callbacks run after that, also when the body was never started. ``keepalive_s``: send
    ``KEEPALIVE_FRAME`` when nothing was sent for that long; ``send_timeout_s``: drop a client whose send
    stays stuck that long. None turns either off.
    """

    def __init__(self, content, *args, on_close: Callable[[], None] | None = None,
                 keepalive_s: float | None = None, send_timeout_s: float | None = None, **kwargs):
        super().__init__(content, *args, **kwargs)
        self._on_close = on_close
        self.keepalive_s, self.send_timeout_s = keepalive_s, send_timeout_s
        self._sending_since: float | None = None  # loop time at which the send in progress began
        self._sent = False  # something was sent since the timer last looked
        self._too_slow = False
        self._timer: asyncio.TimerHandle | None = None  # the next look at both ends
        self._sock = None  # the connection's socket, where the server says (connections.SOCKET_KEY)
        self._acked: tuple[int, float] | None = None  # (bytes the client acknowledged, loop time first seen)

    async def stream_response(self, send) -> None:
        chunks: asyncio.Queue = asyncio.Queue(maxsize=1)
        pump = asyncio.ensure_future(self._pump(chunks))
        self._start_timer(asyncio.current_task(), chunks)
        try:
            await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
            while (item := await chunks.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                await self._send(send, {"type": "http.response.body", "body": item, "more_body": True})
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self._too_slow:
                raise
            asyncio.current_task().uncancel()  # this cancellation was ours: it becomes the error below
            raise ClientTooSlow(f"the client read nothing for {self.send_timeout_s} s") from None
        finally:
            if self._timer is not None:
                self._timer.cancel()
            pump.cancel()  # gone or stuck: stop pulling the body (its generator ends here)
            with anyio.CancelScope(shield=True):
                await asyncio.gather(pump, return_exceptions=True)
                await self.body_iterator.aclose()

    async def _pump(self, chunks: asyncio.Queue) -> None:
        try:
            async for chunk in self.body_iterator:
                await chunks.put(chunk if isinstance(chunk, (bytes, memoryview)) else chunk.encode(self.charset))
        except Exception as exc:  # re-raised by the sending side, as a plain StreamingResponse would
            await chunks.put(exc)
            return
        await chunks.put(_END)

    async def _send(self, send, message: dict) -> None:
        self._sending_since = asyncio.get_running_loop().time()
        await send(message)
        self._sending_since, self._sent = None, True

    def _start_timer(self, task: asyncio.Task, chunks: asyncio.Queue) -> None:
        periods = [p for p in (self.keepalive_s, self.send_timeout_s and self.send_timeout_s / 4) if p]
        if periods:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(min(periods), self._look, loop, min(periods), task, chunks)

    def _look(self, loop, period: float, task: asyncio.Task, chunks: asyncio.Queue) -> None:
        since = self._sending_since
        if self.send_timeout_s and ((since is not None and loop.time() - since > self.send_timeout_s)
                                    or self._unread_for(loop.time()) > self.send_timeout_s):
            self._too_slow = True
            task.cancel()
            return
        if self.keepalive_s and not self._sent and since is None and chunks.empty():
            chunks.put_nowait(KEEPALIVE_FRAME)
        self._sent = False
        self._timer = loop.call_later(period, self._look, loop, period, task, chunks)

    def _unread_for(self, now: float) -> float:
        """Seconds that bytes have waited in the send queue with none acknowledged (0 when none wait)."""
        state = unacknowledged(self._sock) if self._sock is not None else None
        if state is None:
            return 0.0
        queued, acked = state
        if queued == 0 or self._acked is None or acked != self._acked[0]:
            self._acked = (acked, now)
            return 0.0
        return now - self._acked[1]

    async def __call__(self, scope, receive, send) -> None:
        self._sock = scope.get("extensions", {}).get(SOCKET_KEY)
        try:
            await super().__call__(scope, receive, send)
        except ClientTooSlow as exc:  # the connection is closed when this returns unfinished
            logger.warning("dropped a stream: %s", exc)
            self._reset()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # a no-op when stream_response already closed it
            if self._on_close is not None:
                self._on_close()

    def _reset(self) -> None:
        """Reset the connection: the bytes its client never read are dropped, not held until it reads."""
        if self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._sock.shutdown(socket.SHUT_RDWR)  # the transport's next write fails, and it closes
        except OSError:
            pass  # already gone
