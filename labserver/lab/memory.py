"""How much memory a notebook took at its peak, said at its end: the lab must fit an 8 GB laptop.

The peak is the high-water mark of resident memory (RSS) the operating system keeps for each process:
this kernel's own, and the largest of its child processes' (an engine process, notebook 7), read while
they still run, so nothing has to sample while the notebook runs.

    stop_all()                 # the last cell of every notebook: read the peak, stop the servers, print it

On Linux the mark is `VmHWM` in /proc/<pid>/status, not getrusage's `ru_maxrss`: a process started by
exec inherits in `ru_maxrss` the peak of the process that started it (a 1 GB kernel's child reports
at least 1 GB), and `RUSAGE_CHILDREN` adds that again. Windows has the peak working set; elsewhere
(macOS) this process's `ru_maxrss`, and a child's memory now.

Left out: memory mapped but never touched (the OS does not count it as resident), and children that
ended before the last cell (an engine process killed in notebook 7 is replaced by one of the same size).
"""
from __future__ import annotations

import os
import sys

from ..serve.background import stop_all as stop_servers
from .claims import claim

BUDGET_MB = 2048  # the whole lab's peak on an 8 GB laptop: the OS, a browser and Jupyter need the rest


def _vm_hwm_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def process_peak_mb(proc=None) -> float | None:
    """One process's peak RSS in MB (this one by default); None where the OS does not say."""
    hwm = _vm_hwm_mb(proc.pid if proc is not None else "self")
    if hwm is not None:
        return hwm
    try:
        import psutil

        info = (proc or psutil.Process()).memory_info()
        if hasattr(info, "peak_wset"):  # Windows
            return info.peak_wset / 2**20
        if proc is not None:
            return info.rss / 2**20
    except (ImportError, OSError):
        pass
    if proc is None and os.name == "posix":
        import resource

        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20
    return None


def peak_rss_mb() -> tuple[float | None, float | None]:
    """(this process's peak RSS, the largest running child's) in MB; None where there is none or the OS
    does not say."""
    children = []
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except (ImportError, OSError):
        pass
    peaks = []
    for child in children:
        try:
            peak = process_peak_mb(child)
        except Exception:  # it ended while being read
            peak = None
        if peak is not None:
            peaks.append(peak)
    return process_peak_mb(), max(peaks, default=None)


def report_peak_memory(peaks: tuple[float | None, float | None] | None = None) -> None:
    own, child = peaks if peaks is not None else peak_rss_mb()
    if own is None:
        print("peak memory: this OS does not report it")
        return
    total = own + (child or 0.0)
    detail = f"this kernel {own:.0f} MB" + (f" + its largest child process {child:.0f} MB" if child else "")
    claim(f"this notebook's peak memory is {total:.0f} MB ({detail}), within the lab's {BUDGET_MB} MB for an "
          "8 GB laptop", total < BUDGET_MB)


def stop_all() -> None:
    """Read the peak memory (children while they still run), stop every server this kernel started,
    then print the peak."""
    peaks = peak_rss_mb()
    stop_servers()
    report_peak_memory(peaks)
