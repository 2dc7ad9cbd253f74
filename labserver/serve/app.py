"""The async server's routes: ``POST /generate``, the OpenAI-compatible ``/v1`` routes, ``/metrics``,
``/health`` and the browser page at ``/``.

The app never runs the model itself. A *backend* does (``backends.make_backend``): by default the engine
core on its own thread (``engine.core.EngineCore``, continuous batching), so the event loop only moves
bytes and ``/health`` answers while tokens are being generated. The lab's ``"blocking"`` backend breaks
that rule on purpose.

Every generating route is one line into ``pipeline.run`` with its wire format's job: ``/generate`` speaks
``generate_api`` (the engine's own events as SSE), ``/v1`` speaks ``openai_api``::

    data: {"token": " Paris", "token_id": 7042, "index": 0, "step_ms": 61.2, "prefill_time_ms": 61.2}
    data: {"finish_reason": "length", "usage": {...}, "timings": {...}}
    data: [DONE]

A client that leaves cancels its generation: mid-stream Starlette notices on the next send or receive;
a non-streaming request listens for the disconnect while it waits (``pipeline``). ``/health`` reports the
engine (``backend.health()``, ``health.EngineHealth``) and answers 503 with a ``reason`` when it is dead
or wedged, or while the server stops (``drain``); generating requests get the same 503 then. With
``--api-servers`` it also reports the API processes (``api_servers.status``). Limits (``limits.ServerLimits``): body size (413),
JSON content type (415), concurrent generations (429), a client that reads nothing (dropped), a stream
kept alive with SSE comments. Errors on ``/v1`` routes use OpenAI's body, elsewhere FastAPI's
``{"detail": ...}``. Left out: authentication, TLS, request queues.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..model import kernels
from . import generate_api, openai_api
from .limits.asgi import BodyLimit, require_json
from .limits import Admission, ServerLimits, too_large_message
from .metrics import CONTENT_TYPE, ServerMetrics
from .openai_api import OpenAIError, OpenAIJob
from .openai_schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                             CompletionResponse, ErrorResponse, ModelCard, ModelList)
from .pipeline import install_error_handlers, run
from .sse import SSE_EVENT_SCHEMA
from .drain import Drain
from .health import engine_state, unavailable
from .backends import make_backend
from .generate_api import GenerateJob, GenerateRequest, GenerateResponse

PAGE = files("labserver.serve").joinpath("static/index.html").read_text(encoding="utf-8")
# The page is static and writes tokens with textContent; it needs nothing from anywhere else.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff"}


def create_app(engine, backend: str = "auto", limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` through ``backend`` ("auto", "batched", "thread", "process",
    "executor" or "blocking"; see ``backends.make_backend``).

    The backend is made now (so a bad name fails here; it starts no thread), started when the server
    starts and closed when it shuts down; a restart of the same app makes a fresh one. Served without a
    lifespan (an ASGI test client), the engine thread starts on the first request.
    ``limits`` defaults to ``ServerLimits()``.
    """
    limits = limits or ServerLimits()
    # What /health tells about the engine: the weight format that runs and why, and the kernels' vector
    # path on this CPU (None: no C compiler).
    route = {**engine.route, "kernels": kernels.path()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.backend is None:
            app.state.backend = make_backend(engine, backend, limits.stream_interval)
        app.state.backend.start()
        try:
            yield
        finally:
            app.state.backend.close()
            app.state.backend = None

    app = FastAPI(title="labserver", summary="A small streaming LLM server for the lab.", lifespan=lifespan)
    app.state.backend = make_backend(engine, backend, limits.stream_interval)
    app.state.engine, app.state.limits = engine, limits
    app.state.admission = Admission(limits.max_concurrent)
    app.state.drain = Drain()
    app.state.api_servers = None  # with --api-servers: reads the launcher's view of the API processes
    app.state.metrics = ServerMetrics(engine.config.model, lambda: engine.running, max_tokens=engine.context_len,
                                      kv=lambda: app.state.backend and app.state.backend.health().kv)
    app.state.started_at = int(time.time())
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, message=too_large_message(limits))
    _install_error_handlers(app)
    app.include_router(openai_router)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/health", responses={503: {"description": "the engine is dead or wedged, or the server is "
                                                      "stopping: see `reason`"}})
    async def health(request: Request):
        """Asks the backend what it knows (no engine work): it stalls only if something blocks the event loop."""
        current = request.app.state.backend
        if current is None:  # the server is shutting down
            return JSONResponse({"status": "unavailable", "reason": "the server is stopping", "running": 0,
                                 "backend": backend, "model": engine.config.model, "route": route}, 503)
        state = current.health()
        stopping = request.app.state.drain.reason
        reason = stopping or unavailable(state, limits.wedged_after_s)
        # A backend that never restarts its engine (the engine thread) has max_restarts 0: dead is failed.
        states = engine_state(state, getattr(current, "max_restarts", 0), limits.wedged_after_s)
        body = {"status": "ok" if reason is None else "unavailable", **states, "engine": state.to_dict(),
                "running": current.running, "backend": current.kind, "model": engine.config.model, "route": route}
        if stopping is not None:
            body["stopping"] = True
        if request.app.state.api_servers is not None:
            body["api_servers"] = request.app.state.api_servers()
        return body if reason is None else JSONResponse({**body, "reason": reason}, status_code=503)

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
            503: {"description": "the engine is dead or wedged (also a non-streaming request whose engine died)"},
        },
    )
    async def generate(body: GenerateRequest, request: Request):
        return await run(request, GenerateJob(body))

    return app


# -- /v1: the OpenAI-compatible API --------------------------------------------------------------------
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 429, 500, 503)}
STREAM = {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
          "description": "JSON, or with stream=true one chunk per token, then [DONE]"}
openai_router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


@openai_router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_card(request)]}


@openai_router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, request: Request) -> dict:
    openai_api.check_model(request.app.state.engine, model_id)
    return _card(request)


def _card(request: Request) -> dict:
    state = request.app.state
    return {"id": state.engine.config.model, "object": "model", "created": state.started_at,
            "owned_by": "labserver", "max_model_len": state.engine.context_len}


@openai_router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, 200: STREAM},
                    dependencies=[Depends(require_json)])
async def completions(body: CompletionRequest, request: Request):
    """A raw prompt, no chat template (as vLLM's /v1/completions)."""
    return await run(request, OpenAIJob(body, chat=False))


@openai_router.post("/chat/completions", response_model=ChatCompletionResponse,
                    responses={**ERRORS, 200: STREAM}, dependencies=[Depends(require_json)])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Messages through the model's chat template."""
    return await run(request, OpenAIJob(body, chat=True))


# -- errors raised before a response starts: each format words its own ---------------------------------
def _is_v1(request: Request) -> bool:
    return request.url.path.startswith("/v1/") or request.url.path == "/v1"


def _shapes(request: Request, exc: Exception):
    return openai_api if _is_v1(request) or isinstance(exc, OpenAIError) else generate_api


def _install_error_handlers(app: FastAPI) -> None:
    install_error_handlers(app, _shapes)
