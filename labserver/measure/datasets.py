"""What a load run sends: synthetic prompts of a chosen token length, as `vllm bench serve` builds them.

`random_requests` gives each request an input and an output length drawn uniformly from
`[len * (1 - range_ratio), len * (1 + range_ratio)]` (vLLM's `--random-range-ratio`; 0 = fixed lengths).
`shared_prefix_requests` gives groups of requests one common opening of `prefix_len` tokens followed by
`suffix_len` tokens of their own (SGLang's generated-shared-prefix set): what a prefix cache can reuse.

Prompts are made of the served model's tokens when a tokenizer is at hand (`client_tokenizer`: a local
folder with `tokenizer.json`, or a Hugging Face id already in the local cache), so that a prompt of 64
tokens is 64 tokens on the server; without one, of words (`input_tokens` is then unknown here and comes
from the server's `usage`). The output length is enforced with `ignore_eos` on the request (`load.py`).

    >>> [(r.input_tokens, r.output_tokens) for r in random_requests(2, 4, 3, tokenizer=None)]
    [(None, 3), (None, 3)]

Left out: data sets read from files (ShareGPT, ...), multi-turn conversations, images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point number group problem fact river music light story garden window table water paper").split()


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    input_tokens: int | None  # by the tokenizer the prompt was built with; None for word prompts
    output_tokens: int


class ClientTokenizer:
    """The few calls a data set needs, from a `tokenizers.Tokenizer` (no transformers, no torch)."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)


def client_tokenizer(name: str | None):
    """The tokenizer in a folder (or a `tokenizer.json`), or of a Hugging Face id in the local cache; None
    when there is none here (the data sets then use words)."""
    if not name:
        return None
    from tokenizers import Tokenizer

    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, "tokenizer.json", local_files_only=True))
        except Exception:  # noqa: BLE001 - not an id, not cached, or offline: words instead
            return None
    return ClientTokenizer(Tokenizer.from_file(str(path)))


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens, from a transformers-like tokenizer, ours or `ClientTokenizer`."""
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return tokenizer(text)["input_ids"]  # the fake engine's WordTokenizer adds none


def _decode(tokenizer, ids) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))


def token_text(n: int, tokenizer, rng: np.random.Generator) -> tuple[str, int | None]:
    """About `n` tokens of text and its length by `tokenizer` (random ids, decoded, re-encoded, cut to n:
    decoding and encoding again may merge or split tokens, so the count is measured, not assumed)."""
    if tokenizer is None:
        return " ".join(rng.choice(WORDS, size=n).tolist()), None
    text = ""
    for _ in range(5):  # more random text while it comes back short (special ids decode to nothing)
        ids = _encode(tokenizer, text + _decode(tokenizer, rng.integers(0, len(tokenizer), size=n).tolist()))[:n]
        text = _decode(tokenizer, ids)
        if len(ids) >= n:
            break
    return text, len(_encode(tokenizer, text))


def _lengths(n: int, mean: int, range_ratio: float, rng) -> list[int]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float = 0.0, *, tokenizer=None,
                    seed: int = 0) -> list[RequestSpec]:
    """`n` requests of random tokens, lengths fixed (`range_ratio=0`) or uniform around the means."""
    rng = np.random.default_rng(seed)
    ins, outs = _lengths(n, input_len, range_ratio, rng), _lengths(n, output_len, range_ratio, rng)
    specs = []
    for i, o in zip(ins, outs):
        text, tokens = token_text(i, tokenizer, rng)
        specs.append(RequestSpec(text, tokens, o))
    return specs


def shared_prefix_requests(n: int, prefix_len: int, suffix_len: int, output_len: int, num_prefixes: int = 1, *,
                           tokenizer=None, seed: int = 0) -> list[RequestSpec]:
    """`n` requests in `num_prefixes` groups (round robin); a group's requests open with the same prefix."""
    rng = np.random.default_rng(seed)
    prefixes = [token_text(prefix_len, tokenizer, rng) for _ in range(num_prefixes)]
    specs = []
    for i in range(n):
        prefix, p_tokens = prefixes[i % num_prefixes]
        suffix, s_tokens = token_text(suffix_len, tokenizer, rng)
        prompt = prefix + " " + suffix
        tokens = len(_encode(tokenizer, prompt)) if tokenizer is not None else None
        specs.append(RequestSpec(prompt, tokens, output_len))
    return specs


def count_tokens(tokenizer):
    """A function text -> token count with `tokenizer` (None without one): the fallback for `usage`."""
    return None if tokenizer is None else (lambda text: len(_encode(tokenizer, text)))
