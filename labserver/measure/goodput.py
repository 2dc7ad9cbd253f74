"""Goodput: the requests per second that met every service-level objective (SLO), as `vllm bench serve`
defines it with `--goodput ttft:MS tpot:MS e2el:MS`.

A request is good when each metric named in the SLO is at most its bound (milliseconds); throughput
counts every completed request, goodput only the good ones. A server pushed past its knee keeps its
throughput while its goodput collapses: the requests still finish, too late to be of use.

    >>> slo = parse_slo(["ttft:200", "tpot:50"])
    >>> slo
    {'ttft': 200.0, 'tpot': 50.0}
    >>> meets_slo({"ttft_ms": 150.0, "tpot_ms": 50.0, "e2el_ms": 9000.0}, slo)
    True
    >>> meets_slo({"ttft_ms": 250.0, "tpot_ms": 20.0, "e2el_ms": 900.0}, slo)
    False

Left out: SLOs on percentiles of a whole run (an SLO here judges each request on its own).
"""
from __future__ import annotations

from typing import Iterable, Mapping

METRICS = ("ttft", "tpot", "e2el")


def parse_slo(items: Iterable[str] | str | None) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` or `"ttft:200 tpot:50"` -> `{"ttft": 200.0, "tpot": 50.0}` (ms)."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = items.split()
    slo = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in METRICS:
            raise ValueError(f"a goodput SLO is NAME:MS with NAME one of {', '.join(METRICS)}; got {item!r}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"the bound of {name} must be a number of milliseconds; got {value!r}") from None
        if slo[name] <= 0:
            raise ValueError(f"the bound of {name} must be > 0 ms; got {value}")
    return slo


def meets_slo(record: Mapping, slo: Mapping[str, float]) -> bool:
    """Whether one completed request (a per-request record with `ttft_ms`, `tpot_ms`, `e2el_ms`) is good.

    A request of one token has no TPOT: like vLLM, it then counts as within the TPOT bound."""
    if record.get("error") or record.get("ttft_ms") is None:
        return False
    for name, bound in slo.items():
        value = record.get(f"{name}_ms")
        if name == "tpot" and value is None:
            continue
        if value is None or value > bound:
            return False
    return True
