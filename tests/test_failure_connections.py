"""Deadlines before a request reaches the app, a cap on connections, and frozen readers with the kernel's
own (large) buffers, all on loopback with raw sockets: slowloris, a stalled body, idle sockets, a client
that never calls recv.
"""

import json
import socket
import time

import httpx
import pytest

from labserver import EngineConfig, fake_engine
from labserver.__main__ import build_parser
from labserver.serve.app import create_app
from labserver.serve.background import UvicornServer
from labserver.serve.limits import ServerLimits
from tests.waiting import seconds_until

pytestmark = pytest.mark.timeout(60)

BODY = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
REQUEST = (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
           % (len(BODY), BODY))


def answer(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@pytest.fixture
def server():
    config = EngineConfig(model="fake", threads=1, max_tokens_limit=50_000)
    engine = fake_engine(prefill_ms=1, step_ms=1, config=config)
    limits = ServerLimits(idle_timeout_s=0.5, header_timeout_s=1, body_timeout_s=1, max_connections=8,
                          send_timeout_s=2)
    app = create_app(engine, limits=limits)
    with UvicornServer(app) as running:
        running.engine, running.app = engine, app
        yield running


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def test_slowloris_headers_get_a_408_and_the_connection_closes(server):
    sock = connect(server.port)
    start = time.perf_counter()
    received = b""
    for byte in REQUEST[:60]:  # a header byte every 0.1 s: never a whole header block within 1 s
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.1)
        if time.perf_counter() - start > 3:
            break
    received = answer(sock)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b"headers did not arrive within 1 s" in received
    assert httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_stalled_body_gets_a_408(server):
    sock = connect(server.port)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\":")  # 10 of the 100 bytes, then nothing
    received = answer(sock)
    assert received.startswith(b"HTTP/1.1 408") and b"body did not arrive within 1 s" in received, received
    assert server.app.state.admission.active == 0


def test_a_chunked_body_that_never_ends_gets_a_408(server):
    sock = connect(server.port)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n")
    received = answer(sock)
    assert received.startswith(b"HTTP/1.1 408"), received


def test_idle_connections_are_closed(server):
    socks = [connect(server.port) for _ in range(6)]  # they never send a byte
    assert all(answer(s, timeout_s=5) == b"" for s in socks)  # closed by the server, not by our timeout
    for s in socks:
        s.close()


def test_a_request_longer_than_the_deadlines_is_not_cut_and_keep_alive_works(server):
    long_body = json.dumps({"prompt": "hi", "max_tokens": 3000}).encode()  # ~3 s of 1 ms steps: past them all
    sock = connect(server.port)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d"
                 b"\r\n\r\n%s" % (len(long_body), long_body))
    sock.settimeout(20)
    first = b""
    while b'"finish_reason"' not in first:
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    time.sleep(0.2)  # under the idle timeout: the connection is still there for a second request
    sock.sendall(REQUEST)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    answer(sock, timeout_s=5)  # then idle: the server closes it (a timeout here would raise)


def test_connections_beyond_the_cap_get_a_503(server):
    held = [connect(server.port) for _ in range(8)]
    time.sleep(0.1)  # accepted
    with httpx.Client() as client:
        crowded = client.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2})
    for s in held:
        s.close()
    seconds_until(lambda: False, 0.2)
    with httpx.Client() as client:
        fine = client.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2})
    assert crowded.status_code == 503
    assert fine.status_code == 200


def test_a_frozen_reader_is_dropped_with_the_kernels_default_buffers(server):
    """No SO_SNDBUF/SO_RCVBUF tuning: the whole answer would fit in loopback's buffers, no send blocks."""
    body = json.dumps({"prompt": "one", "max_tokens": 50_000, "stream": True}).encode()
    sock = connect(server.port)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d"
                 b"\r\n\r\n%s" % (len(body), body))  # and never a recv
    assert seconds_until(lambda: server.app.state.admission.active == 1, 5) < 5
    dropped_s = seconds_until(lambda: server.app.state.admission.active == 0 and server.engine.running == 0, 20)
    tokens = server.engine.tokens_generated
    sock.close()
    assert dropped_s < 20, "the frozen reader kept its slot"
    assert tokens < 50_000  # cut off, not generated to the end


def test_the_connection_limits_are_cli_flags():
    args = build_parser().parse_args(["serve", "--idle-timeout", "7", "--header-timeout", "3", "--body-timeout",
                                      "9", "--max-connections", "100"])
    assert (args.idle_timeout, args.header_timeout, args.body_timeout, args.max_connections) == (7, 3, 9, 100)
    with pytest.raises(ValueError, match="header_timeout_s"):
        ServerLimits(header_timeout_s=0)
