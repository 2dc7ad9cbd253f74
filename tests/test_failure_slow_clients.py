"""Slow ends of a stream: a client that stops reading is dropped; a stream that waits is kept alive.

A frozen reader is a raw socket that sends its request and never reads. The server's socket send buffer
is made small so its sends block after a few KiB instead of the ~4 MiB Linux allows by default.
Keep-alive comments are checked on the bytes and through the two clients that must skip them (ours, on
httpx-sse, and the ``openai`` package).
"""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from labserver import EngineConfig, fake_engine
from labserver.measure.client import stream_generate
from labserver.serve.app import create_app
from labserver.serve.background import UvicornServer
from labserver.serve.sse import KEEPALIVE_FRAME, ClosingStreamingResponse
from labserver.serve.limits import ServerLimits
from tests.waiting import seconds_until

pytestmark = pytest.mark.timeout(120)


def small_send_buffers(server: UvicornServer, size: int = 4096) -> None:
    """Connections accepted from now on inherit the listening socket's send buffer size (Linux)."""
    for listener in server.server.servers[0].sockets:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def frozen_reader(port: int, body: dict) -> socket.socket:
    """Send a streaming request with a small receive buffer, then read nothing."""
    data = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(data), data))
    return sock


def read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """What the server sent until it closed the connection, and whether it reset it."""
    sock.settimeout(10)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        return received, True
    return received, False


def read_stream(url: str, body: dict) -> list:
    with httpx.Client(timeout=30) as client, connect_sse(client, "POST", url + "/generate", json=body) as source:
        return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in source.iter_sse()]


@pytest.mark.parametrize("backend", ["batched", "thread"])
def test_a_client_that_stops_reading_is_dropped_and_the_others_go_on(backend):
    config = EngineConfig(model="fake", threads=1, max_tokens_limit=20_000)
    engine = fake_engine(prefill_ms=1, step_ms=1, config=config)
    send_timeout_s = 3.0
    app = create_app(engine, backend, limits=ServerLimits(send_timeout_s=send_timeout_s))
    with UvicornServer(app) as server:
        small_send_buffers(server)
        sock = frozen_reader(server.port, {"prompt": "one", "max_tokens": 20_000, "stream": True})
        # Its buffers fill, then its request sits out the decode steps: the token count stops growing
        # long before max_tokens (the per-request backlog is bounded) and before the drop.
        counts = []

        def plateaued() -> bool:
            counts.append(engine.tokens_generated)
            time.sleep(0.05)
            return len(counts) > 6 and counts[-1] == counts[-7] > 0
        assert seconds_until(plateaued, 30) < 30
        held_at = counts[-1]
        assert engine.running == 1 and app.state.admission.active == 1  # held, not yet dropped

        other = read_stream(server.url, {"prompt": "two", "max_tokens": 50, "stream": True})  # unaffected
        dropped_s = seconds_until(lambda: app.state.admission.active == 0 and engine.running == 0, send_timeout_s + 5)
        after_drop = engine.tokens_generated
        time.sleep(0.2)
        assert engine.tokens_generated == after_drop  # nothing generates for the dropped client
        received, reset = read_all(sock)  # a reset: the bytes it never read are not kept for it
        sock.close()
        ok = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)

    assert held_at < 5_000, f"{held_at} tokens for a client that read nothing: the backlog is not bounded"
    assert dropped_s < send_timeout_s + 5, "the frozen client was never dropped"
    assert after_drop == held_at + 50  # the other stream's 50 tokens, and none more for the frozen one
    assert other[-1] == "[DONE]" and "error" not in other[-2] and other[-2]["usage"]["completion_tokens"] == 50
    assert [e["index"] for e in other[:-2]] == list(range(50))
    assert reset and b"data: [DONE]" not in received  # cut off, not finished
    assert ok.status_code == 200


async def send_stuck_after_first_chunk(send_timeout_s: float) -> tuple[list, float]:
    """An ASGI client that never reads past the first chunk of an endless body: its second send never returns."""
    seen, never = [], asyncio.Event()

    async def body():
        try:
            while True:
                yield b"x"
                seen.append("x")  # the chunk before was taken
        finally:
            seen.append("closed")

    async def send(message):
        if message.get("body") == b"x" and "x" in seen:
            await never.wait()  # the socket's buffers are full and nobody reads

    async def receive():
        await never.wait()  # the client stays connected

    response = ClosingStreamingResponse(body(), send_timeout_s=send_timeout_s,
                                        on_close=lambda: seen.append("on_close"))
    start = asyncio.get_running_loop().time()
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    return seen, asyncio.get_running_loop().time() - start


@pytest.mark.timeout(30)
def test_a_send_stuck_for_send_timeout_drops_the_client():
    seen, took_s = asyncio.run(send_stuck_after_first_chunk(send_timeout_s=0.2))
    # The body is pulled no further than the chunk stuck in its send, the one in the one-chunk buffer and
    # the one waiting to go in (each "x" marks a chunk taken before it); then it was closed and the
    # callbacks ran. The timer looks every quarter of the timeout: dropped by 0.25 s (bound: a busy machine).
    assert seen[-2:] == ["closed", "on_close"] and 1 <= seen.count("x") <= 3, seen
    assert 0.2 <= took_s < 5


def test_send_timeout_is_a_cli_flag():
    from labserver.__main__ import build_parser

    assert build_parser().parse_args(["serve"]).send_timeout == ServerLimits().send_timeout_s == 30
    assert build_parser().parse_args(["serve", "--send-timeout", "2.5"]).send_timeout == 2.5
    with pytest.raises(ValueError, match="send_timeout_s"):
        ServerLimits(send_timeout_s=0)


# --------------------------------------------------------------------------------------------------------
# Keep-alive: a stream that waits for its first token sends SSE comments, and clients skip them.
class Tee(httpx.BaseTransport):
    """An httpx transport that keeps a copy of every response byte it hands on."""

    def __init__(self):
        self.inner, self.raw = httpx.HTTPTransport(), bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        tee, inner = self, response.stream

        class Stream(httpx.SyncByteStream):
            def __iter__(self):
                for chunk in inner:
                    tee.raw += chunk
                    yield chunk

            def close(self):
                inner.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Stream(),
                              extensions=response.extensions)


@pytest.fixture
def queued_server():
    """One cache slot, held ~1 s by a first stream, so the next request waits for its first token."""
    engine = fake_engine(prefill_ms=1, step_ms=10, config=EngineConfig(model="fake", threads=1, max_batch=1))
    app = create_app(engine, limits=ServerLimits(keepalive_s=0.1))
    with UvicornServer(app) as server:
        def hold():
            holder = threading.Thread(target=read_stream, args=(server.url, {"prompt": "x", "max_tokens": 100,
                                                                             "stream": True}))
            holder.start()
            assert seconds_until(lambda: engine.running == 1, 10) < 10
            return holder
        yield server, hold


def test_a_waiting_stream_gets_keep_alive_comments_before_its_first_token(queued_server):
    server, hold = queued_server
    holder = hold()
    arrivals = []
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", server.url + "/generate", json={"prompt": "one", "max_tokens": 3, "stream": True}) as response:
        for chunk in response.iter_raw():
            arrivals.append(chunk)
    holder.join()
    raw = b"".join(arrivals)
    before_first_token = raw[:raw.index(b"data: ")]
    assert before_first_token.count(KEEPALIVE_FRAME) >= 3  # ~1 s of waiting at one comment per 0.1 s
    assert before_first_token.replace(KEEPALIVE_FRAME, b"") == b""
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b'"token"') == 3


def test_our_client_skips_keep_alive_comments(queued_server):
    server, hold = queued_server
    holder, tee = hold(), Tee()
    with httpx.Client(transport=tee, timeout=30) as client:
        trace = stream_generate(server.url, "one", max_tokens=4, temperature=0, client=client)
    holder.join()
    assert bytes(tee.raw).count(KEEPALIVE_FRAME) >= 3
    assert trace.error is None and trace.finish_reason == "length"
    assert trace.tokens == [" one", " two", " three", " four"] and len(trace.arrival_ms) == 4


def test_the_openai_client_skips_keep_alive_comments(queued_server):
    server, hold = queued_server
    holder, tee = hold(), Tee()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", http_client=httpx.Client(transport=tee))
    chunks = list(client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "one"}],
                                                 max_tokens=4, stream=True))
    holder.join()
    assert bytes(tee.raw).count(KEEPALIVE_FRAME) >= 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " one two three four"
    assert chunks[-1].choices[0].finish_reason == "length"
