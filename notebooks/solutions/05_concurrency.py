"""Reference solutions for notebook 5, concurrency.

    python notebooks/solutions/05_concurrency.py    # runs every checker against the default model
"""


def aggregate_tokens_per_s(traces):
    start_s = min(t.sent_s for t in traces)
    end_s = max(t.sent_s + t.arrival_ms[-1] / 1000 for t in traces)
    return sum(len(t.arrival_ms) for t in traces) / (end_s - start_s)


def predict_itl_ms(step_ms, n):
    # Round robin: between two tokens of one stream, every one of the n streams takes one step.
    return n * step_ms


def batched_tokens_per_s(batch, step_ms):
    return 1000 * batch / step_ms


def run_checks(engine) -> bool:
    from labserver.lab import checks, concurrency as lab
    from labserver.serve.background import start_fastapi, stop

    try:
        thread = start_fastapi(engine, backend="thread", name="solutions-05-thread")
        loads = lab.sweep(thread.url, ns=(1, 2), max_tokens=8)
        stop("solutions-05-thread")
        batched = start_fastapi(engine, backend="batched", name="solutions-05-batched")
        steps = lab.step_ms_by_batch(lab.sweep(batched.url, ns=(1, 2), max_tokens=8))
        return all([checks.check_aggregate_tokens_per_s(aggregate_tokens_per_s, loads),
                    checks.check_itl_prediction(predict_itl_ms, loads),
                    checks.check_batched_tokens_per_s(batched_tokens_per_s, steps)])
    finally:
        stop("solutions-05-thread")
        stop("solutions-05-batched")


if __name__ == "__main__":
    from labserver import Engine, EngineConfig

    raise SystemExit(0 if run_checks(Engine.from_config(EngineConfig())) else 1)
