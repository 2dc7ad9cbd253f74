"""The peak memory every notebook prints at its end (issue: the lab on an 8 GB laptop)."""
import subprocess
import sys

from labserver.lab import memory


def test_the_peak_covers_what_this_process_holds_now():
    own, _ = memory.peak_rss_mb()
    import psutil

    assert own >= psutil.Process().memory_info().rss / 2**20 * 0.99  # a high-water mark: never below now


def test_a_finished_child_counts(capsys):
    # A child that touched ~300 MB: the largest finished child is part of the notebook's peak.
    subprocess.run([sys.executable, "-c", "b = bytearray(300 * 2**20)"], check=True)
    _, child = memory.peak_rss_mb()
    assert child is not None and child >= 300
    memory.report_peak_memory()
    out = capsys.readouterr().out
    assert "its largest child process" in out and "peak memory" in out


def test_stop_all_stops_the_servers_then_says_the_peak(capsys):
    from labserver import fake_engine
    from labserver.serve.background import running_servers, start_fastapi

    start_fastapi(fake_engine(prefill_ms=0, step_ms=0), name="test-memory")
    memory.stop_all()
    assert "test-memory" not in running_servers()
    assert "CLAIM holds: this notebook's peak memory" in capsys.readouterr().out
