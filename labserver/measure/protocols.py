"""Wire protocols: where a client POSTs, the body it sends, and what each event or JSON body means.

Two formats: labserver's own POST /generate (`LABSERVER`, with the server's per-token `step_ms`) and the
OpenAI-compatible /v1/completions or /v1/chat/completions that vLLM, SGLang and llama.cpp serve
(`OpenAIProtocol`; no server timings, so only the client-side metrics). A `Protocol` builds the request
body and turns one parsed event into `TokenChunk`s; everything that times and records lives in
`client.py`, so a new server needs only a new protocol.

    >>> LABSERVER.parse_event({"token": " Paris", "token_id": 7, "step_ms": 5.0}).tokens[0].text
    ' Paris'
    >>> OpenAIProtocol("m", chat=True).parse_event({"choices": [{"delta": {"role": "assistant"}}]}).tokens
    []

Left out: the HTTP calls themselves and any timing (`client.py`), authentication beyond a bearer key.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field

import httpx


@dataclass
class TokenChunk:
    text: str
    token_id: int | None = None
    step_ms: float | None = None
    prefill_time_ms: float | None = None
    batch: int | None = None  # sequences that shared the step (labserver's batched scheduler)


@dataclass
class Parsed:
    """What one SSE event (or one non-streaming body) carries."""
    tokens: list[TokenChunk] = field(default_factory=list)
    finish: dict = field(default_factory=dict)  # whichever of finish_reason / usage / timings it has
    error: dict | None = None                    # {"message", "type"}


class Protocol(typing.Protocol):
    """A wire format: where to POST, the body to send, and what each event or JSON body means."""
    path: str  # e.g. "/generate"; appended to the server's base URL
    done: str  # the `data:` payload that ends a stream
    last_event_ends: bool  # the event that carries the finish ends the stream (a format without [DONE])

    def request(self, prompt: str, max_tokens: int, temperature: float, stream: bool, **extra) -> dict: ...
    def parse_event(self, data: dict) -> Parsed: ...
    def parse_body(self, body: dict) -> Parsed: ...


class LabserverProtocol:
    """labserver's POST /generate: one `data:` event per token, one summary event, `data: [DONE]`."""
    path = "/generate"
    done = "[DONE]"
    last_event_ends = False

    def request(self, prompt: str, max_tokens: int, temperature: float, stream: bool, **extra) -> dict:
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": stream, **extra}

    def parse_event(self, data: dict) -> Parsed:
        if "error" in data:
            return Parsed(error=data["error"])
        if "token" in data:
            chunk = TokenChunk(data["token"], data.get("token_id"), data.get("step_ms"),
                               data.get("prefill_time_ms"), data.get("batch"))
            return Parsed(tokens=[chunk])
        return Parsed(finish={k: data[k] for k in ("finish_reason", "usage", "timings") if k in data})

    def parse_body(self, body: dict) -> Parsed:
        parsed = self.parse_event({k: v for k, v in body.items() if k not in ("tokens", "text")})
        parsed.tokens = [c for event in body.get("tokens", []) for c in self.parse_event(event).tokens]
        return parsed


LABSERVER = LabserverProtocol()


class OpenAIProtocol:
    """OpenAI's streaming completions (vLLM, SGLang, llama.cpp and our /v1): chunks of one or more tokens.

    `chat=True` sends the prompt as one user message to /v1/chat/completions. A stream asks for the usage
    chunk (`stream_options.include_usage`), which fills `Trace.usage`: a server may pack several tokens
    into one chunk, so the token count comes from `usage.completion_tokens`, not from counting chunks.
    `continuous_usage=True` also asks for vLLM's `continuous_usage_stats` (usage on every chunk); a strict
    server refuses that field, so turn it off there (`without_continuous_usage`). A chunk that carries no
    text (the chat role chunk, the usage chunk) is not output: TTFT counts from the first chunk with
    content, reasoning content included (vLLM's `reasoning_content`, llama.cpp's and SGLang's `reasoning`).
    """
    done = "[DONE]"
    last_event_ends = False

    def __init__(self, model: str, chat: bool = False, api_key: str | None = None, continuous_usage: bool = False):
        self.model, self.chat, self.api_key, self.continuous_usage = model, chat, api_key, continuous_usage
        self.path = "/v1/chat/completions" if chat else "/v1/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def without_continuous_usage(self) -> "OpenAIProtocol":
        return OpenAIProtocol(self.model, self.chat, self.api_key, continuous_usage=False)

    def request(self, prompt: str, max_tokens: int, temperature: float, stream: bool, **extra) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "stream": stream,
                **({"messages": [{"role": "user", "content": prompt}]} if self.chat else {"prompt": prompt})}
        if stream:
            body["stream_options"] = {"include_usage": True, **({"continuous_usage_stats": True}
                                                                 if self.continuous_usage else {})}
        return {**body, **extra}

    def _text(self, choice: dict) -> str | None:
        if self.chat:
            delta = choice.get("delta") or choice.get("message") or {}
            return "".join(delta.get(k) or "" for k in ("reasoning_content", "reasoning", "content"))
        return choice.get("text")

    def parse_event(self, data: dict) -> Parsed:
        if "error" in data:
            return Parsed(error=data["error"])
        parsed = Parsed(finish={"usage": data["usage"]} if data.get("usage") else {})
        for choice in data.get("choices") or []:
            if text := self._text(choice):
                parsed.tokens.append(TokenChunk(text))
            if choice.get("finish_reason"):
                parsed.finish["finish_reason"] = choice["finish_reason"]
        return parsed

    def parse_body(self, body: dict) -> Parsed:
        return self.parse_event(body)


class LlamaCppProtocol:
    """llama.cpp's `llama-server` native POST /completion: one event per token, then a `stop: true` event.

    `prompt` may be text or a list of token ids (then the server tokenizes nothing). Each token event
    carries the token's id in `tokens`; a token that ends inside a UTF-8 character sends no event (its
    text comes with the next one), so `usage.completion_tokens` is the server's count. The last event's
    `timings` (`prompt_ms`, `predicted_per_token_ms`, `cache_n`) land in `Trace.timings`. That event
    ends the stream: this format has no `data: [DONE]`.
    """
    path = "/completion"
    done = "[DONE]"        # never sent here: the `stop: true` event is the last one
    last_event_ends = True
    _FINISH = {"limit": "length", "eos": "stop", "word": "stop"}

    def request(self, prompt, max_tokens: int, temperature: float, stream: bool, **extra) -> dict:
        return {"prompt": prompt, "n_predict": max_tokens, "temperature": temperature, "stream": stream, **extra}

    def parse_event(self, data: dict) -> Parsed:
        if "error" in data:
            return Parsed(error=data["error"])
        if not data.get("stop"):
            ids = data.get("tokens") or []
            return Parsed(tokens=[TokenChunk(data.get("content", ""), ids[-1] if ids else None)])
        usage = {"prompt_tokens": data.get("tokens_evaluated"), "completion_tokens": data.get("tokens_predicted")}
        return Parsed(finish={"finish_reason": self._FINISH.get(data.get("stop_type"), data.get("stop_type")),
                              "usage": usage, "timings": data.get("timings") or {}})

    def parse_body(self, body: dict) -> Parsed:
        parsed = self.parse_event({**body, "stop": True})
        parsed.tokens = [TokenChunk(body.get("content", ""))]
        return parsed


LLAMA_CPP = LlamaCppProtocol()


def base_url(url: str) -> str:
    """The server's root: `http://h:8000/v1` (how OpenAI clients name a server) becomes `http://h:8000`."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def served_model(url: str, api_key: str | None = None, timeout: float = 10.0) -> str:
    """The id of the first model the server lists at GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(base_url(url) + "/v1/models", headers=headers, timeout=timeout).raise_for_status().json()
    return models["data"][0]["id"]


def openai_protocol(url: str, chat: bool = False, api_key: str | None = None, timeout: float = 10.0,
                    continuous_usage: bool = False) -> OpenAIProtocol:
    """An `OpenAIProtocol` for the first model the server lists at GET /v1/models."""
    return OpenAIProtocol(served_model(url, api_key, timeout), chat=chat, api_key=api_key,
                          continuous_usage=continuous_usage)
