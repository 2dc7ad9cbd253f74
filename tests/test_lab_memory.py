"""The peak memory every notebook prints at its end (issue: the lab on an 8 GB laptop)."""
import subprocess
import sys

from labserver.lab import memory


def test_the_peak_covers_what_this_process_holds_now():
    own, _ = memory.peak_rss_mb()
    import psutil

    assert own >= psutil.Process().memory_info().rss / 2**20 * 0.99  # a high-water mark: never below now


CHILD = """
import sys, time
b = bytearray(int(sys.argv[1]) * 2**20)
b[::4096] = b"x" * len(b[::4096])  # touched: resident
print("ready", flush=True)
time.sleep(60)
"""


def peak_beside_a_child_holding(mb: int) -> float | None:
    """The lab's peak while a child process holds ``mb`` MB."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(mb)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        return memory.peak_rss_mb()[1]
    finally:
        child.kill()
        child.wait()


def test_a_running_child_counts(capsys):
    peak = peak_beside_a_child_holding(300)
    assert peak is not None and peak >= 300
    memory.report_peak_memory((100.0, peak))
    out = capsys.readouterr().out
    assert "its largest child process" in out and "peak memory" in out


def test_a_child_is_not_charged_with_its_parents_peak():
    # getrusage's ru_maxrss would give a child started from a 1 GB process at least 1 GB (and RUSAGE_CHILDREN
    # the same again): the lab's 2 GB budget would fail for memory nobody held twice.
    big = bytearray(1024 * 2**20)
    big[::4096] = b"x" * len(big[::4096])
    peak = peak_beside_a_child_holding(20)
    del big
    assert peak is not None and peak < 500


def test_stop_all_stops_the_servers_then_says_the_peak():
    # In a fresh process, as a notebook's kernel is: this test process's own peak depends on every test
    # run before it in the same process (the real model, loaded several times), not on the lab.
    code = """
from labserver import fake_engine
from labserver.lab import memory
from labserver.serve.background import running_servers, start_fastapi
start_fastapi(fake_engine(prefill_ms=0, step_ms=0), name="test-memory")
memory.stop_all()
assert "test-memory" not in running_servers()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CLAIM holds: this notebook's peak memory" in out.stdout, out.stdout


def test_the_claim_fails_over_the_budget(monkeypatch, capsys):
    monkeypatch.setattr(memory, "peak_rss_mb", lambda: (1500.0, 700.0))
    memory.report_peak_memory()
    assert "CLAIM FAILS: this notebook's peak memory is 2200 MB" in capsys.readouterr().out
