"""The OpenAI-compatible API (the protocol vLLM, SGLang and llama.cpp speak), on the same engine thread.

``POST /v1/completions`` (a raw prompt) and ``POST /v1/chat/completions`` (messages through the
model's chat template), streaming or not, and ``GET /v1/models``. A chat stream looks like::

    data: {"id": "chatcmpl-..", "object": "chat.completion.chunk", ..., "choices": [{"index": 0,
           "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}
    data: {... "choices": [{"index": 0, "delta": {"content": " Paris"}, ..., "finish_reason": null}]}
    data: {... "choices": [{"index": 0, "delta": {"content": "."}, ..., "finish_reason": "length"}]}
    data: {... "choices": [], "usage": {"prompt_tokens": 9, ...}}     (with stream_options.include_usage)
    data: [DONE]

One chunk per generated token. ``finish_reason`` rides on the last content chunk when the server knows
it is the last: the ``max_tokens``-th token, or the one that completes a stop string. When the model
ends with its end-of-sequence token, that token has no text, so the finish comes in a chunk with an
empty delta (as the OpenAI API sends it). A fault during generation becomes
``data: {"error": {...}}`` then ``data: [DONE]``. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``.

Stop strings are applied here, on the text (``stop_strings.StopMatcher``), and a match cancels the
generation. Left out: everything ``openai_schemas`` rejects (n > 1, logprobs, tools, ...).
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from ..config import SamplingParams
from ..engine.engine import Finish, PromptTooLong, TokenEvent
from .limits import require_json
from .openai_schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                             CompletionResponse, ErrorResponse, ModelCard, ModelList)
from .schemas import DONE_FRAME, SSE_EVENT_SCHEMA, sse_frame
from .stop_strings import StopMatcher
from .generation import Generation, sse_response, start_generation

logger = logging.getLogger(__name__)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 429, 500)}
STREAM = {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
          "description": "JSON, or with stream=true one chunk per token, then [DONE]"}
router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


class OpenAIError(HTTPException):
    """An HTTP error with OpenAI's ``type``/``param``/``code``; the app renders it as OpenAI's body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(status, detail=message, headers=headers)
        self.type, self.param, self.code = type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None


async def pieces(gen: Generation, stops: list[str], max_out: int, usage: dict):
    """One ``Piece`` per generated token; the last carries the finish reason. Fills ``usage``."""
    matcher, n, done = StopMatcher(stops), 0, False
    async with aclosing(gen.events()) as events:
        async for item in events:
            if isinstance(item, TokenEvent) and not done:
                n += 1
                usage.update(completion_tokens=n, total_tokens=usage["prompt_tokens"] + n)
                text, stopped = matcher.feed(item.token)
                if stopped:
                    gen.finish("stop")
                    yield Piece(text, "stop")
                    return  # leaving the `async with` cancels the generation
                done = n >= max_out
                yield Piece(text + matcher.flush(), "length") if done else Piece(text)
            elif isinstance(item, Finish):
                usage.update(item.usage)
                if not done:
                    yield Piece(matcher.flush(), "length" if item.finish_reason == "length" else "stop")


class Reply:
    """Builds the JSON objects of one response: chunks, the usage chunk, or the whole body."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, piece: Piece | None = None) -> dict:
        """A streaming chunk: ``None`` is the chat stream's first chunk, which names the role."""
        if not self.chat:
            choice = {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        else:
            if piece is None:
                delta, reason = {"role": "assistant", "content": ""}, None
            else:
                delta = {"content": piece.text} if piece.text or not piece.finish_reason else {}
                reason = piece.finish_reason
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        return {**out, "usage": None} if self.include_usage else out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}

    def body(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}


async def _sse(reply: Reply, stream, usage: dict):
    try:
        if reply.chat:
            yield sse_frame(reply.chunk())
        async with aclosing(stream) as items:
            async for piece in items:
                yield sse_frame(reply.chunk(piece))
        if reply.include_usage:
            yield sse_frame(reply.usage_chunk(usage))
    except Exception as exc:  # a fault mid-generation: report it inside the stream, keep the protocol
        logger.exception("generation failed mid-stream")
        yield sse_frame(error_body(str(exc) or type(exc).__name__, "server_error"))
    yield DONE_FRAME


def _served(request: Request) -> str:
    return request.app.state.engine.config.model


def _check_model(request: Request, model: str | None) -> str:
    served = _served(request)
    if model not in (None, served):
        raise OpenAIError(404, f"The model `{model}` does not exist. This server serves `{served}`.",
                          param="model", code="model_not_found")
    return served


def _encode(encode, param: str) -> list[int]:
    try:
        return encode()
    except PromptTooLong as exc:
        raise OpenAIError(400, str(exc), param=param, code="context_length_exceeded") from exc
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param=param) from exc


async def _serve(request: Request, body, ids: list[int], chat: bool):
    engine = request.app.state.engine
    limit = engine.config.max_tokens_limit
    max_tokens = body.max_new_tokens if chat else body.max_tokens
    param = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    if max_tokens is not None and max_tokens > limit:
        raise OpenAIError(400, f"{param} must be <= {limit} (this server's max_tokens_limit), got {max_tokens}",
                          param=param)
    try:
        params = SamplingParams(max_tokens=max_tokens or limit, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed)
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from exc
    # The engine generates at most what fits the context (engine.Engine._generate does the same).
    max_out = min(params.max_tokens, getattr(engine, "context_len", 1 << 62) - len(ids))
    reply = Reply(chat, _served(request), body.include_usage)
    usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    gen = start_generation(request, ids, params, len(ids))
    stream = pieces(gen, body.stops, max_out, usage)
    if body.stream:
        return sse_response(_sse(reply, stream, usage), gen)
    try:
        async with aclosing(stream) as items:
            parts = [piece async for piece in items]
    except Exception as exc:
        logger.exception("generation failed")
        return JSONResponse(error_body(str(exc) or type(exc).__name__, "server_error"), status_code=500)
    finally:
        gen.close()
    reason = parts[-1].finish_reason if parts else None
    return JSONResponse(reply.body("".join(p.text for p in parts), reason, usage))


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_card(request)]}


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, request: Request) -> dict:
    _check_model(request, model_id)
    return _card(request)


def _card(request: Request) -> dict:
    state = request.app.state
    return {"id": _served(request), "object": "model", "created": state.started_at, "owned_by": "labserver",
            "max_model_len": getattr(state.engine, "context_len", None)}


@router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, 200: STREAM},
             dependencies=[Depends(require_json)])
async def completions(body: CompletionRequest, request: Request):
    """A raw prompt, no chat template (as vLLM's /v1/completions)."""
    _check_model(request, body.model)
    engine = request.app.state.engine
    ids = _encode(lambda: engine.encode(body.prompt, chat=False), "prompt")
    return await _serve(request, body, ids, chat=False)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, 200: STREAM},
             dependencies=[Depends(require_json)])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Messages through the model's chat template."""
    _check_model(request, body.model)
    engine = request.app.state.engine
    ids = _encode(lambda: engine.encode_messages([m.to_template() for m in body.messages]), "messages")
    return await _serve(request, body, ids, chat=True)
