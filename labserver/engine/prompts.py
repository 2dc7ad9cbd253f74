"""Prompts into token ids, within the limits: what an engine and an API process in front of one share.

``PromptEncoder`` needs only ``config`` (the limits), ``tokenizer`` and ``context_len``, so the ``Engine``
(which has the model) and an engine process's ``Frontend`` (which has only the tokenizer) refuse a prompt
with the same code and the same message, before any work.

Left out: the model, and any decoding (``output.py`` makes text).
"""

from __future__ import annotations


class PromptTooLong(ValueError):
    """The prompt does not fit the engine's limits or the model's context."""


class PromptEncoder:
    """``encode`` a prompt (in the chat template when the model has one) or ``encode_messages`` a chat."""

    config = None  # an EngineConfig: max_prompt_chars, max_prompt_tokens, chat_template
    tokenizer = None
    context_len: int = 0

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids for ``prompt``, inside the chat template when the model has one (and ``chat``)."""
        if len(prompt) > self.config.max_prompt_chars:
            raise PromptTooLong(f"prompt has {len(prompt)} characters; the limit is {self.config.max_prompt_chars}")
        chat = self.config.chat_template if chat is None else chat
        if chat and getattr(self.tokenizer, "chat_template", None):
            return self.encode_messages([{"role": "user", "content": prompt}])
        return self.checked(self.tokenizer(prompt)["input_ids"])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids for a chat (``[{"role": ..., "content": ...}]``) through the model's chat template."""
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        if chars > self.config.max_prompt_chars:
            raise PromptTooLong(f"messages have {chars} characters; the limit is {self.config.max_prompt_chars}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return self.checked(ids if isinstance(ids, list) else ids["input_ids"])

    def checked(self, ids) -> list[int]:
        """``ids`` as a list, or ``PromptTooLong`` / ``ValueError`` when they do not fit or are empty."""
        limit = min(self.config.max_prompt_tokens, self.context_len - 1)
        if len(ids) > limit:
            raise PromptTooLong(f"prompt is {len(ids)} tokens; the limit is {limit}")
        if not ids:
            raise ValueError("prompt encodes to no tokens")
        return list(ids)
