"""The output processor: the one place where the engine's token ids become the text a client receives.

The engine core emits ``TokenOutput``s (ids, positions, step times) and a ``Finish``; it never makes text,
wherever it runs: in ``Engine.steps`` for scripts and the lab's variants, on the engine core's thread, or
in the engine process behind ZMQ. Every backend feeds its request's outputs through one
``OutputProcessor`` (vLLM V1's ``OutputProcessor``/``RequestState``), which

- runs the incremental detokenizer (``detokenize.py``) over the ids as they arrive; the last token a
  request may have (``max_new_tokens``) also carries the detokenizer's flush, and an end-of-sequence
  token never arrives (the engine ends the sequence without an output), so nothing is flushed for it;
- holds the events of a stream until ``interval`` tokens are ready (vLLM's ``--stream-interval``): the
  first token goes at once, the last with the ``Finish``, the others in groups, so the host work that
  is paid per send (a wake-up of the event loop, a frame, a socket write) is paid once per group.

    >>> from labserver.engine.fake import WordTokenizer
    >>> out = OutputProcessor(WordTokenizer(), max_tokens=3, interval=2)
    >>> [e.token for e in out.add(TokenOutput(0, 0, 5.0, 5.0))]  # the first token: at once
    [' one']
    >>> out.add(TokenOutput(1, 1, 2.0))  # held: one token of two
    []
    >>> [e.token for e in out.add(TokenOutput(2, 2, 2.0))]
    [' two', ' three']

Left out: stop strings (the OpenAI wire format applies them to this text, ``serve/openai_api.py``),
logprobs, and several sequences per request (``n > 1``).
"""

from __future__ import annotations

from .detokenize import IncrementalDetokenizer
from .sequence import Finish, TokenEvent, TokenOutput


class OutputProcessor:
    """One request's outputs made into ``TokenEvent``s with text, released every ``interval`` tokens.

    ``max_tokens`` is the request's cap after its prompt (``sequence.max_new_tokens``): the output at
    index ``max_tokens - 1`` is the last, and carries any text the detokenizer still holds.
    """

    def __init__(self, tokenizer, max_tokens: int, interval: int = 1):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.detok = IncrementalDetokenizer(tokenizer)
        self.last_index, self.interval = max_tokens - 1, interval
        self.held: list = []  # events made but not yet released
        self.tokens = 0  # token events released so far

    def event(self, out: TokenOutput) -> TokenEvent:
        """The ``TokenEvent`` of one output: the text this token adds."""
        text = self.detok.step(out.token_id) + (self.detok.flush() if out.index == self.last_index else "")
        return TokenEvent(text, out.token_id, out.index, out.step_ms, out.prefill_time_ms, out.batch)

    def add(self, item: TokenOutput | Finish) -> list:
        """Take one engine output; return the events to send now (often none while ``interval`` > 1)."""
        self.held.append(self.event(item) if isinstance(item, TokenOutput) else item)
        return self.release() if self.due(item) else []

    def due(self, item) -> bool:
        if isinstance(item, Finish) or self.tokens == 0:
            return True
        return len(self.held) >= self.interval

    def release(self) -> list:
        """Every held event, now (a group, or what is left when the request ends)."""
        out, self.held = self.held, []
        self.tokens += sum(isinstance(e, TokenEvent) for e in out)
        return out
