"""How many threads the engine runs: the machine's physical cores, then the fastest of a few counts.

The machines here have 2 cores, where the counts are 2 and 1, so the choice is tested on its logic: the
cores counted from a made-up topology (hardware threads, an affinity mask, macOS's performance cores,
Windows' rule), and the choice among 8/7/4 threads made from a fake timing whose numbers are written in
the test. One test runs the real timing, and asserts only that it chose one of the counts it measured.
No assertion here depends on a measured time.
"""

import json

import pytest

from labserver import Engine, EngineConfig, config as config_module
from labserver.engine import calibrate
from labserver.engine import threads as threads_module
from labserver.engine.threads import ThreadTrial, measure_threads, pick_threads, thread_candidates, threads_why
from labserver.engine.fake import FakeRunner, WordTokenizer, fake_engine
from labserver.engine.runners import make_runner
from labserver.model.checkpoint import Checkpoint
from tests.test_blockquant import grid_llama


# -- the machine's cores ----------------------------------------------------------------------------------
HYPERTHREADED = {c: f"{c % 4},{c % 4 + 4}" for c in range(8)}  # 4 cores, CPUs c and c + 4 share one


@pytest.fixture
def machine(monkeypatch):
    """``machine(system, usable, siblings=None, sysctl=None)`` makes ``physical_cores`` see that machine."""
    def make(system, usable, siblings=None, sysctl=None):
        monkeypatch.setattr(config_module.platform, "system", lambda: system)
        monkeypatch.setattr(config_module, "usable_cpus", lambda: set(usable))
        monkeypatch.setattr(config_module, "_linux_siblings", lambda: dict(siblings or {}))
        monkeypatch.setattr(config_module, "_sysctl", lambda name: (sysctl or {}).get(name))
    return make


def test_linux_counts_cores_not_hardware_threads(machine):
    machine("Linux", range(8), HYPERTHREADED)
    assert config_module.physical_cores() == 4
    machine("Linux", {0, 4}, HYPERTHREADED)  # taskset to both threads of one core
    assert config_module.physical_cores() == 1
    machine("Linux", {0, 1, 2}, HYPERTHREADED)  # three cores, one thread of each
    assert config_module.physical_cores() == 3


def test_macos_counts_its_performance_cores(machine):
    machine("Darwin", range(10), sysctl={"hw.perflevel0.physicalcpu": 4, "hw.physicalcpu": 10})
    assert config_module.physical_cores() == 4  # an M1 Pro's efficiency cores left out
    machine("Darwin", range(8), sysctl={"hw.physicalcpu": 4})  # an Intel Mac: no performance levels
    assert config_module.physical_cores() == 4


def test_elsewhere_half_the_logical_cpus_and_never_more_than_usable(machine):
    machine("Windows", range(16))
    assert config_module.physical_cores() == 8
    machine("Windows", range(1))
    assert config_module.physical_cores() == 1
    machine("Darwin", range(2), sysctl={"hw.perflevel0.physicalcpu": 8})
    assert config_module.physical_cores() == 2  # capped by the CPUs this process may run on


def test_an_asked_count_is_capped_by_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(config_module, "usable_cpus", lambda: {0, 1, 2})
    assert EngineConfig(threads=512).threads == 3
    assert EngineConfig().threads is None  # measured at the first start
    with pytest.raises(ValueError, match="threads"):
        EngineConfig(threads=0)
    monkeypatch.setenv("LABSERVER_THREADS", "two")
    with pytest.raises(ValueError, match="LABSERVER_THREADS"):
        EngineConfig.from_env()


# -- the choice -------------------------------------------------------------------------------------------
def test_the_counts_timed():
    assert thread_candidates(8) == [8, 7, 4]
    assert thread_candidates(2) == [2, 1]  # a 2-core machine: two counts, kept cheap
    assert thread_candidates(1) == [1]


def table(decode, prefill):
    """A fake timing: ``decode[n]``, ``prefill[n]`` ms for n threads; records the order it was called in."""
    calls = []

    def timing(lean, n):
        calls.append(n)
        return ThreadTrial(decode[n], prefill[n])

    timing.calls = calls
    return timing


def test_the_fastest_decode_wins_and_prefill_breaks_only_near_ties():
    timing = table({8: 6.0, 7: 5.0, 4: 5.5}, {8: 30.0, 7: 35.0, 4: 60.0})
    trials = measure_threads(None, [8, 7, 4], timing)
    assert timing.calls == [8, 7, 4, 8, 7, 4]  # in turns, each count in every round
    assert pick_threads(trials) == 7  # 4's decode is 10% behind: not a tie, whatever its prefill
    assert threads_why(trials, 7, "now").startswith("7 threads: fastest decode of 8/7/4 measured now (decode ")
    # Within 5% of the fastest decode the prefill decides: 8 threads decode 4% slower, prefill far faster.
    near = {8: ThreadTrial(5.2, 30.0), 7: ThreadTrial(5.0, 35.0), 4: ThreadTrial(5.5, 60.0)}
    assert pick_threads(near) == 8 and "fastest prefill" in threads_why(near, 8, "now")
    # A tie on both: fewer threads, leaving the rest of the machine a core.
    assert pick_threads({2: ThreadTrial(5.0, 30.0), 1: ThreadTrial(5.0, 30.0)}) == 1


def test_each_count_keeps_its_best_round():
    rounds = iter([ThreadTrial(9.0, 90.0), ThreadTrial(5.0, 50.0), ThreadTrial(4.0, 80.0), ThreadTrial(6.0, 40.0)])
    trials = measure_threads(None, [2, 1], lambda lean, n: next(rounds))
    assert trials == {2: ThreadTrial(4.0, 80.0), 1: ThreadTrial(5.0, 40.0)}


# -- at the first start, and after it ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small llama saved as a model folder: a model with files, so its measurements are cached."""
    path = tmp_path_factory.mktemp("threads") / "model"
    grid_llama(tie_word_embeddings=False).save_pretrained(path)
    return path


def never(lean, n):
    raise AssertionError("measured the thread counts")


def test_the_first_start_measures_and_the_next_reads_the_cache(folder, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(calibrate, "physical_cores", lambda: 8)
    timing = table({8: 6.0, 7: 5.0, 4: 5.5}, {8: 30.0, 7: 35.0, 4: 60.0})
    monkeypatch.setattr(threads_module, "thread_trial", timing)
    config = EngineConfig(quant="none", max_batch=3, cache_dir=str(tmp_path / "cache"))
    first = make_runner(Checkpoint(folder), config, 64)
    assert first.route.threads == 7 and first.route.threads_why.startswith("7 threads: fastest decode of 8/7/4 "
                                                                           "measured now")
    assert first.kv_layout[0] >= 3 * first.lean.cache.blocks_for(64)  # the model measured on got the engine's pool
    assert "7 threads: fastest decode" in capfd.readouterr().err  # the startup line says it
    assert first.route.to_dict()["threads"] == 7 and "8/7/4" in first.route.to_dict()["threads_why"]
    files = list((tmp_path / "cache" / "threads").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["threads"] == 7

    monkeypatch.setattr(threads_module, "thread_trial", never)
    again = make_runner(Checkpoint(folder), config, 64)
    assert again.route.threads == 7 and "measured at a first start" in again.route.threads_why
    assert str(files[0]) in again.route.threads_why
    with pytest.raises(AssertionError, match="measured the thread counts"):  # another route, another key
        make_runner(Checkpoint(folder), EngineConfig(quant="fp16", cache_dir=config.cache_dir), 64)


def test_threads_asked_for_measure_nothing(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(threads_module, "thread_trial", never)
    runner = make_runner(Checkpoint(folder), EngineConfig(quant="none", threads=1, cache_dir=str(tmp_path)), 64)
    assert (runner.route.threads, runner.route.threads_why) == (1, "--threads 1 asked for")
    monkeypatch.setenv("LABSERVER_THREADS", "1")
    config = EngineConfig.from_env(quant="none", cache_dir=str(tmp_path))
    assert make_runner(Checkpoint(folder), config, 64).route.threads_why == "--threads 1 asked for"
    assert not (tmp_path / "threads").exists()


def test_one_usable_core_measures_nothing(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "physical_cores", lambda: 1)
    monkeypatch.setattr(threads_module, "thread_trial", never)
    runner = make_runner(Checkpoint(folder), EngineConfig(quant="none", cache_dir=str(tmp_path)), 64)
    assert (runner.route.threads, runner.route.threads_why) == (1, "1 thread: this process may use one core")


def test_the_real_timing_chooses_one_of_the_counts_it_measured(folder, tmp_path):
    route = make_runner(Checkpoint(folder), EngineConfig(quant="none", cache_dir=str(tmp_path)), 64).route
    counts = thread_candidates(config_module.physical_cores())
    assert route.threads in counts
    if len(counts) > 1:
        # Either rule may decide on a real machine: "fastest decode of 2/1" or "... of 2/1, and the fastest prefill".
        assert f"of {'/'.join(map(str, counts))}" in route.threads_why and "measured now" in route.threads_why


def test_the_engine_runs_the_chosen_count(folder, tmp_path, monkeypatch):
    """``engine.config.threads`` is the number that runs (the engine thread sets it on itself)."""
    monkeypatch.setattr(calibrate, "physical_cores", lambda: 2)
    monkeypatch.setattr(threads_module, "thread_trial", table({2: 6.0, 1: 5.0}, {2: 30.0, 1: 35.0}))
    engine = Engine(Checkpoint(folder), WordTokenizer(), EngineConfig(quant="none", cache_dir=str(tmp_path)))
    assert engine.config.threads == engine.route["threads"] == 1
    assert engine.route["threads_why"].startswith("1 thread: fastest decode of 2/1")
    # Runners that are not measured run the physical cores, and say so.
    fake = fake_engine(prefill_ms=0, step_ms=0, config=EngineConfig(model="fake"))
    assert fake.config.threads == fake.route["threads"] == 2 and "physical cores" in fake.route["threads_why"]
    assert isinstance(fake.runner, FakeRunner)
