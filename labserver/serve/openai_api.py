"""The wire format of the OpenAI-compatible API (the protocol vLLM, SGLang and llama.cpp speak).

``/v1/completions`` (a raw prompt) and ``/v1/chat/completions`` (messages through the model's chat
template) go through ``pipeline.run`` with an ``OpenAIJob``; the request models are in
``openai_schemas``. A chat stream looks like::

    data: {"id": "chatcmpl-..", "object": "chat.completion.chunk", ..., "choices": [{"index": 0,
           "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}
    data: {... "choices": [{"index": 0, "delta": {"content": " Paris"}, ..., "finish_reason": null}]}
    data: {... "choices": [{"index": 0, "delta": {"content": "."}, ..., "finish_reason": "length"}]}
    data: {... "choices": [], "usage": {"prompt_tokens": 9, ...}}     (with stream_options.include_usage)
    data: [DONE]

One chunk per generated token. ``finish_reason`` rides on the last content chunk when the server knows
it is the last: the ``max_tokens``-th token, or the one that completes a stop string. When the model
ends with its end-of-sequence token, that token has no text, so the finish comes in a chunk with an
empty delta (as the OpenAI API sends it). With ``include_usage`` every chunk has ``"usage": null`` and a
last chunk carries the usage; with vLLM's ``continuous_usage_stats`` too, every chunk carries the usage
so far instead (vLLM ignores ``continuous_usage_stats`` without ``include_usage``, and so does this).

Stop strings are applied here, on the text (``stop_strings.StopMatcher``), and a match cancels the
generation; as in vLLM they are looked for only once ``min_tokens`` tokens exist. Errors use OpenAI's
body ``{"error": {"message", "type", "param", "code"}}``, also for a fault inside a stream. Left out:
everything ``openai_schemas`` rejects (n > 1, logprobs, tools, ...).
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import HTTPException

from ..config import SamplingParams
from ..engine.prompts import PromptTooLong
from ..engine.sequence import Finish, TokenEvent, max_new_tokens
from .stop_strings import StopMatcher

OPENAI_TYPES = {404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}


class OpenAIError(HTTPException):
    """An HTTP error with OpenAI's ``type``/``param``/``code``; rendered as OpenAI's body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(status, detail=message, headers=headers)
        self.type, self.param, self.code = type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def check_model(engine, model: str | None) -> str:
    """The served model's id; a 404 for any other (null means the served one)."""
    served = engine.config.model
    if model not in (None, served):
        raise OpenAIError(404, f"The model `{model}` does not exist. This server serves `{served}`.",
                          param="model", code="model_not_found")
    return served


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None


async def pieces(gen, stops: list[str], max_out: int, min_tokens: int, usage: dict):
    """One ``Piece`` per group of tokens the backend delivers at once (one token each with a stream
    interval of 1); the last carries the finish reason. Keeps ``usage`` current."""
    matcher, n, done = StopMatcher(stops), 0, False
    async with aclosing(gen.deliveries()) as groups:
        async for group in groups:
            text, reason, any_news = "", None, False
            for item in group:
                if isinstance(item, TokenEvent) and not done:
                    n, any_news = n + 1, True
                    usage.update(completion_tokens=n, total_tokens=usage["prompt_tokens"] + n)
                    piece, stopped = matcher.feed(item.token) if n >= min_tokens else (item.token, False)
                    text += piece
                    if stopped:
                        gen.finish("stop")
                        yield Piece(text, "stop")
                        return  # leaving the `async with` cancels the generation
                    done = n >= max_out
                    if done:
                        text, reason = text + matcher.flush(), "length"
                elif isinstance(item, Finish):
                    usage.update(item.usage)
                    if not done:
                        text += matcher.flush()
                        reason, any_news = "length" if item.finish_reason == "length" else "stop", True
            if any_news:
                yield Piece(text, reason)


class Reply:
    """Builds the JSON objects of one response: chunks, the usage chunk, or the whole body."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False, continuous_usage: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.continuous_usage = include_usage and continuous_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, piece: Piece | None, usage: dict) -> dict:
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
        if self.continuous_usage:
            return {**out, "usage": dict(usage)}
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


class OpenAIJob:
    """One ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` request in ``pipeline.run``."""

    def __init__(self, body, chat: bool):
        self.request, self.chat, self.stream = body, chat, body.stream
        self.params: SamplingParams | None = None
        self.reply: Reply | None = None
        self.max_out = 0
        self.usage: dict = {}

    def validate(self, engine) -> None:
        body, limit = self.request, engine.config.max_tokens_limit
        model = check_model(engine, body.model)
        max_tokens, param = body.max_new_tokens, body.max_tokens_param
        if max_tokens is not None and max_tokens > limit:
            raise OpenAIError(400, f"{param} must be <= {limit} (this server's max_tokens_limit), got {max_tokens}",
                              param=param)
        if body.min_tokens > (max_tokens or limit):
            raise OpenAIError(400, f"min_tokens must be <= {param} ({max_tokens or limit}), got {body.min_tokens}",
                              param="min_tokens")
        try:
            self.params = SamplingParams(max_tokens=max_tokens or limit, temperature=body.temperature,
                                         top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos,
                                         min_tokens=body.min_tokens)
        except ValueError as exc:
            raise OpenAIError(400, str(exc)) from exc
        self.reply = Reply(self.chat, model, body.include_usage, body.continuous_usage)

    def encode(self, engine) -> list[int]:
        param = "messages" if self.chat else "prompt"
        try:
            if self.chat:
                ids = engine.encode_messages([m.to_template() for m in self.request.messages])
            else:
                ids = engine.encode(self.request.prompt, chat=False)
        except PromptTooLong as exc:
            raise OpenAIError(400, str(exc), param=param, code="context_length_exceeded") from exc
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param=param) from exc
        self.max_out = max_new_tokens(self.params.max_tokens, engine.context_len, len(ids))
        self.usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        return ids

    def _pieces(self, gen):
        return pieces(gen, self.request.stops, self.max_out, self.request.min_tokens, self.usage)

    async def frames(self, gen):
        """Lists of chunks, one list per write: the role first (chat), a chunk per group of tokens, the usage."""
        if self.chat:
            yield [self.reply.chunk(None, self.usage)]
        async with aclosing(self._pieces(gen)) as items:
            async for piece in items:
                yield [self.reply.chunk(piece, self.usage)]
        if self.reply.include_usage:
            yield [self.reply.usage_chunk(self.usage)]

    async def body(self, gen) -> dict:
        async with aclosing(self._pieces(gen)) as items:
            parts = [piece async for piece in items]
        reason = parts[-1].finish_reason if parts else None
        return self.reply.body("".join(p.text for p in parts), reason, self.usage)

    def fault(self, exc: BaseException) -> dict:
        return error_body(str(exc) or type(exc).__name__, "server_error")


# -- errors raised before a response starts (see pipeline.install_error_handlers) ----------------------
def http_error_body(exc: HTTPException) -> tuple[dict, int]:
    kind = getattr(exc, "type", OPENAI_TYPES.get(exc.status_code, "invalid_request_error"))
    return error_body(str(exc.detail), kind, getattr(exc, "param", None), getattr(exc, "code", None)), exc.status_code


def validation_error_body(errors: list[dict]) -> tuple[dict, int]:
    """OpenAI answers a malformed request with a 400 (FastAPI's would be a 422)."""
    message, param = describe(errors)
    return error_body(message, param=param), 400


def server_error_body() -> tuple[dict, int]:
    return error_body("internal server error", "server_error"), 500


def describe(errors: list[dict], shown: int = 5) -> tuple[str, str | None]:
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
