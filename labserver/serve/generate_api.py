"""The wire format of ``POST /generate``: its request model, how the request becomes a prompt and
``SamplingParams``, how the engine's events become its SSE payloads or its JSON body, and how its errors look.

One request model serves FastAPI and Flask, so both reject the same bodies with the same 422 body. Types
are strict: ``"max_tokens": "10"`` is an error, not a silent conversion. The limits that depend on the
loaded engine (``max_tokens_limit``, ``max_prompt_chars``) are checked by ``check_limits`` against the
``EngineConfig``, because a Pydantic model's bounds are fixed when the class is defined.

The stream is the engine's own events, one ``data:`` payload each (``TokenEvent.to_dict``, then
``Finish.to_dict``); the body is ``Completion.to_dict``. Errors keep FastAPI's shapes: ``{"detail": ...}``
for a 4xx (a 422 carries the list of validation errors), ``{"error": {"message", "type"}}`` for a fault
during generation (the SSE error event, or the body of the 500). The job raises ``InputError`` (no web
framework's exception), so the Flask baseline runs the same steps and answers alike.

Left out: the steps every format shares (admission, the stream's end, logging: ``pipeline``), SSE framing
(``sse``) and the OpenAI-compatible ``/v1`` schema (``openai_schemas``).
"""

from __future__ import annotations

import json
from contextlib import aclosing

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, to_jsonable_python

from ..config import EngineConfig, SamplingParams
from ..engine.sequence import collect

SEED_MAX = 2**63 - 1  # torch.manual_seed rejects larger values


def _lone_surrogate(value, path: str = ""):
    """(path, text) of the first string in ``value`` that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, value[exc.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def refuse_lone_surrogates(data):
    """A model's "before" check: text a tokenizer can take, in every string of the body.

    Valid JSON may escape a lone UTF-16 surrogate (``"\\ud800x"``); Python's JSON parser turns it into a
    str that neither UTF-8 nor the tokenizer accepts. Checked on the whole body at once, so prompts,
    messages and stop strings are refused alike, with the field named.
    """
    found = _lone_surrogate(data)
    if found:
        path, char = found
        message = f"must be valid Unicode text, got a lone UTF-16 surrogate (\\u{ord(char):04x})"
        raise PydanticCustomError("unicode_text", f"{path}: {message}" if path else message, {"path": path})
    return data


class GenerateRequest(BaseModel):
    """Body of ``POST /generate``.

    >>> GenerateRequest(prompt="Hi", temperature=0).to_sampling_params()
    SamplingParams(max_tokens=128, temperature=0.0, top_p=1.0, seed=None, ignore_eos=False, min_tokens=0)
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    _text = model_validator(mode="before")(refuse_lone_surrogates)

    prompt: str = Field(min_length=1, description="The user's message (wrapped in the chat template).")
    max_tokens: int = Field(128, ge=1, description="Tokens to generate at most (server limit applies).")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 means greedy (argmax).")
    stream: bool = Field(False, description="true: one SSE event per token; false: one JSON body.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; null = 1.0.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Fixes sampling for reproducible output.")
    ignore_eos: bool = Field(False, description="Generate max_tokens tokens, past the end-of-sequence token.")
    min_tokens: int = Field(0, ge=0, description="Tokens to generate before the end-of-sequence token may end "
                                                 "the output (<= max_tokens).")

    def to_sampling_params(self) -> SamplingParams:
        top_p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=top_p, seed=self.seed,
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)


def check_limits(request: GenerateRequest, config: EngineConfig) -> None:
    """Raise ``pydantic.ValidationError`` when ``request`` exceeds this engine's limits.

    The error has the same shape as any other validation error, so both apps answer it with a 422.
    """
    errors: list[InitErrorDetails] = []
    if request.max_tokens > config.max_tokens_limit:
        message = "max_tokens must be <= {limit} (this server's max_tokens_limit), got {value}"
        context = {"limit": config.max_tokens_limit, "value": request.max_tokens}
        errors.append(_limit_error("max_tokens", message, context, request.max_tokens))
    if request.min_tokens > request.max_tokens:
        message = "min_tokens must be <= max_tokens ({limit}), got {value}"
        context = {"limit": request.max_tokens, "value": request.min_tokens}
        errors.append(_limit_error("min_tokens", message, context, request.min_tokens))
    if len(request.prompt) > config.max_prompt_chars:
        message = "prompt must have <= {limit} characters (this server's max_prompt_chars), got {value}"
        context = {"limit": config.max_prompt_chars, "value": len(request.prompt)}
        # Echoing a huge prompt back in the error body helps nobody: show its start only.
        shown = request.prompt if len(request.prompt) <= 80 else request.prompt[:80] + "..."
        errors.append(_limit_error("prompt", message, context, shown))
    if errors:
        raise ValidationError.from_exception_data(GenerateRequest.__name__, errors)


def _limit_error(field: str, message: str, context: dict, value) -> InitErrorDetails:
    return {"type": PydanticCustomError("limit_exceeded", message, context), "loc": (field,), "input": value}


def parse_request(body: bytes | str, config: EngineConfig) -> GenerateRequest:
    """Parse and check a raw JSON body (the Flask path; FastAPI parses the body itself).

    Raises ``pydantic.ValidationError`` for bad JSON, wrong types, bad ranges and exceeded limits.
    """
    request = GenerateRequest.model_validate_json(body)
    check_limits(request, config)
    return request


def validation_detail(error: ValidationError) -> list[dict]:
    """The ``detail`` list of FastAPI's 422 body (locations start with "body"), JSON-safe."""
    errors = json.loads(error.json(include_url=False))
    for item in errors:
        item["loc"] = ["body", *item["loc"]]
    return errors


class TokenOut(BaseModel):
    """One generated token, as in each SSE token event (documentation of the JSON body)."""

    token: str = Field(description="Text this token adds to the output ('' while a character is incomplete).")
    token_id: int
    index: int = Field(description="0-based position in the output.")
    step_ms: float = Field(description="Server compute time of the step that produced this token.")
    prefill_time_ms: float | None = Field(None, description="Only on index 0: prompt forward + first token.")


class GenerateResponse(BaseModel):
    """Non-streaming body of ``POST /generate``: ``Completion.to_dict()``."""

    text: str
    tokens: list[TokenOut]
    finish_reason: str = Field(description='"stop", "length" or "cancelled".')
    usage: dict[str, int | dict[str, int]] = Field(description="prompt_tokens, completion_tokens, total_tokens, "
                                                                "prompt_tokens_details.cached_tokens.")
    timings: dict[str, float] = Field(description="prefill_time_ms, decode_time_ms, mean_step_ms, ...")


def error_payload(exc: BaseException) -> dict:
    """``{"error": {"message", "type"}}``: the SSE error event and the 500 body."""
    return {"error": {"message": str(exc) or type(exc).__name__, "type": type(exc).__name__}}


class InputError(Exception):
    """A request this format refuses before any work: ``status_code`` 422 (``detail``: the validation
    errors) or 400 (``detail``: a message)."""

    def __init__(self, status_code: int, detail):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


class GenerateJob:
    """One ``/generate`` request on its way through ``pipeline.run`` (or the Flask baseline)."""

    def __init__(self, body: GenerateRequest):
        self.request, self.stream = body, body.stream
        self.params: SamplingParams | None = None

    def validate(self, engine) -> None:
        """The limits of this engine (a Pydantic model's bounds are fixed at import): a 422 like any other."""
        try:
            check_limits(self.request, engine.config)
            self.params = self.request.to_sampling_params()
        except ValidationError as exc:
            raise InputError(422, validation_detail(exc)) from exc
        except ValueError as exc:  # SamplingParams' own checks (e.g. min_tokens > max_tokens)
            raise InputError(422, [{"type": "value_error", "loc": ["body"], "msg": str(exc)}]) from exc

    def encode(self, engine) -> list[int]:
        """Tokenize now (fast, no torch), so a prompt too long for the model is a 400 before any stream."""
        try:
            return engine.encode(self.request.prompt)
        except ValueError as exc:  # PromptTooLong and other input the engine rejects
            raise InputError(400, str(exc)) from exc

    async def frames(self, gen):
        """Per group of events the backend delivers at once, their payloads: every token, then the summary."""
        async with aclosing(gen.deliveries()) as groups:
            async for group in groups:
                yield [item.to_dict() for item in group]

    async def body(self, gen) -> dict:
        return collect(await gen.collect()).to_dict()

    def fault(self, exc: BaseException) -> dict:
        return error_payload(exc)


def http_error_body(exc) -> tuple[dict, int]:
    """FastAPI's ``{"detail": ...}`` for an HTTP error or an ``InputError`` (400, 413, 415, 429, 404, ...)."""
    return {"detail": exc.detail}, exc.status_code


def validation_error_body(errors) -> tuple[dict, int]:
    """FastAPI's 422 body, with any input JSON cannot carry (NaN, bytes) shown as its repr.

    FastAPI echoes each bad input back; for ``"temperature": NaN`` its own handler fails to encode the
    answer and the client gets a 500 instead of the 422.
    """
    out = []
    for error in to_jsonable_python(errors, fallback=repr):
        try:
            # A lone surrogate in an echoed input passes ensure_ascii but not the response's UTF-8.
            json.dumps(error, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError):
            error = {**error, "input": repr(error.get("input")), "ctx": {k: repr(v) for k, v in
                                                                         (error.get("ctx") or {}).items()}}
        out.append(error)
    return {"detail": out}, 422


def server_error_body() -> tuple[dict, int]:
    return {"detail": "internal server error"}, 500
