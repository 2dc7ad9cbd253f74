"""The package's shape: the import contracts in pyproject.toml hold (layers import downward only, no
cycles, a client that speaks only HTTP, no web framework below serve/), each contract catches the
violation it exists for, and no module outgrows one concept.

`lint-imports` reads the source (it imports nothing), so a violation is shown on a copy of the package
with one import added, checked against the same contracts.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "labserver"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 300
# Modules allowed over MAX_LINES for now, each with the reason; the test below fails once one fits.
TOO_LONG: dict[str, str] = {}


def lint_imports(cwd: Path, *contracts: str, config: Path = ROOT / "pyproject.toml") -> subprocess.CompletedProcess:
    """`lint-imports` on the package found from `cwd`, limited to the contracts with these ids, if any."""
    args = [str(LINT_IMPORTS), "--config", str(config), "--no-cache", "--no-logo"]  # no cache files left behind
    args += [arg for contract in contracts for arg in ("--contract", contract)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("engine/engine.py", "from ..serve import limits", "layers"),
    ("config.py", "from .lab import display", "layers"),
    ("model/checkpoint.py", "from ..engine import sequence", "layers"),
    ("serve/limits/__init__.py", "from .. import app", "acyclic"),  # app imports limits
    ("measure/trace.py", "from ..engine import sequence", "client"),
    ("measure/client.py", "import torch", "client"),
    ("engine/sequence.py", "import fastapi", "no-web-below-serve"),
    ("serve/limits/__init__.py", "from fastapi import HTTPException", "flask-without-asgi"),  # flask_app imports limits
])
def test_each_contract_catches_its_violation(tmp_path, module, line, contract):
    shutil.copytree(PACKAGE, tmp_path / "labserver", ignore=shutil.ignore_patterns("__pycache__", "csrc", "static"))
    assert lint_imports(tmp_path, contract).returncode == 0  # the copy keeps the contract ...
    target = tmp_path / "labserver" / module
    target.write_text(target.read_text() + f"\n{line}  # the violation\n")
    result = lint_imports(tmp_path, contract)  # ... until the one line is added
    assert result.returncode == 1 and "Contracts: 0 kept, 1 broken." in result.stdout, result.stdout
    importer = Path(module).parent.name if Path(module).stem == "__init__" else Path(module).stem
    assert importer in result.stdout.split("Broken contracts")[1], result.stdout  # it names the import



def module_lengths() -> dict[str, int]:
    return {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
            for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_is_over_300_lines():
    lengths = module_lengths()
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in TOO_LONG}
    assert not too_long, f"split these into one concept each: {too_long}"
    fits_now = [name for name in TOO_LONG if lengths.get(name, 0) <= MAX_LINES]
    assert not fits_now, f"no longer over {MAX_LINES} lines (or gone): remove from TOO_LONG: {fits_now}"
