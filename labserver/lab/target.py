"""The server a notebook measures: labserver's own, started in this kernel, or a shared one named by the
environment variable ``LABSERVER_URL`` (a class's GPU box running vLLM or SGLang: any OpenAI-compatible
server; llama.cpp's ``llama-server`` stands in for one in the tests).

    server = target(start_fastapi(engine))    # LABSERVER_URL unset: that server; set: the shared one
    trace = server.stream(PROMPT, 32)         # one greedy stream, in the wire format the server speaks
    if server.has_engine("the server's step_ms"):   # False, with one line printed, on a shared server
        ...

Our server is measured through POST /generate, whose events carry the engine's ``step_ms`` and
``prefill_time_ms``; another server through ``/v1/completions`` with the model it lists at
``GET /v1/models``, which says nothing of its steps, so only what the client sees is measured there
(TTFT, ITL, TPOT, E2E, tokens/s, and what ``usage`` reports). What needs our engine itself (its step
times, its scheduler's choices, its KV blocks, a second engine built with other settings) is skipped on a
shared server, and the notebook says so in one line. ``LABSERVER_API_KEY`` is sent as a bearer key.

    >>> external_url({"LABSERVER_URL": "http://gpu-box:8000/v1/"})
    'http://gpu-box:8000'
    >>> external_url({}) is None
    True

Left out: chat templates (a shared server gets the prompt as text), starting or stopping a shared server.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..measure.client import blocking_generate, run_concurrent, stream_generate
from ..measure.load import LoadResult, run_load
from ..measure.protocols import LABSERVER, OpenAIProtocol, Protocol, base_url, openai_protocol, served_model
from ..measure.trace import Trace

ENV, KEY_ENV = "LABSERVER_URL", "LABSERVER_API_KEY"
SKIPPED = f"skipped: needs labserver's own engine ({ENV} is set)"
# Every answer exactly max_tokens long on a shared server too (vLLM, SGLang and llama-server accept it):
# a model that stops early would shorten the very gaps being measured.
SHARED_EXTRA = {"ignore_eos": True}


def external_url(environ: Mapping[str, str] | None = None) -> str | None:
    """The shared server's root URL from ``LABSERVER_URL`` (a trailing ``/v1`` is dropped), or None."""
    url = (os.environ if environ is None else environ).get(ENV, "").strip()
    return base_url(url) if url else None


@dataclass
class Target:
    """A server to measure: its URL, the wire format it speaks, and whether it is labserver's own."""
    url: str
    protocol: Protocol = LABSERVER
    external: bool = False
    model: str | None = None
    extra: dict = field(default_factory=dict)  # request fields every request carries

    def __str__(self) -> str:
        if not self.external:
            return f"labserver's own server at {self.url} (POST /generate, with the engine's step_ms)"
        return (f"the shared server at {self.url} ({ENV}), model {self.model!r}, measured through "
                f"{self.protocol.path}: client-side times only; what needs labserver's engine is skipped")

    def has_engine(self, what: str = "") -> bool:
        """True on our server; on a shared one, print the skip line (naming ``what``) and return False."""
        if self.external:
            print(SKIPPED + (f": {what}" if what else ""))
        return not self.external

    def stream(self, prompt: str, max_tokens: int, temperature: float = 0.0, **kwargs) -> Trace:
        return stream_generate(self.url, prompt, max_tokens, temperature, protocol=self.protocol,
                               **{**self.extra, **kwargs})

    def blocking(self, prompt: str, max_tokens: int, temperature: float = 0.0, **kwargs) -> Trace:
        return blocking_generate(self.url, prompt, max_tokens, temperature, protocol=self.protocol,
                                 **{**self.extra, **kwargs})

    def concurrent(self, prompts: int | Sequence[str], max_tokens: int, prompt: str | None = None,
                   temperature: float = 0.0) -> list[Trace]:
        """``prompts`` streams sent at once (a count of copies of ``prompt``, or the prompts themselves)."""
        more = {"prompt": prompt} if prompt is not None else {}
        return run_concurrent(self.url, prompts, max_tokens=max_tokens, temperature=temperature,
                              protocol=self.protocol, **more, **self.extra)

    def chat(self) -> OpenAIProtocol:
        """The server's /v1/chat/completions (ours serves it too), for requests with a system message."""
        if self.external:
            return OpenAIProtocol(self.model, chat=True, api_key=getattr(self.protocol, "api_key", None))
        return openai_protocol(self.url, chat=True)

    def load(self, requests, **kwargs) -> LoadResult:
        """``measure.load.run_load`` against this server, in its wire format."""
        return run_load(self.url, requests, protocol=self.protocol, **kwargs)


def ours(server) -> Target:
    """A Target for labserver's own server (a running ``BackgroundServer`` or its URL)."""
    return Target(getattr(server, "url", server))


def as_target(server) -> Target:
    """``server`` itself if it is a Target, else labserver's own server at it (a URL or a running server)."""
    return server if isinstance(server, Target) else ours(server)


def shared(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> Target:
    """A Target for an OpenAI-compatible server at ``url``, with the first model it lists."""
    url = base_url(url)
    model = served_model(url, api_key, timeout_s)
    return Target(url, OpenAIProtocol(model, api_key=api_key), True, model, dict(SHARED_EXTRA))


def target(own=None, environ: Mapping[str, str] | None = None) -> Target:
    """The shared server if ``LABSERVER_URL`` is set, else ``own``: our running server, its URL, or a
    function that starts it (called only when it is needed, so a shared server costs no engine thread)."""
    environ = os.environ if environ is None else environ
    url = external_url(environ)
    if url is not None:
        return shared(url, environ.get(KEY_ENV) or None)
    if own is None:
        raise ValueError(f"{ENV} is not set: pass the lab's own server (e.g. start_fastapi(engine))")
    return ours(own() if callable(own) else own)


def has_engine(what: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """``Target.has_engine`` before any server is started: False, with the skip line, when ``LABSERVER_URL``
    is set."""
    return Target("", external=external_url(environ) is not None).has_engine(what)
