"""One admitted generation, from the web layer's side: its events, its metrics, its concurrency slot, and
the response that sends it.

Every route that generates (``/generate``, ``/v1/completions``, ``/v1/chat/completions``) goes through
``start_generation``, the admit step of ``pipeline.run``: it refuses at once with a 503 when the engine
cannot serve (dead or wedged: ``health.unavailable``), takes a slot from the app's ``Admission`` (or
raises the 429), starts a ``RequestRecord`` for ``/metrics``, and returns a ``Generation`` whose
``events()`` wraps the backend's stream. However the request ends (finished, failed, client gone,
never started), ``Generation.close`` runs exactly once: it gives the slot back and books the metrics.

The response that sends a stream (``streaming_response.ClosingStreamingResponse``) closes the body
however the response ends, so the generation is cancelled and the slot freed within a step; it sends
keep-alive comments while a stream waits and drops a client that reads nothing for ``send_timeout_s``.
This module leaves out SSE framing (``schemas``), the request path (``pipeline``) and the wire formats
of the routes.
"""

from __future__ import annotations

from contextlib import aclosing

import anyio
from fastapi import Request

from ..config import SamplingParams
from .health import unavailable
from .limits import ServerLimits, Slot, engine_unavailable, too_many_requests
from .metrics import RequestRecord
from .sse import KEEPALIVE_FRAME, ClosingStreamingResponse

__all__ = ["ClosingStreamingResponse", "Generation", "KEEPALIVE_FRAME", "sse_response", "start_generation"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream


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
