"""Stop strings applied to streamed text, since the engine knows only token ids and its end-of-sequence.

The output ends just before the first occurrence of any stop string. While text arrives piece by piece, a
tail that could still grow into a stop string is held back until it is decided, so a client never
receives text that turns out to belong to a stop string. Left out: stop token ids and regexes.
"""

from __future__ import annotations


class StopMatcher:
    """Cuts text at the first stop string, holding back a tail that could still become one.

    >>> m = StopMatcher(["\\n\\n"])
    >>> m.feed("Hi\\n"), m.feed("\\nThere")
    (('Hi', False), ('', True))
    """

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
