"""Polling in the tests: a condition that another thread or process makes true, within a deadline.

`seconds_until` says how long it took (a test asserts a bound on it: how soon a cancelled generation
stops, a slot frees, a dead process is noticed); `wait_for` only whether it came in time.
"""

import time


def seconds_until(condition, timeout_s: float, poll_s: float = 0.005) -> float:
    """Seconds until ``condition()`` held, polled every ``poll_s``; at least ``timeout_s`` if it never did."""
    start = time.perf_counter()
    while not condition() and time.perf_counter() - start < timeout_s:
        time.sleep(poll_s)
    return time.perf_counter() - start


def wait_for(condition, timeout_s: float, poll_s: float = 0.02) -> bool:
    """Whether ``condition()`` held within ``timeout_s`` (a last look at the deadline included)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return bool(condition())
