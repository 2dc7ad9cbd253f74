"""The async server: ``POST /generate`` (one JSON body, or one SSE event per token) and ``GET /health``.

The app never runs the model itself. A *backend* does (``variants.make_backend``): by default the engine
thread of ``worker.EngineWorker``, so the event loop only moves bytes and ``/health`` answers while
tokens are being generated. The lab's ``"blocking"`` backend breaks that rule on purpose.

Stream protocol, one ``data:`` line per event (see ``schemas``)::

    data: {"token": " Paris", "token_id": 7042, "index": 0, "step_ms": 61.2, "prefill_time_ms": 61.2}
    data: {"finish_reason": "length", "usage": {...}, "timings": {...}}
    data: [DONE]

A fault during generation becomes ``data: {"error": {"message": ..., "type": ...}}`` then
``data: [DONE]``; the server keeps serving. A client that leaves mid-stream cancels its generation
(Starlette notices on the next send). A client that leaves a non-streaming request does not: nothing is
sent before the end, so nothing notices. Left out: the OpenAI-compatible ``/v1`` routes, auth, rate
limits and request queues with admission control.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .schemas import (
    DONE_FRAME,
    GenerateRequest,
    GenerateResponse,
    check_limits,
    error_frame,
    error_payload,
    sse_frame,
    validation_detail,
)
from .variants import make_backend

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer the stream


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body generator however the response ends.

    When the client leaves, Starlette cancels the sending task; if that happens while the body generator
    sits at a ``yield``, nothing closes it until garbage collection, and the engine keeps generating for
    nobody. Closing it here (shielded from the cancellation) runs its ``finally`` now.
    """

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def create_app(engine, backend: str = "thread") -> FastAPI:
    """The FastAPI app serving ``engine`` through ``backend`` ("thread", "executor" or "blocking").

    The backend is made now (so a bad name fails here) and closed when the server shuts down; a
    restart of the same app makes a fresh one.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.backend is None:
            app.state.backend = make_backend(engine, backend)
        try:
            yield
        finally:
            app.state.backend.close()
            app.state.backend = None

    app = FastAPI(title="labserver", summary="A small streaming LLM server for the lab.", lifespan=lifespan)
    app.state.backend = make_backend(engine, backend)
    app.state.engine = engine

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Answers without touching the engine: it stalls only if something blocks the event loop."""
        current = request.app.state.backend
        return {"status": "ok", "running": current.running if current else 0,
                "backend": backend, "model": engine.config.model}

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses={
            200: {"content": {"text/event-stream": {"description": "with stream=true: SSE token events"}}},
            400: {"description": "the engine rejected the prompt (e.g. too many tokens)"},
            500: {"description": "generation failed: {\"error\": {\"message\", \"type\"}}"},
        },
    )
    async def generate(body: GenerateRequest, request: Request):
        try:
            check_limits(body, engine.config)
            params = body.to_sampling_params()
        except ValidationError as exc:
            raise RequestValidationError(validation_detail(exc)) from exc
        except ValueError as exc:
            raise RequestValidationError([{"type": "value_error", "loc": ["body"], "msg": str(exc)}]) from exc
        current = request.app.state.backend
        if not body.stream:
            return await _complete(current, body.prompt, params)
        events = current.stream(body.prompt, params)
        try:
            # Wait for the first event before answering, so a rejected prompt gets a 400 status
            # instead of a 200 stream that carries an error.
            first = await anext(events)
        except ValueError as exc:  # PromptTooLong and other input the engine rejects
            raise HTTPException(400, detail=str(exc)) from exc
        except Exception as exc:
            logger.exception("generation failed before its first token")
            return ClosingStreamingResponse(_error_stream(exc), media_type="text/event-stream",
                                            headers=SSE_HEADERS)
        except BaseException:
            await events.aclose()
            raise
        return ClosingStreamingResponse(_sse_stream(first, events), media_type="text/event-stream",
                                        headers=SSE_HEADERS)

    return app


async def _complete(backend, prompt: str, params) -> JSONResponse:
    try:
        completion = await backend.complete(prompt, params)
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from exc
    except Exception as exc:
        logger.exception("generation failed")
        return JSONResponse(error_payload(exc), status_code=500)
    return JSONResponse(completion.to_dict())


async def _sse_stream(first, events):
    """SSE frames for ``first`` and the rest of ``events``; always ends with ``[DONE]``."""
    try:
        yield sse_frame(first.to_dict())
        async for item in events:
            yield sse_frame(item.to_dict())
    except Exception as exc:  # a fault mid-generation: report it inside the stream, keep the protocol
        logger.exception("generation failed mid-stream")
        yield error_frame(exc)
    finally:
        # Runs on a normal end, on an error, and when the client leaves (GeneratorExit/cancellation):
        # closing the backend's generator is what cancels the generation on the engine thread.
        with anyio.CancelScope(shield=True):
            await events.aclose()
    yield DONE_FRAME


async def _error_stream(exc: BaseException):
    yield error_frame(exc)
    yield DONE_FRAME
