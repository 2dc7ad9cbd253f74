"""Reference solutions for notebook 1, the blocking baseline.

    python notebooks/solutions/01_blocking_baseline.py    # runs every checker against the default model
"""
from concurrent.futures import ThreadPoolExecutor

from labserver.measure.client import blocking_generate

STORY = "Write a short story about a robot who learns to paint."  # long answers: no early end


def predict_blocking_ttft_ms(prefill_ms, step_ms, n_tokens):
    # Nothing is sent before the last token: the prefill makes token 1, each decode step one more.
    return prefill_ms + (n_tokens - 1) * step_ms


def queued(url, n, max_tokens):
    # n threads, each one blocked in its own request: all n are sent at (about) the same instant.
    with ThreadPoolExecutor(max_workers=n) as pool:
        traces = list(pool.map(lambda _: blocking_generate(url, STORY, max_tokens, temperature=0), range(n)))
    return sorted(traces, key=lambda t: t.ttft_ms)


def run_checks(engine) -> bool:
    from labserver.lab import checks, baseline as lab
    from labserver.serve.background import start_flask, stop

    flask = start_flask(engine, name="solutions-01")
    try:
        blocking_generate(flask.url, lab.PROMPT, 2, temperature=0)  # warm-up
        trace = blocking_generate(flask.url, lab.PROMPT, 16, temperature=0)
        return all([checks.check_blocking_prediction(predict_blocking_ttft_ms, trace),
                    checks.check_queued(queued, flask.url)])
    finally:
        stop("solutions-01")


if __name__ == "__main__":
    from labserver import Engine, EngineConfig

    raise SystemExit(0 if run_checks(Engine.from_config(EngineConfig())) else 1)
