"""HTTP client for a labserver: one request in, one `Trace` out, timed on the client's side of the socket.

A Trace holds what a user sees (when each token event arrived, `time.perf_counter`, ms since the
request was sent) next to what the server says it spent (`step_ms`, `prefill_time_ms`). Metrics are
named as `vllm bench serve` names them: TTFT, ITL, TPOT, E2E.

    >>> t = Trace(arrival_ms=[100.0, 130.0, 170.0], tokens=["a", "b", "c"])
    >>> t.ttft_ms, t.itl_ms, t.tpot_ms, t.e2e_ms
    (100.0, [30.0, 40.0], 35.0, 170.0)

Two wire formats: labserver's own POST /generate (`LABSERVER`, with the server's per-token `step_ms`)
and the OpenAI-compatible /v1/completions or /v1/chat/completions that vLLM, SGLang and llama.cpp
serve (`OpenAIProtocol`; no server timings, so only the client-side metrics). A `Protocol` builds the
request body and turns one parsed event into tokens; everything that times and records is shared.

Left out: retries, authentication and request-rate shaping (`run_concurrent` starts every request at
once).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import httpx
import numpy as np
from httpx_sse import aconnect_sse, connect_sse

# Long read timeout: a blocking server answers only once the whole generation is done.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


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

    def request(self, prompt: str, max_tokens: int, temperature: float, stream: bool, **extra) -> dict: ...
    def parse_event(self, data: dict) -> Parsed: ...
    def parse_body(self, body: dict) -> Parsed: ...


class LabserverProtocol:
    """POST /generate from DESIGN.md: one `data:` event per token, one summary event, `data: [DONE]`."""
    path = "/generate"
    done = "[DONE]"

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
    """OpenAI's streaming completions: one chunk per token (vLLM, SGLang, llama.cpp and our /v1).

    `chat=True` sends the prompt as one user message to /v1/chat/completions. The usage chunk
    (`stream_options.include_usage`) fills `Trace.usage`. A chunk that carries no text (the chat role
    chunk, the final one) is not a token: TTFT counts from the first chunk with text.
    """
    done = "[DONE]"

    def __init__(self, model: str, chat: bool = False, api_key: str | None = None):
        self.model, self.chat = model, chat
        self.path = "/v1/chat/completions" if chat else "/v1/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def request(self, prompt: str, max_tokens: int, temperature: float, stream: bool, **extra) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "stream": stream,
                **({"messages": [{"role": "user", "content": prompt}]} if self.chat else {"prompt": prompt})}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return {**body, **extra}

    def _text(self, choice: dict) -> str | None:
        if self.chat:
            return (choice.get("delta") or choice.get("message") or {}).get("content")
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


def openai_protocol(url: str, chat: bool = False, api_key: str | None = None, timeout: float = 10.0) -> OpenAIProtocol:
    """An `OpenAIProtocol` for the first model the server lists at GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout).raise_for_status().json()
    return OpenAIProtocol(models["data"][0]["id"], chat=chat, api_key=api_key)


@dataclass
class Trace:
    prompt: str = ""
    stream: bool = True
    sent_s: float = 0.0                     # perf_counter() when sent: lines a Trace up with a HealthProbe
    arrival_ms: list[float] = field(default_factory=list)   # per token event, ms after sent_s
    tokens: list[str] = field(default_factory=list)
    token_ids: list[int | None] = field(default_factory=list)
    step_ms: list[float | None] = field(default_factory=list)  # server compute per token; [0] is the prefill
    batch: list[int | None] = field(default_factory=list)  # per token: sequences in its step, if the server says
    prefill_time_ms: float | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    error: dict | None = None
    text: str = ""
    done_ms: float | None = None            # response fully read ([DONE] or the JSON body)
    closed_early: bool = False              # the client hung up (stop_after)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def n_tokens(self) -> int:
        return len(self.arrival_ms)

    @property
    def ttft_ms(self) -> float | None:
        return self.arrival_ms[0] if self.arrival_ms else None

    @property
    def e2e_ms(self) -> float | None:
        # Last *token* event, so that TPOT is exactly the mean ITL.
        return self.arrival_ms[-1] if self.arrival_ms else None

    @property
    def itl_ms(self) -> list[float]:
        return [b - a for a, b in zip(self.arrival_ms, self.arrival_ms[1:])]

    @property
    def tpot_ms(self) -> float | None:
        return (self.e2e_ms - self.ttft_ms) / (self.n_tokens - 1) if self.n_tokens > 1 else None

    @property
    def tokens_per_s(self) -> float | None:
        return 1000.0 * self.n_tokens / self.e2e_ms if self.e2e_ms else None

    @property
    def decode_step_ms(self) -> list[float]:
        return [s for s in self.step_ms[1:] if s is not None]

    def _add(self, parsed: Parsed, t_ms: float) -> None:
        for chunk in parsed.tokens:
            self.arrival_ms.append(t_ms)
            self.tokens.append(chunk.text)
            self.token_ids.append(chunk.token_id)
            self.step_ms.append(chunk.step_ms)
            self.batch.append(chunk.batch)
            if chunk.prefill_time_ms is not None:
                self.prefill_time_ms = chunk.prefill_time_ms
        for key, value in parsed.finish.items():
            setattr(self, key, value)
        self.error = parsed.error or self.error


class _Recorder:
    """Times and records one streamed response; shared by the sync and async loops."""

    def __init__(self, trace: Trace, protocol: Protocol, on_token: Callable[[str], None] | None,
                 stop_after: int | None):
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
        if getattr(self.protocol, "last_event_ends", False) and "finish_reason" in parsed.finish:
            self.saw_done = True  # a stream that sends no [DONE] (llama-server's /completion)
            return False
        if self.on_token is not None:
            for chunk in parsed.tokens:
                self.on_token(chunk.text)
        if self.stop_after is not None and self.trace.n_tokens >= self.stop_after:
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
    return url if url.endswith(protocol.path) else url + protocol.path


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
                    on_token: Callable[[str], None] | None = None, stop_after: int | None = None,
                    client: httpx.Client | None = None, protocol: Protocol = LABSERVER, timeout=DEFAULT_TIMEOUT,
                    **params) -> Trace:
    """Stream one generation. `on_token(text)` runs as each token arrives; `stop_after=N` hangs up
    after N tokens (the server should then cancel). Extra `params` (top_p, seed) go into the body."""
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
                           on_token: Callable[[str], None] | None = None, stop_after: int | None = None,
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
    """Send all `prompts` (or `prompts` copies of `prompt=`) at once; one Trace each, in order.

    Inside Jupyter an event loop is already running on this thread, so the requests get their own
    loop on a helper thread (no nest_asyncio). The server must not be on the caller's loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun_concurrent(url, prompts, **kwargs))
    with ThreadPoolExecutor(1, thread_name_prefix="labserver-client") as pool:
        return pool.submit(lambda: asyncio.run(arun_concurrent(url, prompts, **kwargs))).result()


@dataclass
class HealthProbe:
    """GET /health every `interval_ms` on its own thread and client. A request waits as long as
    the server makes it (up to `timeout_s`), so a blocked server shows as one long sample."""
    url: str
    interval_ms: float = 20.0
    timeout_s: float = 60.0
    path: str = "/health"
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t_ms since start_s, latency_ms)
    failures: int = 0
    start_s: float = 0.0

    def start(self) -> "HealthProbe":
        self._stop, ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="labserver-health-probe",
                                        daemon=True)
        self._thread.start()
        ready.wait()  # probing has begun when start() returns, so it sees what comes next
        return self

    def stop(self) -> "HealthProbe":
        self._stop.set()
        self._thread.join()  # an in-flight probe finishes: its latency is the measurement
        return self

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        url = self.url.rstrip("/") + self.path
        with httpx.Client(timeout=self.timeout_s) as http:  # made first: creating a client takes ~50 ms
            self.start_s = next_s = time.perf_counter()
            ready.set()
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    http.get(url).raise_for_status()
                except httpx.HTTPError:
                    self.failures += 1
                t1 = time.perf_counter()
                self.samples.append(((t0 - self.start_s) * 1000.0, (t1 - t0) * 1000.0))
                next_s = max(next_s + self.interval_ms / 1000.0, t1)
                self._stop.wait(next_s - time.perf_counter())

    @property
    def latencies_ms(self) -> list[float]:
        return [latency for _, latency in self.samples]

    def summary(self) -> dict:
        pct = percentiles(self.latencies_ms)
        lat = self.latencies_ms
        return {"n": len(lat), "failures": self.failures, "p50_ms": pct[50], "p90_ms": pct[90],
                "p99_ms": pct[99], "max_ms": max(lat) if lat else None}


def probe_health(url: str, duration_s: float | None = None, until: threading.Event | None = None,
                 interval_ms: float = 20.0, timeout_s: float = 60.0) -> HealthProbe:
    """Probe for `duration_s`, or until `until` is set (then `duration_s`, if given, caps the wait)."""
    if duration_s is None and until is None:
        raise ValueError("give duration_s or until")
    probe = HealthProbe(url, interval_ms, timeout_s).start()
    if until is not None:
        until.wait(duration_s)
    else:
        time.sleep(duration_s)
    return probe.stop()


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict:
    """Linear-interpolated percentiles (numpy's default, as vllm uses); None for an empty list.

    >>> percentiles([10, 20, 30, 40, 50])
    {50: 30.0, 90: 46.0, 99: 49.6}
    """
    if len(values) == 0:
        return {q: None for q in qs}
    return {q: round(float(v), 9) for q, v in zip(qs, np.percentile(np.asarray(values, float), qs))}


def summarize(traces: Sequence[Trace], qs: Sequence[float] = (50, 90, 99)) -> dict:
    """`mean_X_ms` and `pQ_X_ms` for X in ttft, itl, tpot, e2e (client) and step, prefill (server).
    ITL pools the gaps of all requests; the others take one value per request. Failed traces are
    counted in `failed` and left out of the figures."""
    done = [t for t in traces if t.ok and t.n_tokens]
    series = {
        "ttft": [t.ttft_ms for t in done],
        "itl": [gap for t in done for gap in t.itl_ms],
        "tpot": [t.tpot_ms for t in done if t.tpot_ms is not None],
        "e2e": [t.e2e_ms for t in done],
        "step": [s for t in done for s in t.decode_step_ms],
        "prefill": [t.prefill_time_ms for t in done if t.prefill_time_ms is not None],
    }
    out = {"completed": len(done), "failed": len(traces) - len(done),
           "total_output_tokens": sum(t.n_tokens for t in done)}
    for name, values in series.items():
        out[f"mean_{name}_ms"] = float(np.mean(values)) if values else None
        for q, v in percentiles(values, qs).items():
            out[f"p{q:g}_{name}_ms"] = v
    return out
