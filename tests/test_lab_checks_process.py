"""Notebook 7's checkers: each passes the reference solution and FAILS the wrong answers it exists to catch
(decoding each token id alone, a stream without [DONE], stop strings ignored, a supervisor that never
gives up). No model: the checkers run on byte tokens and the fake runner."""
import json

import pytest

from labserver.lab import checks
from notebook_solutions import solution


REF = solution("07_engine_process")


def per_id_decode(outputs, tokenizer, stop):
    """The bug the exercise is about: each id decoded alone (stop strings and [DONE] done right)."""
    text = ""
    for out in outputs:
        if "token_id" not in out:
            yield REF.sse(out)
            break
        piece = tokenizer.decode([out["token_id"]])
        text += piece
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            yield REF.sse({**out, "token": piece[:len(piece) - (len(text) - min(hits))]})
            yield REF.sse({"finish_reason": "stop"})
            break
        yield REF.sse({**out, "token": piece})
    yield "data: [DONE]\n\n"


def without_done(outputs, tokenizer, stop):
    for frame in REF.sse_from_ids(outputs, tokenizer, stop):
        if "[DONE]" not in frame:
            yield frame


def ignores_stop(outputs, tokenizer, stop):
    return REF.sse_from_ids(outputs, tokenizer, [])


def stub(outputs, tokenizer, stop):
    raise NotImplementedError


def test_the_reference_passes(capsys):
    assert REF.run_checks() is True
    out = capsys.readouterr().out
    assert "FAIL" not in out and "TODO" not in out and out.count("PASS") >= 20


@pytest.mark.parametrize("wrong, shows", [
    (per_id_decode, "text '" + "Gr\ufffd\ufffd"),  # ü is two bytes: two replacement characters
    (without_done, "ends with data: [DONE]"),
    (ignores_stop, "finish_reason 'length' (expected 'stop')"),
])
def test_check_sse_from_ids_fails_a_wrong_answer(wrong, shows, capsys):
    assert checks.check_sse_from_ids(wrong) is False
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert any(shows in line for line in failed), failed


def test_a_stub_is_todo_not_a_traceback(capsys):
    assert checks.check_sse_from_ids(stub) is False
    assert capsys.readouterr().out.startswith("TODO")


def test_a_loop_that_reads_past_the_stop_string_fails(capsys):
    def drains(outputs, tokenizer, stop):
        outputs = list(outputs)  # reads everything the engine sends before answering
        return REF.sse_from_ids(iter(outputs), tokenizer, stop)

    assert checks.check_sse_from_ids(drains) is False
    assert "FAIL  sse_from_ids: bytes, stop '東京': stopped reading" in capsys.readouterr().out


def test_the_frames_are_what_the_server_sends():
    frames = list(REF.sse_from_ids(iter([{"token_id": 0xC3, "index": 0, "step_ms": 1.0},
                                         {"token_id": 0xA9, "index": 1, "step_ms": 1.0},
                                         {"finish_reason": "length"}]), checks.process.ByteTokenizer(), []))
    assert [json.loads(f[6:]) if "DONE" not in f else f for f in frames] == [
        {"token_id": 0xC3, "index": 0, "step_ms": 1.0, "token": ""},  # half a character: nothing yet
        {"token_id": 0xA9, "index": 1, "step_ms": 1.0, "token": "é"},
        {"finish_reason": "length"},
        "data: [DONE]\n\n",
    ]


@pytest.mark.parametrize("wrong", [
    lambda deaths, now, limit, window: True,  # restarts for ever: a crash loop never ends
    lambda deaths, now, limit, window: len(deaths) <= limit,  # forgets the window: never forgives old deaths
    lambda deaths, now, limit, window: len([t for t in deaths if now - t < window]) < limit,  # one too few
    lambda deaths, now, limit, window: len([t for t in deaths if now - t <= window]) <= limit,  # `<=` for `<`
])
def test_check_should_restart_fails_a_wrong_answer(wrong, capsys):
    assert checks.check_should_restart(wrong) is False
    assert "FAIL  should_restart" in capsys.readouterr().out
