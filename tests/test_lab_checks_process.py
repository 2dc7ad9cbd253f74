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


# -- exercise 1 in three parts: each part's checker fails its own typical mistake --------------------
def test_new_text_and_hold_back_pass_the_reference(capsys):
    assert checks.check_new_text(REF.new_text) and checks.check_hold_back(REF.hold_back), capsys.readouterr().out


@pytest.mark.parametrize("wrong, shows", [
    (lambda tok, ids, prefix, read: (tok.decode(ids[-1:]), prefix, read), "bytes: the pieces join to"),  # one id alone
    (lambda tok, ids, prefix, read: (tok.decode(ids)[len(tok.decode(ids[:-1])):], 0, len(ids)),  # no wait
     "bytes: the pieces join to"),
])
def test_check_new_text_fails_a_wrong_answer(wrong, shows, capsys):
    assert checks.check_new_text(wrong) is False
    assert any(shows in line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL"))


@pytest.mark.parametrize("wrong", [
    lambda text, stop: (text, "", any(s in text for s in stop)),  # holds nothing back, sends the stop string
    lambda text, stop: REF.hold_back(text, stop[:1]),  # only the first stop string
    lambda text, stop: (lambda i: (text[:i], "", True) if i >= 0 else REF.hold_back(text, stop))(  # the list's
        next((text.find(s) for s in stop if s in text), -1)),  # first stop string, not the text's
])
def test_check_hold_back_fails_a_wrong_answer(wrong, capsys):
    assert checks.check_hold_back(wrong) is False
    assert "FAIL  hold_back" in capsys.readouterr().out
