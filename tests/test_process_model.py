"""The process backend on the real default model: the thread backend's greedy text, the SSE contract on
/generate and /v1, aborts across the boundary, a killed engine process, and the command line with two
API processes. The killing test runs last in this module (the others share its server)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from httpx_sse import connect_sse
from test_process_http import check_disconnect_aborts, check_kill_mid_stream, events

from labserver import SamplingParams
from labserver.serve.api_servers import API_SERVER_HEADER
from labserver.serve.background import start_fastapi, stop
from labserver.serve.backends import make_backend

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

PROMPT = "What is the capital of France?"
LONG = "Write a long story about a lighthouse keeper."


@pytest.fixture(scope="module")
def server(default_engine):
    server = start_fastapi(default_engine, backend="process", name="proc-model")
    yield server
    stop("proc-model")


@pytest.fixture(scope="module")
def thread_completion(default_engine):
    """The engine thread's greedy answer to ``PROMPT`` (the reference)."""
    backend = make_backend(default_engine, "batched")
    try:
        return backend.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0))
    finally:
        backend.close()


def test_greedy_text_equals_the_engine_thread(server, thread_completion):
    got = server.app.state.backend.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0))
    assert got.token_ids == thread_completion.token_ids
    assert got.text == thread_completion.text and "Paris" in got.text
    assert [e.token for e in got.events] == [e.token for e in thread_completion.events]


def test_generate_sse_contract(server, thread_completion):
    data = events(server.url, "/generate", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True})
    assert data[-1] == "[DONE]"
    tokens, summary = [json.loads(d) for d in data[:-2]], json.loads(data[-2])
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert tokens[0]["prefill_time_ms"] == tokens[0]["step_ms"] > 0 and all(t["step_ms"] > 0 for t in tokens)
    assert "".join(t["token"] for t in tokens) == thread_completion.text
    assert summary["usage"]["completion_tokens"] == len(tokens)
    assert summary["finish_reason"] == thread_completion.finish.finish_reason


def test_chat_completions_sse_contract(server):
    body = {"model": "default", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
            "temperature": 0}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    data = events(server.url, "/v1/chat/completions", {**body, "stream": True})
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] and "Paris" in text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_disconnect_aborts_the_real_generation(server):
    check_disconnect_aborts(server, {"prompt": LONG, "max_tokens": 200, "temperature": 0, "stream": True})


def test_kill_the_engine_process_mid_stream(server):  # last: it restarts this module's engine process
    check_kill_mid_stream(server, {"prompt": LONG, "max_tokens": 1500, "ignore_eos": True, "stream": True},
                          {"prompt": "Hi", "max_tokens": 4})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_line_two_api_processes_one_engine(thread_completion):
    port = free_port()
    cmd = [sys.executable, "-m", "labserver", "serve", "--backend", "process", "--api-servers", "2",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # the banner names both API processes and the engine process
            if "engine process" in line or time.monotonic() > deadline:
                break
        match = re.search(r"API process\(es\) \[(\d+), (\d+)\], engine process (\d+)", line)
        assert match, line
        api_pids, engine_pid = {int(match[1]), int(match[2])}, int(match[3])

        def one(_):
            body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True}
            with httpx.Client(timeout=120) as client:
                with connect_sse(client, "POST", f"http://127.0.0.1:{port}/generate", json=body) as source:
                    tokens = [e.json().get("token", "") for e in source.iter_sse() if e.data != "[DONE]"]
                    return int(source.response.headers[API_SERVER_HEADER]), "".join(tokens)

        answers = []
        with ThreadPoolExecutor(6) as pool:
            while len(answers) < 48 and {pid for pid, _ in answers} != api_pids:  # the kernel picks
                answers += pool.map(one, range(6))
        assert {pid for pid, _ in answers} == api_pids
        assert all(text == thread_completion.text for _, text in answers)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["engine"]["pid"] == engine_pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
