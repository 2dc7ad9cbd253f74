"""Notebook 7's experiments on the fake engine: the API load never reaches the engine, and what clients see
when the engine thread's loop fails or the engine process is killed (every stream: an error event, then
[DONE]; a 503 meanwhile; only the process comes back, with another pid)."""
import os

import pytest

from labserver import fake_engine
from labserver.lab import process as lab
from labserver.serve.background import start_fastapi, stop


@pytest.fixture
def fake():
    return fake_engine(prefill_ms=5, step_ms=5)


def test_the_api_load_is_refused_before_the_engine(fake):
    server = start_fastapi(fake, backend="batched", name="nb7-load")
    try:
        prompt = lab.big_prompt(fake)
        assert len(prompt) == fake.config.max_prompt_chars
        assert lab.api_cost_ms(server.url, prompt, n=2) > 0  # raises unless each answer is the 400
        with lab.ApiLoad(server.url, prompt, clients=3) as load:
            run = lab.measure(server.url, max_tokens=8)
        assert set(load.statuses) == {400} and sum(load.statuses.values()) >= 3
        assert run.trace.n_tokens == 8 and fake.tokens_generated == 8 + 2 + 0  # the stream and its warm-up
        row = lab.loaded_row("batched", "3 clients", run, load)
        assert row["refused/s"] > 0 and row["step p50 ms"] >= 5.0
        fig = lab.plot_isolation({("batched", "loaded"): run})
        assert [len(ax.lines) for ax in fig.axes] == [1, 1, 1]  # steps, gaps, /health
    finally:
        stop("nb7-load")


def test_stream_tokens_last_about_two_seconds_within_bounds():
    assert lab.stream_tokens(50.0) == 40
    assert lab.stream_tokens(5.0) == 64 and lab.stream_tokens(200.0) == 24


def test_a_token_is_smaller_as_ids_than_as_sse():
    sizes = lab.boundary_bytes()
    assert 0 < sizes["engine -> API (msgpack)"] < sizes["API -> client (SSE)"]


def killed(engine, backend: str):
    """Serve ``engine`` on ``backend``, kill its engine mid-stream (notebook 7's demo), stop the server."""
    server = start_fastapi(engine, backend=backend, name=f"nb7-{backend}")
    try:
        return lab.kill_engine(server, backend, step_ms=5.0)
    finally:
        stop(f"nb7-{backend}")


def test_the_engine_thread_dies_and_stays_dead(fake):
    death = killed(fake, "batched")
    assert death.pid_before == os.getpid() and len(death.streams) == 2
    assert all(s.error_then_done and "injected fault" in s.error for s in death.streams)
    assert all(s.tokens >= 4 for s in death.streams)  # killed mid-way, as asked
    assert death.last_end_ms < 2000 and death.during_status == 503
    assert death.statuses_after()[-1] == 503 and death.back_ms is None and death.pid_after is None
    assert "loop fault" in [t.get_text() for t in lab.plot_death([death]).axes[0].get_legend().get_texts()]


@pytest.mark.timeout(120)
def test_the_engine_process_is_killed_and_restarted(fake):
    death = killed(fake, "process")
    assert death.pid_before not in (None, os.getpid())
    assert all(s.error_then_done for s in death.streams)
    assert death.last_end_ms < 2000 and death.during_status == 503 and 503 in death.statuses_after()
    assert death.back_ms is not None and death.pid_after not in (None, death.pid_before)
    assert death.row()["error, then [DONE]"] == 2
