"""Prometheus metrics for ``GET /metrics``, named after vLLM's so the same dashboards and queries work.

vLLM's name with ``labserver:`` for ``vllm:``, the same buckets and the same ``model_name`` label:

=========================================== ======================================================
``labserver:time_to_first_token_seconds``   request admitted -> first token handed to the web layer
``labserver:inter_token_latency_seconds``   gap between consecutive tokens of one request
``labserver:e2e_request_latency_seconds``   request admitted -> last token (finished requests)
``labserver:request_prompt_tokens``         prompt length per request (histogram)
``labserver:request_generation_tokens``     tokens generated per request (histogram)
``labserver:num_requests_running``          generations in progress on the engine (gauge)
``labserver:prompt_tokens_total``           prompt tokens prefilled (counter)
``labserver:generation_tokens_total``       tokens generated (counter)
``labserver:request_success_total``         requests ended, by ``finished_reason``: stop, length, abort
``labserver:kv_cache_usage_perc``           fraction of KV blocks in use (gauge, 1 = all)
``labserver:prefix_cache_queries_total``    prompt tokens looked up in the prefix cache (counter)
``labserver:prefix_cache_hits_total``       of those, tokens found there: not computed again (counter)
``labserver:num_preemptions_total``         running requests that gave their KV blocks back (counter)
=========================================== ======================================================

Two have no vLLM counterpart: ``labserver:request_errors_total`` (a fault inside the engine) and
``labserver:request_rejected_total{reason="busy"}`` (429s from the concurrency limit).

Times are measured in the web process, the way vLLM's front end sees them, so TTFT includes any wait
for the engine thread. Each app has its own ``CollectorRegistry``: several apps in one process (tests,
notebooks) do not clash. The KV cache's figures are the engine's own, read from the backend's health
at scrape time (from the engine process too). Left out: vLLM's queue/prefill/decode phase histograms and
multiprocess collection.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.sequence import Finish, TokenEvent

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so histograms can be compared bucket by bucket.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                 240.0, 480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit``, as vLLM builds token-count buckets.

    >>> buckets_1_2_5(100)
    [1, 2, 5, 10, 20, 50, 100]
    """
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """The metrics of one app. ``running`` is read at scrape time."""

    def __init__(self, model_name: str, running: Callable[[], int], max_tokens: int = 8192,
                 kv: Callable[[], dict | None] = lambda: None):
        self.registry = CollectorRegistry()
        labels, reg = ["model_name"], self.registry

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=reg).labels(model_name)

        self.ttft = histogram("labserver:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS_S)
        self.itl = histogram("labserver:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS_S)
        self.e2e = histogram("labserver:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             E2E_BUCKETS_S)
        token_buckets = buckets_1_2_5(max_tokens)
        self.request_prompt_tokens = histogram("labserver:request_prompt_tokens",
                                               "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = histogram("labserver:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.prompt_tokens = counter("labserver:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("labserver:generation_tokens", "Number of generation tokens processed.")
        self.errors = counter("labserver:request_errors", "Requests that ended with a fault in the engine.")
        self.success = Counter("labserver:request_success", "Count of successfully processed requests.",
                               labels + ["finished_reason"], registry=reg)
        self.rejected = Counter("labserver:request_rejected", "Requests refused before any work, by reason.",
                                labels + ["reason"], registry=reg)
        self.model_name = model_name
        Gauge("labserver:num_requests_running", "Number of requests in model execution batches.", labels,
              registry=reg).labels(model_name).set_function(running)
        reg.register(_KVCollector(model_name, kv))

    def record(self, prompt_tokens: int) -> "RequestRecord":
        """Start timing one admitted request."""
        return RequestRecord(self, prompt_tokens)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _KVCollector:
    """The engine's KV cache figures, read when scraped (an engine without a paged pool has none)."""

    def __init__(self, model_name: str, kv: Callable[[], dict | None]):
        self.model_name, self.kv = model_name, kv

    def describe(self):
        return []  # nothing to check at registration; collect() reads the engine

    def collect(self):
        kv = self.kv()
        if not kv:
            return
        name = [self.model_name]
        usage = GaugeMetricFamily("labserver:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                  labels=["model_name"])
        usage.add_metric(name, kv["kv_cache_usage_perc"] / 100)
        yield usage
        for key, doc in (("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
                         ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
                         ("preemptions", "Cumulative number of preemptions from the engine.")):
            family = CounterMetricFamily("labserver:" + ("num_preemptions" if key == "preemptions" else key), doc,
                                         labels=["model_name"])
            family.add_metric(name, kv[key])
            yield family


class RequestRecord:
    """Observes one request's events; ``close`` (idempotent) books how it ended."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.metrics, self.prompt_tokens = metrics, prompt_tokens
        self.start = self.last = time.perf_counter()
        self.end: float | None = None
        self.tokens = 0
        self.reason: str | None = None  # "stop" | "length" once known
        self.failed = self.closed = False

    def observe(self, item) -> None:
        now = time.perf_counter()
        if isinstance(item, TokenEvent):
            m = self.metrics
            if self.tokens == 0:
                m.ttft.observe(now - self.start)
                m.prompt_tokens.inc(self.prompt_tokens)  # the prefill has run
            else:
                m.itl.observe(now - self.last)
            m.generation_tokens.inc()
            self.tokens += 1
            self.last = now
        elif isinstance(item, Finish) and item.finish_reason in ("stop", "length"):
            self.finish(item.finish_reason)

    def finish(self, reason: str) -> None:
        """The request is complete ("stop"/"length"), also when the web layer ends it (a stop string)."""
        if self.reason is None:
            self.reason, self.end = reason, time.perf_counter()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.metrics
        if self.failed:
            m.errors.inc()
            return
        m.success.labels(m.model_name, self.reason or "abort").inc()
        if self.reason:
            m.e2e.observe(self.end - self.start)
            m.request_prompt_tokens.observe(self.prompt_tokens)
            m.request_generation_tokens.observe(self.tokens)
