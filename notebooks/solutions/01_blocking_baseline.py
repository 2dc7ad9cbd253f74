"""Reference solutions for notebook 1, the blocking baseline.

    python notebooks/solutions/01_blocking_baseline.py    # runs every checker against the default model
"""
from labserver.measure.client import run_concurrent


def predict_blocking_ttft_ms(prefill_ms, step_ms, n_tokens):
    # Nothing is sent before the last token: the prefill makes token 1, each decode step one more.
    return prefill_ms + (n_tokens - 1) * step_ms


def queued(url, n, max_tokens):
    traces = run_concurrent(url, n, max_tokens=max_tokens, temperature=0, stream=False)
    return sorted(traces, key=lambda t: t.ttft_ms)


def run_checks(engine) -> bool:
    from labserver.lab import checks, baseline as lab
    from labserver.measure.client import blocking_generate
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
