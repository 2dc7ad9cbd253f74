"""What a backend says about its engine: alive or not, where it runs, and why it cannot serve.

Every backend (the engine thread, the engine process, the lab's variants) answers ``health()`` with an
``EngineHealth``; ``/health`` shows it under ``"engine"`` and answers 503 with its ``reason`` when the
engine cannot serve. A stream whose engine died ends with ``EngineDeadError`` (an error event, then
``[DONE]``); a request that arrives meanwhile gets a 503.

    >>> EngineHealth(alive=True, pid=1234, backend="process", route="q4_1").to_dict()["alive"]
    True
    >>> EngineHealth(alive=False, pid=None, backend="thread", route="q4_1", reason="the engine thread died").ok
    False

Left out: deciding when an engine is wedged (each backend knows its own progress counter) and restarts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class EngineDeadError(RuntimeError):
    """The engine stopped (its thread failed, its process died) with requests in flight."""


@dataclass(frozen=True)
class EngineHealth:
    alive: bool
    pid: int | None  # the process that runs the engine
    backend: str  # "thread", "batched", "process", "executor", "blocking", ...
    route: str  # the weight format that runs ("q4_1", "fp16", "none", "fake")
    reason: str | None = None  # why the engine cannot serve (dead, wedged, restarting); None when it can
    running: int = 0
    waiting: int = 0
    restarts: int = 0

    @property
    def ok(self) -> bool:
        return self.alive and self.reason is None

    def to_dict(self) -> dict:
        return asdict(self)
