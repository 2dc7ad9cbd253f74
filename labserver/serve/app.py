"""The async server: ``POST /generate``, the OpenAI-compatible ``/v1`` routes, ``/metrics``, ``/health``
and the browser page at ``/``.

The app never runs the model itself. A *backend* does (``variants.make_backend``): by default the engine
thread (``engine_thread.EngineThread``, continuous batching), so the event loop only moves bytes and
``/health`` answers while tokens are being generated. The lab's ``"blocking"`` backend breaks that rule on purpose.

Stream protocol of ``/generate``, one ``data:`` line per event (see ``schemas``)::

    data: {"token": " Paris", "token_id": 7042, "index": 0, "step_ms": 61.2, "prefill_time_ms": 61.2}
    data: {"finish_reason": "length", "usage": {...}, "timings": {...}}
    data: [DONE]

A fault during generation becomes ``data: {"error": {"message": ..., "type": ...}}`` then
``data: [DONE]``; the server keeps serving. A client that leaves mid-stream cancels its generation
(Starlette notices on the next send or receive). A client that leaves a non-streaming request does not:
nothing is sent before the end, so nothing notices. Limits (``limits.ServerLimits``): body size (413),
JSON content type (415), concurrent generations (429). Errors on ``/v1`` routes use OpenAI's body,
elsewhere FastAPI's ``{"detail": ...}``. Left out: authentication, TLS, request queues.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import aclosing, asynccontextmanager
from importlib.resources import files

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import collect
from .limits import Admission, BodyLimit, ServerLimits, require_json, too_large_message
from .metrics import CONTENT_TYPE, ServerMetrics
from .openai_api import OpenAIError, error_body, router as openai_router
from .schemas import (DONE_FRAME, SSE_EVENT_SCHEMA, GenerateRequest, GenerateResponse, check_limits, error_frame,
                      error_payload, sse_frame, validation_detail)
from .generation import SSE_HEADERS, ClosingStreamingResponse, Generation, sse_response, start_generation
from .variants import make_backend

__all__ = ["create_app", "ClosingStreamingResponse", "SSE_HEADERS"]

logger = logging.getLogger(__name__)

PAGE = files("labserver.serve").joinpath("static/index.html").read_text(encoding="utf-8")
# The page is static and writes tokens with textContent; it needs nothing from anywhere else.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff"}
OPENAI_TYPES = {404: "not_found_error", 429: "rate_limit_error", 500: "server_error"}


def create_app(engine, backend: str = "auto", limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` through ``backend`` ("auto", "batched", "thread", "executor" or
    "blocking"; see ``variants.make_backend``).

    The backend is made now (so a bad name fails here; it starts no thread), started when the server
    starts and closed when it shuts down; a restart of the same app makes a fresh one. Served without a
    lifespan (an ASGI test client), the engine thread starts on the first request.
    ``limits`` defaults to ``ServerLimits()``.
    """
    limits = limits or ServerLimits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.backend is None:
            app.state.backend = make_backend(engine, backend)
        app.state.backend.start()
        try:
            yield
        finally:
            app.state.backend.close()
            app.state.backend = None

    app = FastAPI(title="labserver", summary="A small streaming LLM server for the lab.", lifespan=lifespan)
    app.state.backend = make_backend(engine, backend)
    app.state.engine, app.state.limits = engine, limits
    app.state.admission = Admission(limits.max_concurrent)
    app.state.metrics = ServerMetrics(engine.config.model, lambda: engine.running,
                                      max_tokens=engine.context_len)
    app.state.started_at = int(time.time())
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, message=too_large_message(limits))
    _install_error_handlers(app)
    app.include_router(openai_router)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Answers without touching the engine: it stalls only if something blocks the event loop."""
        current = request.app.state.backend
        return {"status": "ok", "running": current.running if current else 0,
                "backend": current.kind if current else backend, "model": engine.config.model}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        dependencies=[Depends(require_json)],
        responses={
            200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
                  "description": "JSON, or with stream=true one SSE event per token, a summary, [DONE]"},
            400: {"description": "the engine rejected the prompt (e.g. too many tokens)"},
            413: {"description": "the body is larger than the server's limit"},
            415: {"description": "the body is not sent as application/json"},
            429: {"description": "max_concurrent generations are running; retry after Retry-After"},
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
        try:
            # Tokenize here (fast, no torch), so a prompt too long for the model is a 400 before any stream.
            ids = engine.encode(body.prompt)
        except ValueError as exc:  # PromptTooLong and other input the engine rejects
            raise HTTPException(400, detail=str(exc)) from exc
        gen = start_generation(request, ids, params, len(ids))
        if not body.stream:
            return await _complete(gen)
        return sse_response(_sse_stream(gen), gen)

    return app


async def _complete(gen: Generation) -> JSONResponse:
    try:
        completion = collect(await gen.collect())
    except Exception as exc:
        logger.exception("generation failed")
        return JSONResponse(error_payload(exc), status_code=500)
    finally:
        gen.close()
    return JSONResponse(completion.to_dict())


async def _sse_stream(gen: Generation):
    """SSE frames for every event of ``gen``; always ends with ``[DONE]``.

    Leaving early (the client is gone) closes ``gen.events()``, which cancels the generation.
    """
    try:
        async with aclosing(gen.events()) as events:
            async for item in events:
                yield sse_frame(item.to_dict())
    except Exception as exc:  # a fault mid-generation: report it inside the stream, keep the protocol
        logger.exception("generation failed mid-stream")
        yield error_frame(exc)
    yield DONE_FRAME


def _is_v1(request: Request) -> bool:
    return request.url.path.startswith("/v1/") or request.url.path == "/v1"


def _describe(errors: list[dict], shown: int = 5) -> tuple[str, str | None]:
    """One readable message (and the first offending field) from a validation error list."""
    parts, param = [], None
    for error in errors[:shown]:
        ctx = error.get("ctx") or {}
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({ctx.get('error', 'decode error')})")
            continue
        field = ctx.get("field") or ".".join(str(x) for x in error.get("loc", ()) if x != "body") or None
        param = param or field
        parts.append(f"{field}: {error['msg']}" if field else error["msg"])
    if len(errors) > shown:
        parts.append(f"and {len(errors) - shown} more")
    return "; ".join(parts), param


def _json_safe(errors) -> list:
    """FastAPI's 422 ``detail``, with any input JSON cannot carry (NaN, bytes) shown as its repr.

    FastAPI echoes each bad input back; for ``"temperature": NaN`` its own handler fails to encode
    the answer and the client gets a 500 instead of the 422.
    """
    out = []
    for error in jsonable_encoder(errors):
        try:
            json.dumps(error, allow_nan=False)
        except (TypeError, ValueError):
            error = {**error, "input": repr(error.get("input")), "ctx": {k: repr(v) for k, v in
                                                                         (error.get("ctx") or {}).items()}}
        out.append(error)
    return out


def _install_error_handlers(app: FastAPI) -> None:
    """``/v1`` routes answer errors in OpenAI's shape; the others keep FastAPI's ``{"detail": ...}``."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if not (_is_v1(request) or isinstance(exc, OpenAIError)):
            return await http_exception_handler(request, exc)
        body = error_body(str(exc.detail), getattr(exc, "type", OPENAI_TYPES.get(exc.status_code,
                                                                                 "invalid_request_error")),
                          getattr(exc, "param", None), getattr(exc, "code", None))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if not _is_v1(request):
            return JSONResponse({"detail": _json_safe(exc.errors())}, status_code=422)
        message, param = _describe(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # a bug: never a traceback to the client
        logger.exception("unhandled error on %s", request.url.path)
        if _is_v1(request):
            return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
        return JSONResponse({"detail": "internal server error"}, status_code=500)
