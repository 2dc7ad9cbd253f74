"""HTTP client for a labserver or any OpenAI-compatible server: one request in, one `Trace` out.

Each call times the response on the client's side of the socket (`time.perf_counter`, before any
parsing) and records it into a `Trace`; the wire format is a `Protocol` (`protocols.py`). Streams are
read with httpx-sse, synchronously or on an asyncio loop; `run_concurrent` sends many at once.

Left out: retries, authentication beyond a bearer key and request-rate shaping (`run_concurrent`
starts every request at once; `load.py` sends at a rate). The client never imports the engine: it
measures any server over HTTP.
"""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Awaitable, Callable, Sequence, TypeVar

import httpx
from httpx_sse import aconnect_sse, connect_sse

from .protocols import LABSERVER, Protocol, base_url
from .trace import Trace

# Long read timeout: a blocking server answers only once the whole generation is done.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."
T = TypeVar("T")

class _Recorder:
    """Times and records one streamed response; shared by the sync and async loops."""

    def __init__(self, trace: Trace, protocol: Protocol, on_token: Callable[[str], None] | None,
                 stop_after: int | Callable[[Trace], bool] | None):
        self.trace, self.protocol, self.on_token, self.stop_after = trace, protocol, on_token, stop_after
        self.saw_done = False

    def now_ms(self) -> float:
        return (time.perf_counter() - self.trace.sent_s) * 1000.0

    def feed(self, sse) -> bool:
        """Record one event; False means stop reading."""
        t_ms = self.now_ms()  # before any parsing
        if sse.data == self.protocol.done:
            self.saw_done = True
            return False
        if not sse.data:
            return True
        parsed = self.protocol.parse_event(json.loads(sse.data))
        self.trace._add(parsed, t_ms)
        if self.protocol.last_event_ends and "finish_reason" in parsed.finish:
            self.saw_done = True  # a stream that sends no [DONE] (llama-server's /completion)
            return False
        if self.on_token is not None:
            for chunk in parsed.tokens:
                self.on_token(chunk.text)
        stop = self.stop_after
        if stop is not None and (stop(self.trace) if callable(stop) else self.trace.n_tokens >= stop):
            self.trace.closed_early = True
            return False
        return True

    def close(self, response: httpx.Response) -> Trace:
        trace = self.trace
        trace.done_ms = self.now_ms()
        trace.text = "".join(trace.tokens)
        if response.status_code != 200:
            trace.error = _http_error(response)
        elif not (self.saw_done or trace.closed_early or trace.error):
            trace.error = {"type": "incomplete", "message": "stream ended before [DONE]"}
        return trace


def _http_error(response: httpx.Response) -> dict:
    """{"type", "message", "status"} from a 4xx/5xx: FastAPI's `detail` or the apps' `error` body."""
    error = {"type": f"http_{response.status_code}", "message": response.text, "status": response.status_code}
    if "Retry-After" in response.headers:  # a 429 or 503 saying when to come back
        error["retry_after"] = response.headers["Retry-After"]
    try:
        body = response.json()
    except ValueError:
        return error
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return {**error, **body["error"]}
    if isinstance(body, dict) and "detail" in body:
        error["message"] = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
    return error


def _headers(protocol: Protocol) -> dict:
    return getattr(protocol, "headers", {})


def _endpoint(url: str, protocol: Protocol) -> str:
    url = url.rstrip("/")
    return url if url.endswith(protocol.path) else base_url(url) + protocol.path


@contextmanager
def _sync_client(client, timeout):
    if client is not None:
        yield client
    else:
        with httpx.Client(timeout=timeout) as fresh:
            yield fresh


@asynccontextmanager
async def _async_client(client, timeout):
    if client is not None:
        yield client
    else:
        async with httpx.AsyncClient(timeout=timeout) as fresh:
            yield fresh


def stream_generate(url: str, prompt: str, max_tokens: int = 128, temperature: float = 0.7, *,
                    on_token: Callable[[str], None] | None = None,
                    stop_after: int | Callable[[Trace], bool] | None = None, client: httpx.Client | None = None,
                    protocol: Protocol = LABSERVER, timeout=DEFAULT_TIMEOUT, **params) -> Trace:
    """Stream one generation. `on_token(text)` runs as each token arrives; `stop_after=N` hangs up
    after N tokens, `stop_after=f` once `f(trace so far)` is true (the server should then cancel). Extra
    `params` (top_p, seed) go into the body."""
    body = protocol.request(prompt, max_tokens, temperature, True, **params)
    rec = _Recorder(Trace(prompt=prompt), protocol, on_token, stop_after)
    with _sync_client(client, timeout) as http:
        rec.trace.sent_s = time.perf_counter()
        with connect_sse(http, "POST", _endpoint(url, protocol), json=body, headers=_headers(protocol)) as source:
            if source.response.status_code == 200:
                for sse in source.iter_sse():
                    if not rec.feed(sse):
                        break
            else:
                source.response.read()
            return rec.close(source.response)


async def astream_generate(url: str, prompt: str, max_tokens: int = 128, temperature: float = 0.7, *,
                           on_token: Callable[[str], None] | None = None,
                           stop_after: int | Callable[[Trace], bool] | None = None,
                           client: httpx.AsyncClient | None = None, protocol: Protocol = LABSERVER,
                           timeout=DEFAULT_TIMEOUT, **params) -> Trace:
    """`stream_generate` on an `httpx.AsyncClient`, to drive many streams from one event loop."""
    body = protocol.request(prompt, max_tokens, temperature, True, **params)
    rec = _Recorder(Trace(prompt=prompt), protocol, on_token, stop_after)
    async with _async_client(client, timeout) as http:
        rec.trace.sent_s = time.perf_counter()
        async with aconnect_sse(http, "POST", _endpoint(url, protocol), json=body,
                                headers=_headers(protocol)) as source:
            if source.response.status_code == 200:
                events = source.aiter_sse()
                async for sse in events:
                    if not rec.feed(sse):
                        break
                await events.aclose()
            else:
                await source.response.aread()
            return rec.close(source.response)


def _blocking_trace(trace: Trace, response: httpx.Response, protocol: Protocol) -> Trace:
    """Every token of a blocking response arrives at once: TTFT = E2E = the whole response time."""
    t_ms = (time.perf_counter() - trace.sent_s) * 1000.0
    trace.done_ms = t_ms
    if response.status_code != 200:
        trace.error = _http_error(response)
        return trace
    body = response.json()
    trace._add(protocol.parse_body(body), t_ms)
    trace.text = body.get("text", "".join(trace.tokens))
    return trace


def blocking_generate(url: str, prompt: str, max_tokens: int = 128, temperature: float = 0.7, *,
                      client: httpx.Client | None = None, protocol: Protocol = LABSERVER, timeout=DEFAULT_TIMEOUT,
                      **params) -> Trace:
    """One non-streaming request (`stream: false`); tokens and step_ms come from the body's `tokens`."""
    body = protocol.request(prompt, max_tokens, temperature, False, **params)
    trace = Trace(prompt=prompt, stream=False)
    with _sync_client(client, timeout) as http:
        trace.sent_s = time.perf_counter()
        return _blocking_trace(trace, http.post(_endpoint(url, protocol), json=body, headers=_headers(protocol)),
                               protocol)


async def ablocking_generate(url: str, prompt: str, max_tokens: int = 128, temperature: float = 0.7, *,
                             client: httpx.AsyncClient | None = None, protocol: Protocol = LABSERVER,
                             timeout=DEFAULT_TIMEOUT, **params) -> Trace:
    body = protocol.request(prompt, max_tokens, temperature, False, **params)
    trace = Trace(prompt=prompt, stream=False)
    async with _async_client(client, timeout) as http:
        trace.sent_s = time.perf_counter()
        response = await http.post(_endpoint(url, protocol), json=body, headers=_headers(protocol))
        return _blocking_trace(trace, response, protocol)


async def arun_concurrent(url: str, prompts: int | Sequence[str], *, prompt: str = DEFAULT_PROMPT,
                          stream: bool = True, timeout=DEFAULT_TIMEOUT, **kwargs) -> list[Trace]:
    prompts = [prompt] * prompts if isinstance(prompts, int) else list(prompts)
    one = astream_generate if stream else ablocking_generate
    limits = httpx.Limits(max_connections=max(len(prompts), 1))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        return list(await asyncio.gather(*(one(url, p, client=http, **kwargs) for p in prompts)))


def run_concurrent(url: str, prompts: int | Sequence[str], **kwargs) -> list[Trace]:
    """Send all `prompts` (or `prompts` copies of `prompt=`) at once; one Trace each, in order."""
    return run_sync(lambda: arun_concurrent(url, prompts, **kwargs))


def run_sync(make_coroutine: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to its end from synchronous code, also from inside a running event loop.

    Inside Jupyter an event loop is already running on this thread, so the requests get their own
    loop on a helper thread (no nest_asyncio). The server must not be on the caller's loop. That thread
    is started here rather than by the engine's ``off_thread``: the client speaks only HTTP and imports
    nothing of the server, so that it measures any server."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coroutine())
    with ThreadPoolExecutor(1, thread_name_prefix="labserver-client") as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()
