"""The one path every generating request takes, whatever its wire format::

    validate -> encode -> admit -> start on the backend -> events -> SSE frames or one JSON body

``/generate`` (``generate_api.GenerateJob``), ``/v1/completions`` and ``/v1/chat/completions``
(``openai_api.OpenAIJob``) differ only in their *job*: the object that knows how that protocol's request
becomes a prompt and ``SamplingParams`` and how events become its payloads and its errors. A job has

- ``validate(engine)``: the checks that need the engine (its limits, the served model); sets ``params``;
- ``encode(engine)``: the prompt's token ids (a prompt too long is a 400, before any stream starts);
- ``stream``: whether the client asked for SSE;
- ``frames(gen)``: async generator of lists of JSON payloads, one SSE event each, from ``gen.deliveries()``:
  a list is what goes out in one write (one token's, or a stream interval's);
- ``body(gen)``: the whole non-streaming answer;
- ``fault(exc)``: the payload that reports a fault during generation, in that format's shape.

Everything else happens here, once. Admission (``start_generation``): a 503 when the engine cannot serve
(dead or wedged: ``health.unavailable``) or the server is stopping (``drain``), a concurrency slot from the app's ``Admission`` or the 429, a
``RequestRecord`` for ``/metrics``. Then the ``Generation``, whose ``close`` runs exactly once however the
request ends (finished, failed, client gone, never started): it gives the slot back and books the
metrics. Then the answer: SSE (``sse.ClosingStreamingResponse``, with its keep-alive comments and its send
timeout), the fault logged and reported (an error event in a stream; otherwise a 500, or a 503 when the
engine died: ``EngineDeadError``), ``[DONE]`` at the end of every stream. A client that leaves cancels its
generation: a stream notices on its next send; a non-streaming request listens for ``http.disconnect``
while it waits for its body (as vLLM's ``with_cancellation``), since nothing is sent before the end.
Errors raised before a response starts (bad input, 404, 413, 415, 429, 503) are shaped by the format's
exception handlers (``install_error_handlers``). Left out: routing (``app``) and the formats themselves.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Callable, Protocol

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SamplingParams
from ..engine.protocols import EngineDeadError
from .drain import ServerStopping
from .generate_api import InputError
from .health import unavailable
from .limits.asgi import engine_unavailable, too_many_requests
from .limits import ServerLimits, Slot
from .metrics import RequestRecord
from .sse import DONE_FRAME, SSE_HEADERS, ClosingStreamingResponse, sse_frame

logger = logging.getLogger(__name__)


class Job(Protocol):
    stream: bool
    params: SamplingParams | None

    def validate(self, engine) -> None: ...
    def encode(self, engine) -> list[int]: ...
    def frames(self, gen: Generation): ...
    async def body(self, gen: Generation) -> dict: ...
    def fault(self, exc: BaseException) -> dict: ...


async def run(request: Request, job: Job) -> Response:
    """Serve one generating request: the whole path, each step's error raised in the job's format."""
    engine = request.app.state.engine
    try:
        job.validate(engine)
        ids = job.encode(engine)
    except InputError as exc:  # a framework-free refusal: raised again as FastAPI's, for the handlers
        if exc.status_code == 422:
            raise RequestValidationError(exc.detail) from exc
        raise HTTPException(exc.status_code, detail=exc.detail) from exc
    gen = start_generation(request, ids, job.params, len(ids))  # a slot, or the 429
    if job.stream:
        return sse_response(_sse(job, gen), gen, request.app.state.limits)
    return await _complete(request, job, gen)


async def _sse(job: Job, gen: Generation):
    """SSE frames for every payload of ``job``; always ends with ``[DONE]``.

    Leaving early (the client is gone) closes the job's frames, and with them ``gen.events()``, which
    cancels the generation.
    """
    try:
        async with aclosing(job.frames(gen)) as groups:
            async for payloads in groups:
                yield b"".join(sse_frame(payload) for payload in payloads)
    except ServerStopping as exc:  # the drain logs how many it ended
        yield sse_frame(job.fault(exc))
    except EngineDeadError as exc:  # one line per stream: the engine's own failure is logged where it died
        logger.error("stream lost with the engine: %s", exc)
        yield sse_frame(job.fault(exc))
    except Exception as exc:  # a fault mid-generation: report it inside the stream, keep the protocol
        logger.exception("generation failed mid-stream")
        yield sse_frame(job.fault(exc))
    yield DONE_FRAME


def sse_response(body, generation: "Generation", limits: ServerLimits) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS,
                                    on_close=generation.close, keepalive_s=limits.keepalive_s,
                                    send_timeout_s=limits.send_timeout_s)


async def _complete(request: Request, job: Job, gen: Generation) -> Response:
    try:
        body = await _unless_client_leaves(request, job.body(gen))
    except ClientLeft:
        return Response(status_code=204)  # nobody reads it: the server only drops it
    except EngineDeadError as exc:
        logger.error("generation lost with the engine: %s", exc)
        return JSONResponse(job.fault(exc), status_code=503)
    except Exception as exc:
        logger.exception("generation failed")
        return JSONResponse(job.fault(exc), status_code=500)
    finally:
        gen.close()
    return JSONResponse(body)


class Generation:
    """The events of one generation on ``backend``; holds ``slot`` and feeds ``record`` until closed."""

    def __init__(self, backend, prompt, params: SamplingParams, slot: Slot, record: RequestRecord):
        self.backend, self.prompt, self.params = backend, prompt, params
        self.slot, self.record = slot, record

    async def deliveries(self):
        """Async generator of the groups of ``TokenEvent``s (and the ``Finish``) to send at once (one each
        with a stream interval of 1); engine errors re-raise here. Closing it (or leaving it early with
        ``aclosing``) cancels the generation on the engine."""
        stream = self.backend.deliveries(self.prompt, self.params)
        try:
            async for group in stream:
                for item in group:
                    self.record.observe(item)
                yield group
        except Exception:
            self.record.failed = True
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # what cancels the generation on the engine thread
            self.close()

    async def events(self):
        """The same events one at a time."""
        async with aclosing(self.deliveries()) as groups:
            async for group in groups:
                for item in group:
                    yield item

    async def collect(self) -> list:
        async with aclosing(self.deliveries()) as groups:
            return [item async for group in groups for item in group]

    def finish(self, reason: str) -> None:
        """The web layer ended the request itself (e.g. a stop string matched)."""
        self.record.finish(reason)

    def close(self) -> None:
        self.slot.release()
        self.record.close()


def start_generation(request: Request, prompt, params: SamplingParams, prompt_tokens: int) -> Generation:
    """Admit one generation for ``request``'s app or raise the 503 (no engine) or 429 ``HTTPException``."""
    state = request.app.state
    if state.drain.reason is not None:  # Connection: close, so a client's next request goes elsewhere
        state.metrics.reject("unavailable")
        raise HTTPException(503, detail=f"{state.drain.reason}: it takes no new requests",
                            headers={"Connection": "close"})
    reason = unavailable(state.backend.health(), state.limits.wedged_after_s)
    if reason is not None:
        state.metrics.reject("unavailable")
        raise engine_unavailable(reason)
    slot = state.admission.try_admit()
    if slot is None:
        state.metrics.reject("busy")
        raise too_many_requests(state.limits)
    return Generation(state.backend, prompt, params, slot, state.metrics.record(prompt_tokens))


class ClientLeft(Exception):
    """The client closed its connection before its answer was ready."""


async def _unless_client_leaves(request: Request, work):
    """Await ``work`` unless an ``http.disconnect`` comes first: then cancel it (which cancels the
    generation) and raise ``ClientLeft``. The body has been read by then, so only the disconnect can come."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)  # the generation's own cleanup runs now
    if not task.cancelled():
        return task.result()
    raise ClientLeft


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ErrorShapes(Protocol):
    """How one format words the errors raised before any response starts: each returns (body, status)."""

    def http_error_body(self, exc: StarletteHTTPException) -> tuple[dict, int]: ...
    def validation_error_body(self, errors: list) -> tuple[dict, int]: ...
    def server_error_body(self) -> tuple[dict, int]: ...


def install_error_handlers(app: FastAPI, shapes_for: Callable[[Request, Exception], ErrorShapes]) -> None:
    """Answer every error raised before a response starts in the shape of the request's format."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        body, status = shapes_for(request, exc).http_error_body(exc)
        return JSONResponse(body, status_code=status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        body, status = shapes_for(request, exc).validation_error_body(list(exc.errors()))
        return JSONResponse(body, status_code=status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug: never a traceback to the client
        logger.exception("unhandled error on %s", request.url.path)
        body, status = shapes_for(request, exc).server_error_body()
        return JSONResponse(body, status_code=status)
