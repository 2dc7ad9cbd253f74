"""The streamed text must equal the decoded text, also when characters span several tokens."""

import pytest

from labserver.engine.detokenize import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The answer is 42.",
    "Café crème, naïve façade, Ærøskøbing.",
    "日本語のテキストと中文字符。",
    "Emoji: 🎉🌊👩‍👩‍👧 and 🤖 done",
    "  leading spaces,\ttabs\nand newlines\n\n",
]


def stream_text(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.step(i) for i in ids]
    return pieces, "".join(pieces) + detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_concatenation_equals_decode(default_engine, text):
    tok = default_engine.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces, joined = stream_text(tok, ids)
    assert joined == tok.decode(ids, skip_special_tokens=True)
    assert joined == text


def test_split_characters_are_held_back(default_engine):
    tok = default_engine.tokenizer
    ids = tok("🎉🌊", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2, "the emoji should span several byte tokens for this test to mean anything"
    pieces, joined = stream_text(tok, ids)
    assert "" in pieces and all("\ufffd" not in p for p in pieces)
    # Decoding token by token, the mistake this module exists to avoid, shows broken characters.
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)


def test_flush_emits_an_incomplete_tail(default_engine):
    tok = default_engine.tokenizer
    ids = tok("ok 🎉", add_special_tokens=False)["input_ids"][:-1]  # cut inside the emoji
    pieces, joined = stream_text(tok, ids)
    assert joined == tok.decode(ids)
    assert joined.endswith("\ufffd") and not "".join(pieces).endswith("\ufffd")


def test_special_tokens_are_skipped(default_engine):
    tok = default_engine.tokenizer
    ids = tok("Hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stream_text(tok, ids)[1] == "Hi"
