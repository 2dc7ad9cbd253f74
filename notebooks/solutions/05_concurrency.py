"""Reference solutions for notebook 5, concurrency.

    python notebooks/solutions/05_concurrency.py    # runs every checker against the default model
"""


def one_round(engine, waiting, running, free_slots):
    joining = waiting[:free_slots]  # first come, first served, as many as there are free cache slots
    del waiting[:len(joining)]
    if joining:
        engine.prefill_steps(joining)  # one forward for every newcomer's prompt
        running.extend(joining)
    stepping = [seq for seq in running if not seq.finished]  # a prefill can finish a sequence (max_tokens=1)
    if stepping:
        engine.decode_step(stepping, batched=True)  # one forward for everyone running
    for seq in [seq for seq in running if seq.finished]:
        engine.end(seq)  # frees its slot now, for the next round's newcomers
        running.remove(seq)


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
        turns = lab.sweep(thread.url, ns=(1, 2), max_tokens=8)
        stop("solutions-05-thread")
        batched = start_fastapi(engine, backend="batched", name="solutions-05-batched")
        together = lab.sweep(batched.url, ns=(2,), max_tokens=8)
        return all([checks.check_one_round(one_round),
                    checks.check_aggregate_tokens_per_s(aggregate_tokens_per_s, turns),
                    checks.check_itl_prediction(predict_itl_ms, turns),
                    checks.check_batched_tokens_per_s(batched_tokens_per_s, together)])
    finally:
        stop("solutions-05-thread")
        stop("solutions-05-batched")


if __name__ == "__main__":
    from labserver import Engine, EngineConfig

    raise SystemExit(0 if run_checks(Engine.from_config(EngineConfig())) else 1)
