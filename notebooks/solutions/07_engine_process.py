"""Reference solutions for notebook 7, the engine in its own process.

    python notebooks/solutions/07_engine_process.py    # runs every checker (no model needed)
"""
import json


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def new_text(tokenizer, ids, prefix, read):
    # Decode a window twice, ids[prefix:read] (sent already) and ids[prefix:]; the difference is new.
    before, now = tokenizer.decode(ids[prefix:read]), tokenizer.decode(ids[prefix:])
    if len(now) > len(before) and not now.endswith("\ufffd"):  # a whole character more
        return now[len(before):], read, len(ids)
    return "", prefix, read


def hold_back(text, stop):
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        return text[:min(hits)], "", True
    keep = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - keep], text[len(text) - keep:], False


def sse_from_ids(outputs, tokenizer, stop):
    ids, prefix, read, held = [], 0, 0, ""
    for out in outputs:
        if "token_id" not in out:  # the engine's finish: send what is still held back, then the summary
            tail = tokenizer.decode(ids[prefix:])[len(tokenizer.decode(ids[prefix:read])):]
            if held + tail:
                yield sse({"token": held + tail})
            yield sse(out)
            break
        ids.append(out["token_id"])
        text, prefix, read = new_text(tokenizer, ids, prefix, read)
        send, held, stopped = hold_back(held + text, stop)
        yield sse({**out, "token": send})
        if stopped:  # stop reading: the server aborts the request
            yield sse({"finish_reason": "stop", "usage": {"completion_tokens": len(ids)}})
            break
    yield "data: [DONE]\n\n"


def should_restart(deaths_s, now_s, max_restarts, window_s):
    recent = [t for t in deaths_s if now_s - t < window_s]  # the newest death is one of them
    return len(recent) <= max_restarts


def run_checks(engine=None) -> bool:
    from labserver.lab import checks

    return all([checks.check_new_text(new_text), checks.check_hold_back(hold_back),
                checks.check_sse_from_ids(sse_from_ids), checks.check_should_restart(should_restart)])


if __name__ == "__main__":
    raise SystemExit(0 if run_checks() else 1)
