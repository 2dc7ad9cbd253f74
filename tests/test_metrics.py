"""GET /metrics: Prometheus text with vLLM-style names, counts a reader can check by hand, one registry per app."""

import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from labserver import fake_engine
from labserver.serve.app import create_app
from labserver.serve.limits import ServerLimits
from labserver.serve.metrics import buckets_1_2_5
from labserver.serve.background import UvicornServer

pytestmark = pytest.mark.timeout(60)

NAMES = {
    "labserver:time_to_first_token_seconds": "histogram",
    "labserver:inter_token_latency_seconds": "histogram",
    "labserver:e2e_request_latency_seconds": "histogram",
    "labserver:request_prompt_tokens": "histogram",
    "labserver:request_generation_tokens": "histogram",
    "labserver:num_requests_running": "gauge",
    "labserver:prompt_tokens": "counter",
    "labserver:generation_tokens": "counter",
    "labserver:request_success": "counter",
    "labserver:request_errors": "counter",
    "labserver:request_rejected": "counter",
}


def scrape(url: str) -> dict[str, float]:
    """Sample name (with labels other than model_name) -> value."""
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model_name", "le"))
            if "le" in s.labels:
                labels = (labels + "," if labels else "") + f"le={s.labels['le']}"
            values[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return values


def stream(url: str, path: str, body: dict, leave_after: int | None = None) -> int:
    """Stream one request; return how many events were read (optionally leaving after some)."""
    n = 0
    with httpx.Client(timeout=60) as client, connect_sse(client, "POST", url + path, json=body) as source:
        for _ in source.iter_sse():
            n += 1
            if n == leave_after:
                break
    return n


def wait_idle(engine, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)


def test_every_metric_is_exposed_with_its_type():
    with UvicornServer(create_app(fake_engine())) as server:
        text = httpx.get(server.url + "/metrics").text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in NAMES.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    assert 'model_name="fake"' in text


def test_counts_by_hand_after_one_stream():
    # The fake engine sleeps 30 ms before the first token and 10 ms before each next one: 5 tokens take >= 70 ms.
    engine = fake_engine(prefill_ms=30, step_ms=10)
    with UvicornServer(create_app(engine)) as server:
        stream(server.url, "/generate", {"prompt": "a b c", "max_tokens": 5, "stream": True})
        m = scrape(server.url)
    assert m["labserver:time_to_first_token_seconds_count"] == 1
    assert m["labserver:time_to_first_token_seconds_sum"] >= 0.030
    assert m["labserver:inter_token_latency_seconds_count"] == 4  # 5 tokens, 4 gaps
    assert m["labserver:e2e_request_latency_seconds_count"] == 1
    assert m["labserver:e2e_request_latency_seconds_sum"] >= 0.070
    assert m["labserver:prompt_tokens_total"] == 3  # "a b c": the fake engine counts words
    assert m["labserver:generation_tokens_total"] == 5
    assert m["labserver:request_generation_tokens_sum"] == 5
    assert m["labserver:request_success_total{finished_reason=length}"] == 1
    assert m["labserver:num_requests_running"] == 0
    assert m["labserver:time_to_first_token_seconds_bucket{le=+Inf}"] == 1


def test_how_requests_end_is_counted():
    engine = fake_engine(prefill_ms=5, step_ms=10)
    limits = ServerLimits(max_concurrent=1)
    with UvicornServer(create_app(engine, limits=limits)) as server:
        url = server.url
        # stop: a stop string matched on the OpenAI route.
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stop": " three"}, timeout=30)
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        # abort: the client leaves mid-stream.
        stream(url, "/generate", {"prompt": "hi", "max_tokens": 500, "stream": True}, leave_after=2)
        wait_idle(engine)
        # busy: one generation runs, a second is refused with a 429.
        holder = threading.Thread(target=stream, args=(url, "/generate", {"prompt": "hi", "max_tokens": 30,
                                                                        "stream": True}))
        holder.start()
        while engine.running == 0:
            time.sleep(0.005)
        running = scrape(url)["labserver:num_requests_running"]
        refused = httpx.post(url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        holder.join()
        m = scrape(url)
    assert running == 1 and refused.status_code == 429
    assert m["labserver:request_success_total{finished_reason=stop}"] == 1
    assert m["labserver:request_success_total{finished_reason=abort}"] == 1
    assert m["labserver:request_success_total{finished_reason=length}"] == 1
    assert m["labserver:request_rejected_total{reason=busy}"] == 1
    assert m["labserver:e2e_request_latency_seconds_count"] == 2  # finished ones only: stop and length


def test_faults_are_counted_as_errors():
    with UvicornServer(create_app(fake_engine(prefill_ms=1, step_ms=1, fail_at=1))) as server:
        stream(server.url, "/generate", {"prompt": "hi", "max_tokens": 5, "stream": True})
        assert httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 5}).status_code == 500
        m = scrape(server.url)
    assert m["labserver:request_errors_total"] == 2
    assert "labserver:request_success_total{finished_reason=abort}" not in m


def test_two_apps_in_one_process_keep_their_own_numbers():
    one, two = fake_engine(prefill_ms=1, step_ms=1), fake_engine(prefill_ms=1, step_ms=1)
    with UvicornServer(create_app(one)) as a, UvicornServer(create_app(two)) as b:
        httpx.post(a.url + "/generate", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
        assert scrape(a.url)["labserver:generation_tokens_total"] == 3
        assert scrape(b.url)["labserver:generation_tokens_total"] == 0


def test_token_buckets_follow_vllm():
    assert buckets_1_2_5(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
