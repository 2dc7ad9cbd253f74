"""What the notebooks print beside their plots: the prompt, aligned tables, a function's source, the
colour and label of each way of serving (the same in every notebook), and a median that skips gaps.

    >>> median([3.0, None, 1.0, 2.0])
    2.0

Left out: the experiments themselves (one module per notebook) and the plots (`measure.plotting`).
"""
from __future__ import annotations

import inspect
import statistics
from typing import Any, Mapping, Sequence

from ..measure.client import DEFAULT_PROMPT
from ..measure.tables import format_table

PROMPT = DEFAULT_PROMPT

# One colour per way of serving, the same in every notebook.
COLORS = {"flask": "tab:red", "blocking": "tab:orange", "executor": "tab:purple", "thread": "tab:blue"}
LABELS = {"flask": "Flask (WSGI)", "blocking": "async, engine on the loop", "executor": "run_in_executor(next)",
          "thread": "engine thread"}


def show_source(obj) -> None:
    """Print the source of a function, so a notebook shows the code it is about to run."""
    print(inspect.getsource(obj).rstrip())


def _cell(value):
    return ("yes" if value else "no") if isinstance(value, bool) else value


def print_table(rows: Sequence[Mapping[str, Any]]) -> None:
    """A list of dicts with the same keys, as an aligned text table (booleans as yes/no)."""
    if rows:
        print(format_table(list(rows[0]), [[_cell(v) for v in r.values()] for r in rows]))


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
