"""Incremental detokenization: the text each new token adds, so a stream can be shown as it grows.

Decoding one token at a time (``tokenizer.decode([id])``) is wrong in two ways: a multi-byte character
split across tokens decodes to U+FFFD halves, and tokenizers that choose spaces from neighbours (e.g.
SentencePiece's leading ``▁``) drop or add spaces. The prefix/read-offset method (used by TGI and vLLM)
instead decodes a short window of recent tokens twice and emits the difference, holding text back while
it still ends in an incomplete character.

Invariant: the concatenation of everything ``step`` and ``flush`` return equals
``tokenizer.decode(all_ids, skip_special_tokens=True)`` for ordinary tokenizers. This module does not
handle stop strings or text-level post-processing (``clean_up_tokenization_spaces``).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one by one; get back the text each one completes ("" while a character is pending).

    A worked example with a byte-level tokenizer, where "é" is two tokens (bytes C3 and A9)::

        step(id("caf")) -> "caf"
        step(id(C3))    -> ""        # decode ends in U+FFFD: wait
        step(id(A9))    -> "é"       # the window now decodes to a whole character
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end); call once at the end."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    @property
    def pending(self) -> bool:
        return self.read_offset < len(self.ids)
