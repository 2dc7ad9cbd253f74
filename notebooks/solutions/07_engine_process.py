"""Reference solutions for notebook 7, the engine in its own process.

    python notebooks/solutions/07_engine_process.py    # runs every checker (no model needed)
"""
import json


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def sse_from_ids(outputs, tokenizer, stop):
    ids, prefix, read = [], 0, 0  # decode ids[prefix:read] and ids[prefix:], send the difference
    held = ""  # text that could still be the start of a stop string
    for out in outputs:
        if "token_id" not in out:  # the engine's finish: send what is still held back, then the summary
            tail = tokenizer.decode(ids[prefix:])[len(tokenizer.decode(ids[prefix:read])):]
            if held + tail:
                yield sse({"token": held + tail})
            yield sse(out)
            break
        ids.append(out["token_id"])
        before, now = tokenizer.decode(ids[prefix:read]), tokenizer.decode(ids[prefix:])
        text = held
        if len(now) > len(before) and not now.endswith("\ufffd"):  # a whole character more
            text, prefix, read = held + now[len(before):], read, len(ids)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:  # a stop string: send the text before it, stop reading (the server aborts the request)
            yield sse({**out, "token": text[:min(hits)]})
            yield sse({"finish_reason": "stop", "usage": {"completion_tokens": len(ids)}})
            break
        keep = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        held = text[len(text) - keep:]
        yield sse({**out, "token": text[:len(text) - keep]})
    yield "data: [DONE]\n\n"


def should_restart(deaths_s, now_s, max_restarts, window_s):
    recent = [t for t in deaths_s if now_s - t < window_s]  # the newest death is one of them
    return len(recent) <= max_restarts


def run_checks(engine=None) -> bool:
    from labserver.lab import checks

    return all([checks.check_sse_from_ids(sse_from_ids), checks.check_should_restart(should_restart)])


if __name__ == "__main__":
    raise SystemExit(0 if run_checks() else 1)
