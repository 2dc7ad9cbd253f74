"""A tokenizer read straight from ``tokenizer.json`` with ``tokenizers``, chat templates rendered with jinja2.

Importing transformers costs seconds before a server can answer anything, and a serving engine needs
only five things from a tokenizer: encode a prompt, render a chat through the model's template, decode,
the EOS id, and the vocabulary size. ``Tokenizer`` does those the way transformers does them: encoding
runs ``tokenizer.json``'s own pipeline (its post-processor adds any BOS), the chat template renders in a
sandboxed jinja2 environment with the same options and helpers, and its text is then encoded without
special tokens. Tests check it against ``AutoTokenizer`` id for id.

Left out on purpose: tokenizers whose behaviour lives outside ``tokenizer.json`` (``add_bos_token`` /
``add_eos_token`` or ``clean_up_tokenization_spaces`` switched on in ``tokenizer_config.json``, slow
SentencePiece-only tokenizers, several named chat templates), tools and documents in chat templates,
padding, truncation and batching. ``load_tokenizer`` hands all of those to transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer_config.json switches that change what transformers' tokenizer does beyond tokenizer.json.
UNSUPPORTED_SWITCHES = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def compile_chat_template(source: str):
    """The template in the environment transformers renders chat templates in (templates are untrusted)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class Tokenizer:
    """The tokenizer calls the engine makes, with the signatures transformers' tokenizers have."""

    def __init__(self, backend, special_tokens: dict[str, str], chat_template: str | None):
        self.backend = backend  # a tokenizers.Tokenizer
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self._template = None

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer | None":
        """The tokenizer in ``folder``, or None when only transformers can reproduce it (see module doc)."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            return None
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if any(config.get(switch) for switch in UNSUPPORTED_SWITCHES):
            return None
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if template is not None and not isinstance(template, str):
            return None  # several named templates: transformers picks among them
        special = {name: _content(config[name]) for name in SPECIAL_TOKENS if config.get(name)}
        return cls(Backend.from_file(str(folder / "tokenizer.json")), special, template)

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True):
        """The chat rendered by the model's template; its token ids unless ``tokenize=False``."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        # Keys set to None are dropped, as transformers does: templates test for a key, not for None.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)
        # The template writes the special tokens itself, as transformers assumes.
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(folder):
    """``Tokenizer`` when it reproduces the folder's tokenizer, else transformers' ``AutoTokenizer``."""
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer
