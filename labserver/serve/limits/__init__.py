"""What the server accepts before any work starts (body size, content type, concurrent generations), and
how long it waits for a client or an engine that makes no progress.

A shared classroom server meets every kind of client: a script in a loop, a paste of a whole book, a
browser tab left streaming. Each limit here turns such a client into a fast, clear 4xx instead of a
pile-up that slows everyone:

- ``max_body_bytes``: a larger body is a 413, checked while the body is read and before any JSON
  parsing, from ``Content-Length`` or, for a chunked body, from the bytes received so far. FastAPI has
  no such limit of its own: the ``BodyLimit`` middleware (``limits.asgi``) counts, and each route's format words
  the 413. The Flask baseline gets the same limit and message (werkzeug's ``MAX_CONTENT_LENGTH``).
- A ``POST`` body must be sent as ``application/json``; anything else is a 415, in both apps. (A
  browser cannot send JSON to another origin without a CORS preflight, which this server never grants.)
- ``max_concurrent``: generations in progress at once (streaming or not, over every route). One more
  is refused at once with a 429 and ``Retry-After`` instead of queueing: every admitted stream shares
  the one engine thread, so each extra stream slows all the others. (The Flask baseline serves one
  request at a time by design: it has no use for this one.)
- ``send_timeout_s``: a stream whose client reads nothing for this long (one send stuck that long, or
  bytes waiting in the kernel that the client has not acknowledged for that long) is dropped, its
  generation cancelled and its slot freed (``sse``).
- ``idle_timeout_s``, ``header_timeout_s``, ``body_timeout_s``, ``max_connections``: deadlines before a
  request reaches the app (a fresh connection that sends nothing is closed; slow headers or body: 408)
  and a cap on open connections (a request beyond it: 503), kept by the HTTP server (``limits.connections``).
- ``keepalive_s``: a stream that has sent nothing for this long (waiting for its first token behind
  other prompts) sends an SSE comment, ``: keep-alive``, so no proxy closes it as idle.
- ``stream_interval``: tokens per write of a stream (vLLM's ``--stream-interval``): the first at once,
  then every ``stream_interval`` tokens, the rest with the finish; above 1 it trades a little latency
  per token for less host work per token (``engine.output``).
- ``drain_timeout_s``: when the whole server stops, how long open requests may finish by themselves
  before they end with an error event and ``[DONE]`` (``drain``).
- ``wedged_after_s``: the engine is reported wedged (``/health`` and new requests: 503) when its loop has
  work but has not come round for this long (``health.unavailable``).

This module is the limits themselves and their words, with no web framework: the FastAPI app enforces
them with ``limits.asgi``, the Flask baseline with werkzeug's own settings (``flask_app``).

Left out: per-client quotas, authentication, queueing with a wait limit, and limits on a request's
total time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass



@dataclass(frozen=True)
class ServerLimits:
    """Limits of one app: ``create_app(engine, limits=ServerLimits(max_concurrent=4))``.

    >>> ServerLimits().max_concurrent, ServerLimits().max_body_bytes
    (16, 1048576)
    """

    # 16 interleaved streams at ~35 ms a step give each one token every ~0.6 s: still readable live.
    max_concurrent: int = 16
    # A prompt is at most 32,000 characters (EngineConfig.max_prompt_chars); JSON escaping can grow
    # that several times (e.g. "\u00e9"), and 1 MiB still leaves ample room.
    max_body_bytes: int = 1024 * 1024
    retry_after_s: int = 1
    send_timeout_s: float = 30.0
    keepalive_s: float = 5.0  # well under the 60 s idle timeout of common proxies (nginx, AWS ALB)
    # Longer than the longest forward the engine limits allow: a 4,096-token prompt prefilled alone takes
    # ~4.5 min at the 65 ms per prompt token measured on the slowest machine (AVX2, the q4_1 route).
    wedged_after_s: float = 300.0
    stream_interval: int = 1
    idle_timeout_s: float = 5.0  # uvicorn's keep-alive default
    header_timeout_s: float = 10.0  # a real client sends its headers in one write
    body_timeout_s: float = 30.0  # 1 MiB (max_body_bytes) at ~35 KB/s
    # Under the usual 1,024 file descriptors a process gets, with room for the model's files and the engine.
    max_connections: int = 512
    # When the server stops, open requests may finish by themselves this long (0: they end at once).
    drain_timeout_s: float = 5.0

    def __post_init__(self):
        for name in ("max_concurrent", "max_body_bytes", "retry_after_s", "stream_interval", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("send_timeout_s", "keepalive_s", "wedged_after_s", "idle_timeout_s", "header_timeout_s",
                     "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        value = self.drain_timeout_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"drain_timeout_s must be a number of seconds >= 0, got {value!r}")


class Slot:
    """One admitted generation; ``release`` may be called any number of times (the first one counts)."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release()


class Admission:
    """Counts generations in progress and refuses the one beyond ``limit`` (no queue)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self.active = 0

    def try_admit(self) -> Slot | None:
        with self._lock:
            if self.active >= self.limit:
                return None
            self.active += 1
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self.active -= 1


def too_large_message(limits: ServerLimits) -> str:
    return f"the request body is larger than this server's limit of {limits.max_body_bytes} bytes"


def not_json_message(headers) -> str | None:
    """The 415 message for a request whose body is not declared as JSON, or None when it is (any
    ``Headers`` mapping: Starlette's or werkzeug's).

    >>> not_json_message({"content-type": "text/plain", "content-length": "2"})
    "send the body as JSON with 'Content-Type: application/json' (got Content-Type: text/plain)"
    """
    content_type = headers.get("content-type", "")
    has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
    if not content_type and not has_body:
        return None  # no body at all: validation says which fields are missing
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return None
    return f"send the body as JSON with 'Content-Type: application/json' (got Content-Type: {content_type or 'none'})"
