"""How the FastAPI app enforces ``limits.ServerLimits``: the 413 body counter, the 415 dependency, and the
429 and 503 refusals as FastAPI exceptions that each route's format words (``pipeline``).

Kept apart from ``limits`` so that the Flask baseline, which enforces the same limits with werkzeug's own
settings, imports no ASGI framework. Left out: the deadlines before a request reaches the app, which the
HTTP server keeps (``limits.connections``).
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from . import ServerLimits, not_json_message


def too_many_requests(limits: ServerLimits) -> HTTPException:
    message = (f"the server is busy: {limits.max_concurrent} generations are already running "
               f"(its max_concurrent limit). Retry in {limits.retry_after_s} s.")
    return HTTPException(429, detail=message, headers={"Retry-After": str(limits.retry_after_s)})


def engine_unavailable(reason: str) -> HTTPException:
    return HTTPException(503, detail=f"the engine cannot serve requests now: {reason}")


def require_json(request: Request) -> None:
    """A route dependency: 415 unless the body is declared as JSON.

    It runs before the body is validated, so the client learns what is wrong rather than that its
    bytes are "not a valid dictionary".
    """
    message = not_json_message(request.headers)
    if message:
        raise HTTPException(415, detail=message)


class BodyLimit:
    """ASGI middleware: a request body beyond ``max_bytes`` becomes ``HTTPException(413)`` on reading.

    ``Content-Length`` is checked at the first read, before any byte is parsed; a chunked body (no
    ``Content-Length``) is counted as it arrives and refused as soon as it passes the limit. Raising
    from ``receive`` lets FastAPI's exception handlers word the answer for each route.
    """

    def __init__(self, app, max_bytes: int, message: str):
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        received, done = 0, False

        async def limited_receive():
            nonlocal received, done
            if not done and declared is not None and declared > self.max_bytes:
                raise HTTPException(413, detail=self.message)
            message = await receive()
            if message["type"] == "http.request" and not done:
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(413, detail=self.message)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
