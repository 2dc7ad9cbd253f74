"""Build the lab notebooks from their sources in ``notebooks/src/*.py`` (percent format).

    python notebooks/build.py            # write notebooks/NN_name.ipynb from src/NN_name.py (no outputs)
    python notebooks/build.py --check    # exit 1 if a notebook's cells differ from its source
    python notebooks/build.py 02_streaming_sse    # only the notebooks named

A source file is a sequence of cells, each opened by a ``# %%`` line (code) or ``# %% [markdown]`` line
(markdown; every line starts with ``# ``). Edit the sources, not the .ipynb files, then run
``make notebooks`` to rebuild and execute them. Cells whose source and tags are unchanged keep their outputs.

A cell header may carry tags as jupytext writes them, a JSON list after ``tags=``; they become the cell's
``metadata.tags``. The one the lab uses is nbval's: a cell whose output depends on the machine (timings,
ports, measured text) is marked so that ``pytest --nbval`` never compares it::

    # %% tags=["nbval-ignore-output"]

(``pytest --nbval-lax``, what the tests run, compares no output at all unless a cell asks for it with
``nbval-check-output``; the tag says which cells must never be compared, should anyone run strict nbval.)
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


TAGS = re.compile(r"tags=(\[.*?\])")


def header_tags(line: str) -> list[str]:
    """The tags of a ``# %%`` header line.

    >>> header_tags('# %% tags=["nbval-ignore-output"]')
    ['nbval-ignore-output']
    """
    match = TAGS.search(line)
    return list(json.loads(match.group(1))) if match else []


def parse(text: str) -> list[tuple[str, str, list[str]]]:
    """``[(kind, source, tags), ...]`` from a percent-format file; kind is "code" or "markdown"."""
    cells, kind, lines, tags = [], None, [], []

    def flush():
        if kind is not None:
            source = "\n".join(lines).strip("\n")
            if kind == "markdown":
                source = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in
                                   source.splitlines())
            cells.append((kind, source, tags))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines, tags = ("markdown" if "[markdown]" in line else "code"), [], header_tags(line)
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(source: Path, old: nbformat.NotebookNode | None = None) -> nbformat.NotebookNode:
    """The notebook for ``source``; code cells whose source and tags are unchanged keep ``old``'s outputs."""
    previous = {}
    if old is not None:
        previous = {(c.source, tuple(c.metadata.get("tags", []))): c for c in old.cells if c.cell_type == "code"}
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    for i, (kind, text, tags) in enumerate(parse(source.read_text())):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(text)
        else:
            cell = nbformat.v4.new_code_cell(text)
            if (text, tuple(tags)) in previous:
                cell.outputs = previous[text, tuple(tags)].outputs
                cell.execution_count = previous[text, tuple(tags)].execution_count
        if tags:
            cell.metadata["tags"] = tags
        cell.id = f"{source.stem[:2]}-{i:03d}"  # stable ids: rebuilding does not churn the diff
        nb.cells.append(cell)
    return nb


def sources() -> list[Path]:
    """Every notebook's source, in the order students run them (the two-digit prefix)."""
    return sorted(SOURCES.glob("[0-9][0-9]_*.py"))


def out_of_date() -> list[str]:
    """Names of notebooks whose cells differ from their source (or that do not exist)."""
    stale = []
    for source in sources():
        target = HERE / f"{source.stem}.ipynb"
        if not target.exists():
            stale.append(target.name)
            continue
        built = [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in build(source).cells]
        have = [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nbformat.read(target, as_version=4).cells]
        if built != have:
            stale.append(target.name)
    return stale


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = out_of_date()
        for name in stale:
            print(f"{name} is out of date: run `python notebooks/build.py`")
        return 1 if stale else 0
    names = [a for a in argv if not a.startswith("-")]  # e.g. `build.py 02_streaming_sse`: that one only
    for source in sources():
        if names and source.stem not in names:
            continue
        target = HERE / f"{source.stem}.ipynb"
        old = nbformat.read(target, as_version=4) if target.exists() else None
        nbformat.write(build(source, old), target)
        print(f"wrote {target.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
