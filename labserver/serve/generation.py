"""One admitted generation, from the web layer's side: its events, its metrics, its concurrency slot, and
the response that sends it.

Every route that generates (``/generate``, ``/v1/completions``, ``/v1/chat/completions``) goes through
``start_generation``, the admit step of ``pipeline.run``: it refuses at once with a 503 when the engine
cannot serve (dead or wedged: ``health.unavailable``), takes a slot from the app's ``Admission`` (or
raises the 429), starts a ``RequestRecord`` for ``/metrics``, and returns a ``Generation`` whose
``events()`` wraps the backend's stream. However the request ends (finished, failed, client gone,
never started), ``Generation.close`` runs exactly once: it gives the slot back and books the metrics.

Why closing needs care: when a client leaves, Starlette cancels the task that sends the body, and a
body generator suspended at ``yield`` is not closed until garbage collection; one never started is not
closed at all. ``ClosingStreamingResponse`` closes it (shielded from the cancellation) and then calls
its ``on_close`` callbacks, so the engine stops and the slot is free within a step.

The same response keeps slow ends apart: a task pulls the body into a one-chunk buffer while the
response sends. When nothing has been sent for ``keepalive_s`` (no token yet) it sends an SSE comment,
``: keep-alive``, which SSE clients skip; a send that stays stuck for ``send_timeout_s`` (the client has
read nothing while its socket buffers filled) drops the client: the body is closed, which cancels the
generation and frees the slot, and the connection is closed. This module leaves out SSE framing
(``schemas``), the request path (``pipeline``) and the wire formats of the routes. It cannot reset the
TCP connection of a dropped client (ASGI gives the app no socket): the server closes it once the bytes
already written are read, or the client goes.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Callable

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..config import SamplingParams
from .health import unavailable
from .limits import ServerLimits, Slot, engine_unavailable, too_many_requests
from .metrics import RequestRecord

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream
KEEPALIVE_FRAME = b": keep-alive\n\n"  # an SSE comment: every SSE parser skips it
_END = object()


class ClientTooSlow(Exception):  # not an OSError: Starlette would take that for a disconnect
    """The client read nothing for ``send_timeout_s``: one send stayed stuck that long."""


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body generator however the response ends.

    ``on_close`` callbacks run after that, also when the body was never started. ``keepalive_s``: send
    ``KEEPALIVE_FRAME`` after that long without a chunk; ``send_timeout_s``: drop a client whose send
    stays stuck that long. None turns either off.
    """

    def __init__(self, content, *args, on_close: Callable[[], None] | None = None,
                 keepalive_s: float | None = None, send_timeout_s: float | None = None, **kwargs):
        super().__init__(content, *args, **kwargs)
        self._on_close = on_close
        self.keepalive_s, self.send_timeout_s = keepalive_s, send_timeout_s

    async def stream_response(self, send) -> None:
        chunks: asyncio.Queue = asyncio.Queue(maxsize=1)
        pump = asyncio.ensure_future(self._pump(chunks))
        try:
            await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
            while (chunk := await self._next(chunks, send)) is not _END:
                await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            pump.cancel()  # stuck at a send or gone: stop pulling the body (its generator ends here)
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

    async def _next(self, chunks: asyncio.Queue, send):
        """The next chunk; a keep-alive comment each time ``keepalive_s`` passes without one."""
        while True:
            with anyio.move_on_after(self.keepalive_s) as waited:
                item = await chunks.get()
            if not waited.cancelled_caught:
                if isinstance(item, BaseException):
                    raise item
                return item
            await self._send(send, {"type": "http.response.body", "body": KEEPALIVE_FRAME, "more_body": True})

    async def _send(self, send, message: dict) -> None:
        with anyio.move_on_after(self.send_timeout_s) as waited:
            await send(message)
        if waited.cancelled_caught:
            raise ClientTooSlow(f"the client read nothing for {self.send_timeout_s} s")

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientTooSlow as exc:  # the connection is closed when this returns unfinished
            logger.warning("dropped a stream: %s", exc)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # a no-op when stream_response already closed it
            if self._on_close is not None:
                self._on_close()


def sse_response(body, generation: "Generation", limits: ServerLimits) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS,
                                    on_close=generation.close, keepalive_s=limits.keepalive_s,
                                    send_timeout_s=limits.send_timeout_s)


class Generation:
    """The events of one generation on ``backend``; holds ``slot`` and feeds ``record`` until closed."""

    def __init__(self, backend, prompt, params: SamplingParams, slot: Slot, record: RequestRecord):
        self.backend, self.prompt, self.params = backend, prompt, params
        self.slot, self.record = slot, record

    async def events(self):
        """Async generator of ``TokenEvent``s and a ``Finish``; engine errors re-raise here.

        Closing it (or leaving it early with ``aclosing``) cancels the generation on the engine.
        """
        stream = self.backend.stream(self.prompt, self.params)
        try:
            async for item in stream:
                self.record.observe(item)
                yield item
        except Exception:
            self.record.failed = True
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # what cancels the generation on the engine thread
            self.close()

    async def collect(self) -> list:
        async with aclosing(self.events()) as events:
            return [item async for item in events]

    def finish(self, reason: str) -> None:
        """The web layer ended the request itself (e.g. a stop string matched)."""
        self.record.finish(reason)

    def close(self) -> None:
        self.slot.release()
        self.record.close()


def start_generation(request: Request, prompt, params: SamplingParams, prompt_tokens: int) -> Generation:
    """Admit one generation for ``request``'s app or raise the 503 (no engine) or 429 ``HTTPException``."""
    state = request.app.state
    reason = unavailable(state.backend.health(), state.limits.wedged_after_s)
    if reason is not None:
        state.metrics.reject("unavailable")
        raise engine_unavailable(reason)
    slot = state.admission.try_admit()
    if slot is None:
        state.metrics.reject("busy")
        raise too_many_requests(state.limits)
    return Generation(state.backend, prompt, params, slot, state.metrics.record(prompt_tokens))
