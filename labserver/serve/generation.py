"""One admitted generation, from the web layer's side: its events, its metrics, its concurrency slot.

Every route that generates (``/generate``, ``/v1/completions``, ``/v1/chat/completions``) goes through
``start_generation``, the admit step of ``pipeline.run``: it takes a slot from the app's ``Admission``
(or raises the 429), starts a ``RequestRecord`` for ``/metrics``, and returns a ``Generation`` whose
``events()`` wraps the backend's stream. However the request ends (finished, failed, client gone,
never started), ``Generation.close`` runs exactly once: it gives the slot back and books the metrics.

Why closing needs care: when a client leaves, Starlette cancels the task that sends the body, and a
body generator suspended at ``yield`` is not closed until garbage collection; one never started is not
closed at all. ``ClosingStreamingResponse`` closes it (shielded from the cancellation) and then calls
its ``on_close`` callbacks, so the engine stops and the slot is free within a step. This module leaves
out SSE framing (``schemas``), the request path (``pipeline``) and the wire formats of the routes.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Callable

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..config import SamplingParams
from .limits import Slot, too_many_requests
from .metrics import RequestRecord

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body generator however the response ends.

    ``on_close`` callbacks run after that, also when the body was never started.
    """

    def __init__(self, content, *args, on_close: Callable[[], None] | None = None, **kwargs):
        super().__init__(content, *args, **kwargs)
        self._on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # a no-op when stream_response already closed it
            if self._on_close is not None:
                self._on_close()


def sse_response(body, generation: "Generation") -> ClosingStreamingResponse:
    return ClosingStreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS,
                                    on_close=generation.close)


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
    """Admit one generation for ``request``'s app or raise the 429 ``HTTPException``."""
    state = request.app.state
    slot = state.admission.try_admit()
    if slot is None:
        state.metrics.reject("busy")
        raise too_many_requests(state.limits)
    return Generation(state.backend, prompt, params, slot, state.metrics.record(prompt_tokens))
