"""The wire format of ``POST /generate``: how its request becomes a prompt and ``SamplingParams``, how the
engine's events become its SSE frames or its JSON body, and how its errors look.

The stream is the engine's own events, one ``data:`` line each (``TokenEvent.to_dict``, then
``Finish.to_dict``); the body is ``Completion.to_dict``. Errors keep FastAPI's shapes: ``{"detail": ...}``
for a 4xx (a 422 carries FastAPI's list of validation errors), ``{"error": {"message", "type"}}`` for a
fault during generation (the SSE error event, or the body of the 500). The Flask baseline uses the same
steps and shapes, so the two apps answer alike. Left out: the steps every format shares (admission, the
stream's end, logging: ``pipeline``) and the request model itself (``schemas``).
"""

from __future__ import annotations

import json
from contextlib import aclosing

from fastapi import HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..config import SamplingParams
from ..engine.engine import collect
from .schemas import GenerateRequest, check_limits, error_payload, validation_detail


class GenerateJob:
    """One ``/generate`` request on its way through ``pipeline.run``."""

    def __init__(self, body: GenerateRequest):
        self.request, self.stream = body, body.stream
        self.params: SamplingParams | None = None

    def validate(self, engine) -> None:
        """The limits of this engine (a Pydantic model's bounds are fixed at import): a 422 like any other."""
        try:
            check_limits(self.request, engine.config)
            self.params = self.request.to_sampling_params()
        except ValidationError as exc:
            raise RequestValidationError(validation_detail(exc)) from exc
        except ValueError as exc:  # SamplingParams' own checks (e.g. min_tokens > max_tokens)
            raise RequestValidationError([{"type": "value_error", "loc": ["body"], "msg": str(exc)}]) from exc

    def encode(self, engine) -> list[int]:
        """Tokenize now (fast, no torch), so a prompt too long for the model is a 400 before any stream."""
        try:
            return engine.encode(self.request.prompt)
        except ValueError as exc:  # PromptTooLong and other input the engine rejects
            raise HTTPException(400, detail=str(exc)) from exc

    async def frames(self, gen):
        """One payload per event: every token, then the summary."""
        async with aclosing(gen.events()) as events:
            async for item in events:
                yield item.to_dict()

    async def body(self, gen) -> dict:
        return collect(await gen.collect()).to_dict()

    def fault(self, exc: BaseException) -> dict:
        return error_payload(exc)


def http_error_body(exc: HTTPException) -> tuple[dict, int]:
    """FastAPI's ``{"detail": ...}`` (413, 415, 429, 404, ...)."""
    return {"detail": exc.detail}, exc.status_code


def validation_error_body(errors) -> tuple[dict, int]:
    """FastAPI's 422 body, with any input JSON cannot carry (NaN, bytes) shown as its repr.

    FastAPI echoes each bad input back; for ``"temperature": NaN`` its own handler fails to encode the
    answer and the client gets a 500 instead of the 422.
    """
    out = []
    for error in jsonable_encoder(errors):
        try:
            json.dumps(error, allow_nan=False)
        except (TypeError, ValueError):
            error = {**error, "input": repr(error.get("input")), "ctx": {k: repr(v) for k, v in
                                                                         (error.get("ctx") or {}).items()}}
        out.append(error)
    return {"detail": out}, 422


def server_error_body() -> tuple[dict, int]:
    return {"detail": "internal server error"}, 500
