"""The notebooks' reference solutions (``notebooks/solutions/NN_name.py``), loaded by file path: they are
scripts beside the notebooks, not a package."""

import importlib.util
from pathlib import Path

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


def solution(name: str):
    """The module ``notebooks/solutions/<name>.py``, e.g. ``solution("03_event_loop").run_checks``."""
    spec = importlib.util.spec_from_file_location(f"solution_{name}", SOLUTIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
