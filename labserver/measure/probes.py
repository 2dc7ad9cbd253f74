"""`HealthProbe`: GET /health at a steady pace on its own thread, to see whether a server still answers.

A probe runs beside a measurement (`with HealthProbe(url) as probe: ...`); its samples line up with a
`Trace` through `time.perf_counter` (`start_s`, `Trace.sent_s`).

Left out: any other endpoint's semantics (a probe only times the answer and counts failures).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx

from .stats import percentiles


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
