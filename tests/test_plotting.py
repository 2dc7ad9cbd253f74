"""Every figure builds from made-up traces and probes (no server), draws the data it was given, and
writes a readable PNG."""
import pytest

from labserver.measure.probes import HealthProbe
from labserver.measure.trace import Trace
from labserver.measure.plotting import plot_arrivals, plot_demo, plot_health, plot_token_timeline, plot_ttft_bars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def streamed():
    n = 12
    return Trace(arrival_ms=[70.0 + 31.0 * i for i in range(n)], tokens=[f" w{i}" for i in range(n)],
                 step_ms=[65.0] + [30.0] * (n - 1), prefill_time_ms=65.0)


@pytest.fixture
def blocked():
    n = 12
    return Trace(stream=False, arrival_ms=[420.0] * n, tokens=[f" w{i}" for i in range(n)],
                 step_ms=[65.0] + [30.0] * (n - 1), prefill_time_ms=65.0)


@pytest.fixture
def probes():
    fast = HealthProbe("http://fastapi", samples=[(20.0 * i, 1.5) for i in range(20)])
    slow = HealthProbe("http://flask", samples=[(0.0, 2.0), (20.0, 400.0), (420.0, 2.5)])
    return {"FastAPI": fast, "Flask": slow}


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_token_timeline_draws_steps_and_gaps(tmp_path, streamed):
    fig = plot_token_timeline(streamed, tmp_path / "timeline.png")
    (steps, gaps) = fig.axes[0].get_lines()
    assert list(steps.get_xdata()) == list(range(1, 12))
    assert list(steps.get_ydata()) == [30.0] * 11
    assert list(gaps.get_ydata()) == pytest.approx(streamed.itl_ms)
    assert "TTFT 70 ms" in fig.axes[0].get_title()
    assert_png(tmp_path / "timeline.png")


def test_ttft_bars_takes_single_traces_or_lists(tmp_path, streamed, blocked):
    fig = plot_ttft_bars({"FastAPI streaming": [streamed, streamed], "Flask blocking": blocked},
                         tmp_path / "sub" / "bars.png")  # missing folders are made
    heights = [patch.get_height() for patch in fig.axes[0].patches]
    assert heights == pytest.approx([70.0, streamed.e2e_ms, 420.0, 420.0])
    assert_png(tmp_path / "sub" / "bars.png")


def test_arrivals_staircase_and_cliff(tmp_path, streamed, blocked):
    fig = plot_arrivals({"FastAPI streaming": streamed, "Flask blocking": blocked}, "title", tmp_path / "a.png")
    stairs, cliff = fig.axes[0].get_lines()
    assert list(stairs.get_xdata()) == pytest.approx([0.0] + [t / 1000 for t in streamed.arrival_ms])
    assert list(stairs.get_ydata()) == list(range(13))  # 0 tokens at the send, then one more per event
    assert set(cliff.get_xdata()[1:]) == {0.42}  # every token of the blocking answer at once
    assert fig.axes[0].get_title() == "title"
    assert_png(tmp_path / "a.png")


def test_arrivals_with_a_common_start_shift_later_requests():
    first = Trace(sent_s=100.0, arrival_ms=[50.0, 100.0])
    later = Trace(sent_s=100.25, arrival_ms=[50.0, 100.0])  # sent 250 ms after the first
    own, common = (plot_arrivals({"a": first, "b": later}, common_start=c).axes[0] for c in (False, True))
    assert list(own.get_lines()[1].get_xdata()) == pytest.approx([0.0, 0.05, 0.1])
    assert list(common.get_lines()[1].get_xdata()) == pytest.approx([0.25, 0.3, 0.35])
    assert list(common.get_lines()[0].get_xdata()) == pytest.approx([0.0, 0.05, 0.1])
    assert "first request" in common.get_xlabel()


def test_health_plot_has_one_line_per_probe(tmp_path, probes):
    fig = plot_health(probes, tmp_path / "health.png")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and max(lines[1].get_ydata()) == 400.0
    assert fig.axes[0].get_yscale() == "log"
    assert_png(tmp_path / "health.png")


def test_demo_figure_with_and_without_probes(tmp_path, streamed, blocked, probes):
    fig = plot_demo(streamed, blocked, tmp_path / "demo.png", probes)
    assert len(fig.axes) == 4
    assert_png(tmp_path / "demo.png")
    assert plot_demo(streamed, blocked).axes[2].axison is False  # no probes: an empty panel, no file


def test_empty_trace_still_plots(tmp_path):
    fig = plot_token_timeline(Trace(), tmp_path / "empty.png")
    assert fig.axes and (tmp_path / "empty.png").exists()
