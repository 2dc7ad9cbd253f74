"""Background servers for notebooks: port 0, busy ports, failed startups, restarts, the registry."""

import time
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from labserver.serve import background as serving
from labserver.serve.app import create_app
from labserver.serve.flask_app import create_flask_app
from labserver.serve.background import FlaskServer, ServerStartError, UvicornServer

pytestmark = pytest.mark.timeout(60)

KINDS = {"uvicorn": lambda engine, port=0: UvicornServer(create_app(engine), port=port),
         "flask": lambda engine, port=0: FlaskServer(create_flask_app(engine), port=port)}


def answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(autouse=True)
def no_leftover_servers():
    yield
    serving.stop_all()


@pytest.mark.parametrize("kind", KINDS)
def test_port_zero_picks_a_free_port_and_reports_it(kind, fake_engine):
    with KINDS[kind](fake_engine) as server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert answers(server.url)


@pytest.mark.parametrize("kind", KINDS)
def test_a_busy_port_fails_fast_with_a_clear_error(kind, fake_engine):
    with UvicornServer(create_app(fake_engine)) as first:
        start = time.perf_counter()
        with pytest.raises(ServerStartError, match=f"{first.port}.*in use"):
            KINDS[kind](fake_engine, port=first.port).start()
        assert time.perf_counter() - start < 5  # an error, not a hang
        assert answers(first.url)  # the first server is untouched


def test_a_failing_startup_raises_instead_of_hanging():
    @asynccontextmanager
    async def broken(app):
        raise RuntimeError("model file missing")
        yield

    start = time.perf_counter()
    with pytest.raises(ServerStartError, match="during startup"):
        UvicornServer(FastAPI(lifespan=broken)).start()
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("kind", KINDS)
def test_start_stop_start_on_the_same_port(kind, fake_engine):
    with KINDS[kind](fake_engine) as probe:
        port = probe.port  # a port that was free a moment ago
    server = KINDS[kind](fake_engine, port=port)
    for _ in range(2):  # the same object, the same fixed port, twice in a row
        server.start()
        try:
            assert server.port == port and answers(server.url)
            body = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=10).json()
            assert body["text"] == " one two"  # a restarted FastAPI app gets a fresh backend
        finally:
            server.stop()
        assert not server.running and not answers(f"http://127.0.0.1:{port}")


def test_stopping_closes_the_backend(fake_engine):
    server = UvicornServer(create_app(fake_engine))
    with server:
        backend = server.app.state.backend
        assert backend.alive
    assert not backend.alive and server.app.state.backend is None


@pytest.mark.parametrize("kind", KINDS)
def test_context_manager_stops_the_server(kind, fake_engine):
    with KINDS[kind](fake_engine) as server:
        url = server.url
        assert server.running
    assert not server.running and not answers(url)


def test_rerunning_a_cell_replaces_the_server_of_that_name(fake_engine):
    first = serving.start_fastapi(fake_engine, port=0, name="cell")
    port = first.port
    second = serving.start_fastapi(fake_engine, port=port, name="cell")  # a fixed port, like a notebook
    assert not first.running and second.running and second.port == port
    flask = serving.start_flask(fake_engine, name="baseline")
    assert serving.running_servers() == {"cell": second.url, "baseline": flask.url}
    serving.stop_all()
    assert serving.running_servers() == {} and not second.running and not flask.running


def test_both_servers_with_a_synchronous_client(fake_engine):
    # A notebook's kernel thread calls both servers with a blocking client: no shared loop, no deadlock.
    fast = serving.start_fastapi(fake_engine)
    slow = serving.start_flask(fake_engine)
    body = {"prompt": "hi", "max_tokens": 2}
    with httpx.Client(timeout=10) as client:
        texts = [client.post(s.url + "/generate", json=body).json()["text"] for s in (fast, slow, fast)]
    assert texts == [" one two"] * 3
