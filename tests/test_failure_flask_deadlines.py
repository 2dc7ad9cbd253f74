"""The Flask baseline serves one request at a time; a client that sends nothing, or its headers or body a
byte at a time, would hold it for good. Its connections get the FastAPI app's deadlines: idle (closed),
headers and body (a 408, then closed), and the server then answers the next client. Raw sockets on loopback."""

import socket
import time

import httpx
import pytest

from labserver import fake_engine
from labserver.serve.background import FlaskServer
from labserver.serve.flask_app import create_flask_app
from labserver.serve.limits import ServerLimits

pytestmark = pytest.mark.timeout(120)

LIMITS = ServerLimits(idle_timeout_s=0.5, header_timeout_s=1.5, body_timeout_s=1.5)
MARGIN_S = 10.0  # on top of a deadline: a busy machine


@pytest.fixture
def server():
    with FlaskServer(create_flask_app(fake_engine(prefill_ms=1, step_ms=1), LIMITS), limits=LIMITS) as server:
        yield server


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=LIMITS.header_timeout_s + MARGIN_S)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout here fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def trickle(sock: socket.socket, data: bytes, every_s: float, for_s: float) -> tuple[bytes, float]:
    """Send ``data`` a byte every ``every_s`` until the server closes the connection; return what it sent
    and when it closed (seconds after the first byte)."""
    start = time.monotonic()
    sock.settimeout(every_s)
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            answer = sock.recv(65536)
            sock.settimeout(LIMITS.header_timeout_s + MARGIN_S)
            return answer + read_all(sock), time.monotonic() - start
        except TimeoutError:
            pass  # nothing yet: next byte
        except (BrokenPipeError, ConnectionResetError):
            return b"", time.monotonic() - start
        assert time.monotonic() - start < for_s, "the server still reads the trickle"
    raise AssertionError("sent everything without an answer")


def test_an_idle_connection_is_closed_and_the_next_client_served(server):
    sock = connect(server)
    start = time.monotonic()
    assert read_all(sock) == b""  # closed, nothing said: nothing was asked
    assert time.monotonic() - start < LIMITS.idle_timeout_s + MARGIN_S
    sock.close()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_slowloris_headers_get_a_408_at_the_header_deadline(server):
    sock = connect(server)
    headers = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000
    answer, after_s = trickle(sock, headers, every_s=0.1, for_s=LIMITS.header_timeout_s + MARGIN_S)
    sock.close()
    assert answer.startswith(b"HTTP/1.0 408 ") and b"headers did not arrive within 1.5 s" in answer, answer
    assert after_s >= LIMITS.header_timeout_s - 0.1  # the trickle did not end it before the deadline
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_body_that_stops_half_way_gets_a_408_at_the_body_deadline(server):
    sock = connect(server)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    start = time.monotonic()
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.0 408 ") and b"body did not arrive within 1.5 s" in answer, answer
    assert time.monotonic() - start < LIMITS.body_timeout_s + MARGIN_S
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_whole_request_is_served_as_before(server):
    response = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    chunked = httpx.post(server.url + "/generate", content=iter([b'{"prompt": "hi", ', b'"max_tokens": 2}']),
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200 and response.json()["text"] == " one two three"
    assert chunked.status_code == 200 and chunked.json()["text"] == " one two"
