"""`make bench`'s process column when there is no engine process to measure: its goals fail as unmeasured
(never a crash of the whole bench, never a pass), and the table still prints."""
from labserver import fake_engine
from labserver.measure import bench
from labserver.serve.process.supervisor import EngineStartError


def test_an_engine_process_that_cannot_start_fails_its_goals_unmeasured(monkeypatch):
    real = bench.measure_fastapi

    def measure(engine, backend, *args, **kwargs):
        if backend == "process":
            raise EngineStartError("the engine process exited during startup (code 1)")
        return real(engine, backend, *args, **kwargs)

    monkeypatch.setattr(bench, "measure_fastapi", measure)
    logs = []
    result = bench.run_bench(fake_engine(prefill_ms=20, step_ms=5), max_tokens=4, runs=1, concurrency=2,
                             log=logs.append, speed=False)
    assert all(result[name] is None for name in bench.PROCESS_GOALS)
    assert not result["all_pass"] and not any(result["goals"][name]["pass"] for name in bench.PROCESS_GOALS)
    assert result["P0"] is not None  # the engine thread's column is measured as before
    assert any("not measured" in line and "exited during startup" in line for line in logs)
    table = bench.report(result).splitlines()
    assert "engine process" in table[0] and table[3].split()[-1] == "-"  # its server step: not measured
