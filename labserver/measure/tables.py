"""Aligned text tables for figures: what `make bench`, `make demo` and the notebooks print.

    >>> print(format_table(["name", "ms"], [["a", 1.234], ["b", None], ["ok", True]]))
    name    ms
    ----  ----
    a     1.23
    b        -
    ok    pass

Left out: any other output format (the scripts also write JSON; the notebooks draw plots).
"""
from __future__ import annotations


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[_cell(v) for v in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # First column left-aligned (names), the others right-aligned (numbers).
    lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
