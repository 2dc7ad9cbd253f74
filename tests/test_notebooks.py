"""The lab notebooks: their shape (fast), every notebook run top to bottom in a fresh kernel against the
default model, and every reference solution run through its checkers.

The notebooks are whatever `notebooks/NN_name.ipynb` exist (built from `notebooks/src/NN_name.py`); each
main notebook has a reference solution `notebooks/solutions/NN_name.py` with `run_checks(engine)`. An
appendix (`NN_appendix_*`, optional reading) has no exercises and no solution.

The run test IS the nbval run: it runs `pytest --nbval-lax notebooks/NN_name.ipynb` in a subprocess, so
each notebook runs once per `make test`, in a fresh kernel, with the OpenMP settings a student has (no
`GOMP_SPINCOUNT`, no `OMP_WAIT_POLICY`). nbval fails a notebook when a cell raises; `notebooks/conftest.py`
fails it on any `CLAIM FAILS` line and on fewer than 3 `CLAIM holds` lines. Outputs are not compared
(they are timings). Run times are printed per notebook; together they must stay under TOTAL_BUDGET_S
(the lab's goal is < 3 min per notebook on an AVX-512 2-core machine, < 6 min on an AVX2 one, and a
`make test` under 15 min), and one notebook gets at most NOTEBOOK_TIMEOUT_S before it counts as hung.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from notebook_solutions import solution

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = [p.stem for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))]
MAIN = [n for n in NAMES if "_appendix" not in n]
MAX_CELL_LINES = 15
MIN_CLAIMS = 3
CELL_TIMEOUT_S = 300
NOTEBOOK_TIMEOUT_S = 360     # the AVX2 goal for one notebook: past it, count it as hung
TOTAL_BUDGET_S = 840         # every notebook together, leaving a minute of the 15 for the rest of make test
DURATIONS: dict[str, float] = {}


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def cells(nb, kind: str) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == kind]


def output_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.output_type == "stream" else out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_every_source_has_a_notebook_and_every_main_notebook_a_reference_solution():
    sources = sorted(p.stem for p in (NOTEBOOKS / "src").glob("[0-9][0-9]_*.py"))
    solutions = sorted(p.stem for p in (NOTEBOOKS / "solutions").glob("[0-9][0-9]_*.py"))
    assert sources == NAMES and len(MAIN) >= 5
    assert solutions == MAIN, "each main notebook needs notebooks/solutions/NAME.py, and nothing else is there"


def test_notebooks_are_built_from_their_sources():
    result = subprocess.run([sys.executable, str(NOTEBOOKS / "build.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("name", NAMES)
def test_notebook_shape(name):
    nb = load(name)
    intro = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and intro.startswith("# ")
    assert "**What you will learn**" in intro and "**Run time:**" in intro
    goals = re.findall(r"^\d\. ", intro.split("**What you will learn**")[1].split("**Run time:**")[0], re.M)
    assert 3 <= len(goals) <= 4, goals
    markdown = "\n".join(cells(nb, "markdown"))
    assert "**Setup ends here.**" in markdown and "## Summary" in markdown
    code = cells(nb, "code")
    assert code[-1].strip() == "stop_all()"  # servers are stopped at the end
    assert sum(source.count("claim(") for source in code) >= MIN_CLAIMS, "state what this run measured as claims"
    if name in MAIN:
        assert "## Exercises" in markdown and markdown.index("## Summary") < markdown.index("## Exercises")
        exercises = [c for c in code if "checks.check_" in c]
        assert 2 <= len(exercises) <= 4, f"{len(exercises)} exercises"
        assert all("raise NotImplementedError" in c for c in exercises)  # stubs for the student
        # The checker's verdict is printed; the True/False it returns must not be echoed under the cell.
        assert all(c.rstrip().splitlines()[-1].startswith("_ = ") or c.rstrip().endswith(";") for c in exercises)


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_short_glue(name):
    for source in cells(load(name), "code"):
        lines = [line for line in source.splitlines() if line.strip()]
        assert len(lines) <= MAX_CELL_LINES, f"a {len(lines)}-line cell belongs in the package:\n{source}"
        assert "nest_asyncio" not in source  # run_concurrent and lab run their own loops on helper threads


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_show_real_outputs(name):
    """The notebook was executed: plots, at least 3 claims that held, no error, no widget, nothing huge."""
    nb = load(name)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert (1 if name in MAIN else 0) <= len(images) <= 6, f"{len(images)} plots"
    lines = output_text(nb).splitlines()
    assert not [line for line in lines if line.startswith("CLAIM FAILS")]
    assert sum(line.startswith("CLAIM holds") for line in lines) >= MIN_CLAIMS
    assert (NOTEBOOKS / f"{name}.ipynb").stat().st_size < 400_000


def nbval_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):  # a student's defaults: OpenMP decides how to wait
        env.pop(name, None)
    return env


@pytest.mark.model
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 60)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_under_nbval(name):
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--nbval-lax",
         f"--nbval-cell-timeout={CELL_TIMEOUT_S}", str(NOTEBOOKS / f"{name}.ipynb")],
        cwd=ROOT, env=nbval_env(), capture_output=True, text=True, timeout=NOTEBOOK_TIMEOUT_S)
    DURATIONS[name] = time.perf_counter() - start
    print(f"{name}: {DURATIONS[name]:.0f} s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.model
def test_all_notebooks_run_within_the_budget():
    if set(DURATIONS) != set(NAMES):
        pytest.skip("runs only after every notebook ran in this session")
    total = sum(DURATIONS.values())
    print("notebook run times: " + ", ".join(f"{n} {s:.0f} s" for n, s in DURATIONS.items()) + f"; total {total:.0f} s")
    assert total < TOTAL_BUDGET_S


@pytest.mark.model
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", MAIN)
def test_reference_solution_passes_its_checkers(name, default_engine, capsys):
    passed = solution(name).run_checks(default_engine)
    out = capsys.readouterr().out
    assert passed and "FAIL" not in out and "TODO" not in out, out


def test_claims_count_and_failures_are_read_from_printed_lines(tmp_path):
    """The nbval plugin's rule, on a hand-made notebook: one CLAIM FAILS fails it, as do too few claims."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nb.cells = [nbformat.v4.new_code_cell("from labserver.lab.claims import claim\n"
                                          "claim('one', True); claim('two', True)"),
                nbformat.v4.new_code_cell("claim('three', 1 < 2)")]
    good = tmp_path / "good.ipynb"
    nbformat.write(nb, good)
    nb.cells.append(nbformat.v4.new_code_cell("claim('four', 2 < 1, why='arithmetic')"))
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nb, bad)
    nb.cells = nb.cells[:1]
    few = tmp_path / "few.ipynb"
    nbformat.write(nb, few)
    plugin = ["-p", "no:cacheprovider", "-o", "addopts=", "--nbval-lax", "-p", "notebooks.conftest"]
    runs = {path.stem: subprocess.run([sys.executable, "-m", "pytest", "-q", *plugin, str(path)], cwd=ROOT,
                                      env=nbval_env(), capture_output=True, text=True, timeout=240)
            for path in (good, bad, few)}
    assert runs["good"].returncode == 0, runs["good"].stdout
    assert runs["bad"].returncode != 0 and "CLAIM FAILS: four (arithmetic)" in runs["bad"].stdout
    assert runs["few"].returncode != 0 and "printed 2 'CLAIM holds' lines" in runs["few"].stdout
    assert json.loads(good.read_text())  # nbval leaves the notebook itself alone


def test_cell_tags_in_a_source_header_reach_the_notebook(tmp_path):
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import build
    finally:
        sys.path.remove(str(NOTEBOOKS))
    source = tmp_path / "99_x.py"
    source.write_text('# %% [markdown]\n# # Title\n\n# %% tags=["nbval-ignore-output"]\nprint(1)\n\n# %%\nx = 2\n')
    nb = build.build(source)
    assert [c.metadata.get("tags", []) for c in nb.cells] == [[], ["nbval-ignore-output"], []]
    assert [c.source for c in nb.cells] == ["# Title", "print(1)", "x = 2"]
