"""A few seconds of the soak on the fake engine: every kind of traffic, both kills, nothing lost."""

import pytest

from labserver.measure.soak import growing, soak

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def test_a_short_soak_loses_nothing():
    report = soak(seconds=6, max_tokens=16, fake=True)
    outcomes = report["outcomes"]
    assert report["failed"] == [] and report["lost"] == [], report
    assert outcomes.get("stream [DONE]", 0) > 0 and outcomes.get("bad input 400", 0) > 0
    assert outcomes.get("slowloris not cut", 0) == 0
    assert report["api_restarts"] == 1
    assert {"launcher", "engine", "api 0", "api 1"} <= set(report["resources"][-1])


def test_growth_that_levels_off_passes_and_growth_that_does_not_fails():
    one = {"pid": 1, "rss_mb": 100.0, "threads": 5, "fds": 20}
    levelled = [{"p": one}, {"p": {**one, "fds": 60}}, {"p": {**one, "fds": 62}}]
    climbing = [{"p": one}, {"p": {**one, "fds": 60}}, {"p": {**one, "fds": 100}}]
    replaced = [{"p": one}, {"p": {**one, "fds": 60}}, {"p": {**one, "pid": 2, "fds": 100}}]
    assert growing(levelled) == [] and growing(replaced) == []
    assert growing(climbing) == ["p fds: 20 -> 60 -> 100"]
