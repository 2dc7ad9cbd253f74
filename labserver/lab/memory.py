"""How much memory a notebook took at its peak, said at its end: the lab must fit an 8 GB laptop.

The peak is the operating system's high-water mark of resident memory (RSS): this kernel's own, and the
largest of its finished child processes' (an engine process, notebook 7). Both are kept by the OS, so
nothing has to sample while the notebook runs.

    stop_all()                 # the last cell of every notebook: stop its servers, then print the peak

Left out: memory mapped but never touched (the OS does not count it as resident), and children still
running when the peak is read (stop_all stops them first).
"""
from __future__ import annotations

import sys

from ..serve.background import stop_all as stop_servers
from .claims import claim

BUDGET_MB = 2048  # the whole lab's peak on an 8 GB laptop: the OS, a browser and Jupyter need the rest


def peak_rss_mb() -> tuple[float | None, float | None]:
    """(this process's peak RSS, the largest finished child's) in MB; None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows: the working set's peak, for this process only
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20, None
        except (ImportError, AttributeError):
            return None, None
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**20
    return own, children or None


def report_peak_memory() -> None:
    own, child = peak_rss_mb()
    if own is None:
        print("peak memory: this OS does not report it")
        return
    total = own + (child or 0.0)
    detail = f"this kernel {own:.0f} MB" + (f" + its largest child process {child:.0f} MB" if child else "")
    claim(f"this notebook's peak memory is {total:.0f} MB ({detail}), within the lab's {BUDGET_MB} MB for an "
          "8 GB laptop", total < BUDGET_MB)


def stop_all() -> None:
    """Stop every server this kernel started, then print the notebook's peak memory."""
    stop_servers()
    report_peak_memory()
