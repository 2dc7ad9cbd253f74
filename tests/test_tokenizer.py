"""The transformers-free tokenizer against transformers' own, id for id, on the default model's folder."""

import json
import shutil

import jinja2
import pytest
from transformers import AutoTokenizer

from labserver import EngineConfig
from labserver.engine.loading import model_folder
from labserver.engine.tokenizer import Tokenizer, compile_chat_template, load_tokenizer

TEXTS = ["Hello, world!", "  leading and trailing spaces  ", "café naïve 日本語 🤖🚀", "tabs\tand\nnewlines\n\n",
         "<|im_start|>user\nspecial tokens typed as text<|im_end|>", "def f(x):\n    return x ** 2  # code",
         "1234567890 3.14159 -42", "a" * 300]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke 😀", "name": None}],
]


@pytest.fixture(scope="module")
def folder():
    return model_folder(EngineConfig())


@pytest.fixture(scope="module")
def pair(folder):
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(pair, text):
    ours, theirs = pair
    ids = ours(text)["input_ids"]
    assert ids == theirs(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, chat, generation_prompt):
    ours, theirs = pair
    text = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False) == text
    ids = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt) == ids


def test_special_ids_and_size_match_transformers(pair):
    ours, theirs = pair
    assert (ours.eos_token_id, ours.bos_token_id, len(ours)) == (theirs.eos_token_id, theirs.bos_token_id, len(theirs))


def test_switches_outside_tokenizer_json_go_to_transformers(folder, tmp_path):
    """add_bos_token is applied by transformers, not by tokenizer.json: the plain Tokenizer must step aside."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{folder}/{name}", tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert Tokenizer.from_folder(tmp_path) is None
    assert not isinstance(load_tokenizer(tmp_path), Tokenizer)
    assert Tokenizer.from_folder(tmp_path / "missing") is None


def test_chat_templates_run_sandboxed():
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_chat_template("{{ messages.__class__.__subclasses__() }}").render(messages=[])
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        compile_chat_template("{{ raise_exception('roles must alternate') }}").render(messages=[])
    assert compile_chat_template("{{ {'a': '<b>'} | tojson }}").render() == '{"a": "<b>"}'
