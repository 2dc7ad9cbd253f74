"""Text from token ids, in the API process: what vLLM's ``OutputProcessor`` does with each engine output.

The engine process sends only ids and numbers (``zmq_frames.Token``, ``zmq_frames.End``). For each
request, ``RequestState`` runs this process's own incremental detokenizer over the ids as they arrive and
builds the same ``TokenEvent``s and ``Finish`` the engine thread hands out, so everything above the
backend (the pipeline, stop strings, both wire formats) cannot tell the two designs apart:

- the text of a token is what ``IncrementalDetokenizer.step`` gives, and the last token (index
  ``max_tokens - 1``, with ``max_tokens`` capped by the context as ``Engine.begin`` caps it) also carries
  the flush, as ``Sequence.append`` does;
- an end-of-sequence token never arrives (the engine ends the sequence without an event), so nothing is
  flushed for it, as on the engine thread;
- an ``End`` is a ``Finish`` then ``DONE``, ``DONE`` alone (cancelled), or the engine's error, re-raised
  here as the same exception class when the API process knows it (else ``RuntimeError``, same message).

Left out: stop strings (the wire format applies them to this text) and logprobs.
"""

from __future__ import annotations

from typing import Any, Callable

from ...engine.detokenize import IncrementalDetokenizer
from ...engine.engine import PromptTooLong
from ...engine.sequence import Finish, TokenEvent
from . import messages as frames
from ...engine.core import DONE
from ...engine.protocols import EngineDeadError

ERRORS = {"PromptTooLong": PromptTooLong, "ValueError": ValueError, "EngineDeadError": EngineDeadError}


class RequestState:
    """One request's text, made here from the ids the engine sends (vLLM's ``RequestState``)."""

    def __init__(self, rid: int, sink: Callable[[Any], None], tokenizer, max_tokens: int):
        self.rid, self.sink = rid, sink
        self.detok = IncrementalDetokenizer(tokenizer)
        self.last_index = max_tokens - 1
        self.taken = 0  # events the reader has taken (told to the engine every ACK_EVERY)

    def took(self) -> frames.Taken | None:
        """Count one event read; every ``ACK_EVERY`` the message that tells the engine."""
        self.taken += 1
        return frames.Taken(self.rid, self.taken) if self.taken % frames.ACK_EVERY == 0 else None

    def token(self, t: frames.Token) -> TokenEvent:
        text = self.detok.step(t.token_id) + (self.detok.flush() if t.index == self.last_index else "")
        return TokenEvent(text, t.token_id, t.index, t.step_ms, t.prefill_time_ms, t.batch)

    def end(self, e: frames.End) -> list:
        if e.error_type is not None:
            return [ERRORS.get(e.error_type, RuntimeError)(e.error)]
        if e.finish_reason is not None:
            return [Finish(e.finish_reason, e.usage, e.timings), DONE]
        return [DONE]  # cancelled: no Finish, as on the engine thread
