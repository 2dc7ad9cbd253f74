"""What a backend says about its engine: alive or not, where it runs, and why it cannot serve.

Every backend (the engine thread, the engine process, the lab's variants) answers ``health()`` with an
``EngineHealth``; ``/health`` shows it under ``"engine"`` and answers 503 with the reason ``unavailable``
gives when the engine cannot serve: it is dead (``reason`` says why), or *wedged*: it has work but its
loop has not come round (ended a forward, looked at its queue) for longer than the app's limit. A stream
whose engine died ends with ``EngineDeadError`` (an error event, then ``[DONE]``); a request that
arrives meanwhile gets a 503.

    >>> EngineHealth(alive=True, pid=1234, backend="process", route="q4_1").to_dict()["alive"]
    True
    >>> EngineHealth(alive=False, pid=None, backend="thread", route="q4_1", reason="the engine thread died").ok
    False
    >>> unavailable(EngineHealth(True, 1, "batched", "fake", running=2, no_progress_s=9.0), wedged_after_s=5)
    'the engine is wedged: no progress for 9.0 s with 2 running and 0 waiting'

``engine_state`` names the state for an operator: ``ok``; ``wedged``; ``restarting`` (dead, a restart
will come: ``attempt`` of ``max_restarts``); ``failed`` (dead for good: restarts used up, or a backend
that never restarts, with the last reason).

    >>> engine_state(EngineHealth(False, None, "process", "fake", reason="died", restarts=1), 3, 300)
    {'state': 'restarting', 'attempt': 2, 'max_restarts': 3}
    >>> engine_state(EngineHealth(False, None, "process", "fake", reason="died", restarts=3), 3, 300)
    {'state': 'failed'}

Left out: restarting a dead engine (the process backend's supervisor does; a dead engine thread stays
dead: ``python -m labserver serve`` then drains and exits 1, ``drain``, and a background server answers
503 until it is restarted).
"""

from __future__ import annotations

from ..engine.protocols import EngineHealth


def unavailable(health: EngineHealth, wedged_after_s: float) -> str | None:
    """Why the engine cannot serve now (dead, or wedged for longer than ``wedged_after_s``); None if it can."""
    if not health.alive:
        return health.reason or "the engine is not running"
    if health.reason is not None:
        return health.reason
    if health.no_progress_s > wedged_after_s:
        return (f"the engine is wedged: no progress for {health.no_progress_s:.1f} s with "
                f"{health.running} running and {health.waiting} waiting")
    return None


def engine_state(health: EngineHealth, max_restarts: int, wedged_after_s: float) -> dict:
    """``{"state": ...}`` (and the restart attempt to come), as the module docstring describes."""
    if unavailable(health, wedged_after_s) is None:
        return {"state": "ok"}
    if health.alive:
        return {"state": "wedged"}
    if health.restarts < max_restarts:
        return {"state": "restarting", "attempt": health.restarts + 1, "max_restarts": max_restarts}
    return {"state": "failed"}
