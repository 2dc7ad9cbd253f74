"""With --api-servers, /health in any API process reports them all: alive of N, replacements used, the
state (ok, restarting, failed) and the last reason, from the status file the launcher rewrites."""

import os
import signal

import httpx
import pytest

from labserver import fake_engine
from labserver.serve.api_servers.status import api_state, read_status, write_status
from labserver.serve.api_servers import API_SERVER_HEADER, ApiServers
from labserver.serve.process.core_proc import EngineSpec
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(240)


def health(url: str) -> httpx.Response:
    return httpx.get(url + "/health", timeout=10)


def test_health_reports_every_api_process():
    with ApiServers(EngineSpec.of(fake_engine(prefill_ms=1, step_ms=1)), 2) as servers:
        body = health(servers.url).json()
    assert body["api_servers"] == {"alive": 2, "of": 2, "restarts": 0, "max_restarts": 3, "state": "ok", "reason": None}


def test_health_after_kill_9_of_an_api_process_shows_it_replaced():
    with ApiServers(EngineSpec.of(fake_engine(prefill_ms=1, step_ms=1)), 2) as servers:
        victim = servers.api_pids[0]
        os.kill(victim, signal.SIGKILL)
        # Answered by the other process (the dead one accepts nothing) while the replacement starts.
        assert wait_for(lambda: health(servers.url).json()["api_servers"]["restarts"] == 1, 60)
        meanwhile = health(servers.url)
        assert wait_for(lambda: health(servers.url).json()["api_servers"]["state"] == "ok", 120)
        after = health(servers.url)
    seen = meanwhile.json()["api_servers"]
    assert seen["state"] in ("restarting", "ok") and meanwhile.headers[API_SERVER_HEADER] != str(victim)
    if seen["state"] == "restarting":
        assert seen["attempt"] == 1 and seen["max_restarts"] == 3 and seen["alive"] == 1
    state = after.json()["api_servers"]
    assert state["alive"] == 2 and state["of"] == 2 and state["restarts"] == 1
    assert f"API process {victim} ended (exit code -9); replaced (1 of 3)" == state["reason"]
    assert after.status_code == 200 and after.json()["status"] == "ok"


def test_health_after_kill_9_with_no_replacement_left_says_failed():
    with ApiServers(EngineSpec.of(fake_engine(prefill_ms=1, step_ms=1)), 2, max_restarts=0) as servers:
        victim, survivor = servers.api_pids
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: health(servers.url).json()["api_servers"]["state"] == "failed", 60)
        response = health(servers.url)
    assert response.headers[API_SERVER_HEADER] == str(survivor)
    assert response.status_code == 200 and response.json()["status"] == "ok"  # this process serves on
    state = response.json()["api_servers"]
    assert state["alive"] == 1 and state["of"] == 2 and state["restarts"] == 0 and state["max_restarts"] == 0
    assert state["reason"] == f"API process {victim} ended (exit code -9); not replaced (all 0 replacements used)"


def test_the_status_file_is_replaced_whole(tmp_path):
    path = str(tmp_path / "status.json")
    assert read_status(path)["state"] == "unknown"
    write_status(path, {"state": "ok"})
    write_status(path, {**api_state(1, 2, 3, 3, replacing=False), "reason": "r"})
    assert read_status(path) == {"state": "failed", "reason": "r"}
    assert os.listdir(tmp_path) == ["status.json"]  # no half-written file left beside it
