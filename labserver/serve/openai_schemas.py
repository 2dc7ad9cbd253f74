"""The wire format of the OpenAI-compatible ``/v1`` routes: request models, response models, errors.

Requests are strict like ``/generate``'s: wrong types and unknown fields are errors (a 400 here, as the
OpenAI API answers). Parameters this server cannot honour are accepted only with the value that asks
for nothing (``n=1``, ``presence_penalty=0``, ``logprobs=null``, ``tools=[]`` ...), so common clients
that send defaults keep working while a request that really asks for them gets a 400 naming the field,
rather than a silently different answer.

Supported beyond the basics: ``stop`` (up to 4 strings of up to 256 characters, applied to the text by the web layer),
``seed``, ``stream_options.include_usage``, ``max_completion_tokens`` (the same limit as ``max_tokens``:
both given and different is a 400), chat content as a list of text parts, and the vLLM extensions that
benchmark clients send (guidellm, ``vllm bench serve``): ``ignore_eos``, ``min_tokens`` and
``stream_options.continuous_usage_stats``. Left out: batched or token-id prompts, ``n > 1``, logprobs,
``echo``, penalties, ``logit_bias``, stop token ids, tools/function calling, structured output
(``response_format``), images and audio (a part of any type but text is a 400 that says so).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .generate_api import SEED_MAX, refuse_lone_surrogates

MAX_STOP_STRINGS = 4
# Matching holds back any tail that could still grow into a stop string, so its cost per token grows with
# the strings' length; a stop sequence is a few words in practice.
MAX_STOP_CHARS = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and empty `choices`.")
    continuous_usage_stats: bool = Field(False, description="With include_usage: every chunk carries the usage "
                                                            "so far (a vLLM extension).")


class _V1Request(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    _text = model_validator(mode="before")(refuse_lone_surrogates)
    # field -> the only value accepted (it asks for nothing this server would have to do)
    NO_OP: ClassVar[dict[str, Any]] = {
        "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
        "logit_bias": None,
    }

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); null = that one.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (server limit applies).")
    max_completion_tokens: int | None = Field(None, ge=1, description="The same limit as max_tokens (OpenAI's "
                                                                      "newer name); give one, or both equal.")
    min_tokens: int = Field(0, ge=0, description="Tokens to generate before the end-of-sequence token or a stop "
                                                 "string may end the output (a vLLM extension).")
    ignore_eos: bool = Field(False, description="Generate to max_tokens past the end-of-sequence token, as "
                                                "benchmarks ask (a vLLM extension).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy (argmax).")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings of at most 256 characters; the "
                                                              "output ends before the first.")
    user: str | None = Field(None, description="Accepted and ignored (an end-user id for abuse monitoring).")
    n: int = Field(1, description="Only 1.")
    presence_penalty: float = Field(0.0, description="Only 0.")
    frequency_penalty: float = Field(0.0, description="Only 0.")
    repetition_penalty: float = Field(1.0, description="Only 1 (a vLLM extension).")
    logit_bias: dict[str, float] | None = Field(None, description="Only null or {}.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"stop strings must have at most {MAX_STOP_CHARS} characters, got {longest}")
        return value

    @model_validator(mode="after")
    def _only_supported(self):
        for name, accepted in self.NO_OP.items():
            value = getattr(self, name)
            if not _asks_nothing(value, accepted):
                # Formatted here: the template is not str.format'ed, so a value's braces are safe.
                message = f"only {json.dumps(accepted)} is supported by this server, got {json.dumps(value)}"
                raise PydanticCustomError("unsupported", message, {"field": name})
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("unsupported", "only allowed with stream=true", {"field": "stream_options"})
        given = "max_tokens" in self.model_fields_set and self.max_tokens is not None
        if given and self.max_completion_tokens not in (None, self.max_tokens):
            message = (f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) "
                       "are the same limit: send one, or both equal")
            raise PydanticCustomError("conflict", message, {"field": "max_completion_tokens"})
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field the limit came from, to name in an error."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


def _asks_nothing(value, accepted) -> bool:
    """True for null, the accepted value itself, and an empty {} or [] where null is accepted."""
    if value is None or value is accepted or (accepted is None and value in ({}, [])):
        return True
    # 0 == 0.0 is the same penalty, but False == 0 is not the same as "no logprobs": compare bools by identity.
    return not isinstance(value, bool) and not isinstance(accepted, bool) and value == accepted


class CompletionRequest(_V1Request):
    """Body of ``POST /v1/completions``: a raw prompt, no chat template."""

    NO_OP: ClassVar[dict[str, Any]] = {**_V1Request.NO_OP, "echo": False, "logprobs": None, "best_of": None,
                                       "suffix": None}
    prompt: str = Field(min_length=1, description="One prompt string (no batches, no token ids).")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most (default 16, as OpenAI).")
    echo: bool = Field(False, description="Only false.")
    logprobs: int | None = Field(None, description="Only null.")
    best_of: int | None = Field(None, description="Only null or 1.")
    suffix: str | None = Field(None, description="Only null.")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value):
        return None if value == 1 else value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts (not null: no tool calls).")
    name: str | None = Field(None, description="Accepted; chat templates ignore it.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value):
        if value is None:  # OpenAI's null content goes with tool calls, which this server does not make
            raise PydanticCustomError("null_content", "must be text or a list of text parts, not null")
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                # Formatted here, not by pydantic: the part's type may hold braces.
                message = (f"Input should be 'text': this server takes text parts only, got a part of type "
                           f"{json.dumps(kind[:40])}")
                raise PydanticCustomError("unsupported", message)
        return value

    def to_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_V1Request):
    """Body of ``POST /v1/chat/completions``: messages through the model's chat template."""

    NO_OP: ClassVar[dict[str, Any]] = {**_V1Request.NO_OP, "logprobs": False, "top_logprobs": None,
                                       "tools": None, "tool_choice": None, "response_format": None}
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(None, description="Only null or false.")
    top_logprobs: int | None = Field(None, description="Only null.")
    tools: list[dict[str, Any]] | None = Field(None, description="Only null or [].")
    tool_choice: Literal["none"] | None = Field(None, description="Only null or \"none\".")
    response_format: dict[str, Any] | None = Field(None, description='Only null or {"type": "text"}.')

    @field_validator("response_format")
    @classmethod
    def _plain_text(cls, value):
        return None if value == {"type": "text"} else value

    @field_validator("tool_choice")
    @classmethod
    def _no_tools(cls, value):
        return None if value == "none" else value


# -- responses (for the OpenAPI document and schemathesis; the routes build plain dicts) ---------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens found in the prefix cache (not computed again).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
