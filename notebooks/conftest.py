"""What `pytest --nbval-lax notebooks/` checks besides "every cell runs": the notebooks' claims.

nbval runs each notebook top to bottom in a fresh kernel and, in lax mode, compares no outputs (timings
differ on every run). This plugin reads each cell's printed output as nbval collects it:

- a line starting ``CLAIM FAILS`` fails that cell (``labserver.lab.claims.claim`` prints it when a
  sentence of the prose did not hold on this run);
- a notebook that printed fewer than ``MIN_CLAIMS`` ``CLAIM holds`` lines fails at its last cell;
- the time each notebook took is printed at the end of the session.

The kernel imports this checkout (``PYTHONPATH``) and runs with the OpenMP settings a student has: this
plugin sets neither ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY``. Left out: comparing outputs (nbval's
job, for cells tagged ``nbval-check-output``).
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIN_CLAIMS = 3
HOLDS, FAILS = "CLAIM holds:", "CLAIM FAILS:"  # as labserver.lab.claims prints them

# The notebooks' sources, build script and solutions are not tests (and --doctest-modules would import them).
collect_ignore_glob = ["*.py", "src/*", "solutions/*"]

os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_claims: dict[str, int] = defaultdict(int)
_started: dict[str, float] = {}
_took: dict[str, float] = {}


def _text(outputs) -> str:
    parts = []
    for out in outputs or []:
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _is_nbval_cell(item) -> bool:
    return type(item).__name__ == "IPyNbCell"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not _is_nbval_cell(item) or call.when != "call":
        return
    report, name = outcome.get_result(), Path(str(item.parent.fspath)).stem
    _started.setdefault(name, call.start)
    _took[name] = call.stop - _started[name]
    lines = _text(getattr(item, "test_outputs", None)).splitlines()
    _claims[name] += sum(line.startswith(HOLDS) for line in lines)
    failed = [line for line in lines if line.startswith(FAILS)]
    last = item is [i for i in item.session.items if i.parent is item.parent][-1]
    if report.passed and failed:
        report.outcome, report.longrepr = "failed", "a claim of the prose did not hold:\n" + "\n".join(failed)
    elif report.passed and last and _claims[name] < MIN_CLAIMS:
        report.outcome = "failed"
        report.longrepr = f"{name} printed {_claims[name]} 'CLAIM holds' lines; every notebook needs {MIN_CLAIMS}"


def pytest_terminal_summary(terminalreporter):
    if _took:
        terminalreporter.write_line("notebook run times: " + ", ".join(
            f"{name} {s:.0f} s ({_claims[name]} claims)" for name, s in _took.items())
            + f"; total {sum(_took.values()):.0f} s")

