"""A stand-in engine with fixed, known delays and no model, for hand-checkable tests and demos.

It has the interface of ``Engine`` (``generate_stream``, ``generate``, ``encode``, ``running``,
``tokens_generated``, ``config``) but sleeps instead of computing, so TTFT and gaps measured by a client
can be compared with numbers a reader can compute by hand. It does not tokenize real text: the prompt's
words become its ids and the output cycles through ``words``.
"""

from __future__ import annotations

import threading
import time

from ..config import EngineConfig, SamplingParams
from .engine import Finish, PromptTooLong, TokenEvent, collect


class FakeEngine:
    """Sleep ``prefill_ms`` for the first token and ``step_ms`` for each next one; fail at ``fail_at``.

    >>> e = FakeEngine(prefill_ms=0, step_ms=0)
    >>> e.generate("hi", SamplingParams(max_tokens=3)).text
    ' one two three'
    """

    words = ("one", "two", "three", "four", "five", "six", "seven", "eight")

    def __init__(self, prefill_ms: float = 50, step_ms: float = 20, fail_at: int | None = None,
                 config: EngineConfig | None = None):
        self.prefill_ms, self.step_ms, self.fail_at = prefill_ms, step_ms, fail_at
        self.config = config or EngineConfig(model="fake", threads=1)
        self._lock = threading.Lock()
        self.running = 0
        self.tokens_generated = 0

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        if len(prompt) > self.config.max_prompt_chars:
            raise PromptTooLong(f"prompt has {len(prompt)} characters; the limit is {self.config.max_prompt_chars}")
        ids = list(range(len(prompt.split())))
        if len(ids) > self.config.max_prompt_tokens:
            raise PromptTooLong(f"prompt is {len(ids)} tokens; the limit is {self.config.max_prompt_tokens}")
        return ids or [0]

    def encode_messages(self, messages: list[dict]) -> list[int]:
        return self.encode(" ".join(str(m.get("content", "")) for m in messages))

    def generate_stream(self, prompt, params: SamplingParams, cancel: threading.Event | None = None):
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
        return self._stream(len(ids), params, cancel or threading.Event())

    def _stream(self, n_prompt: int, params: SamplingParams, cancel: threading.Event):
        with self._lock:
            self.running += 1
        try:
            start, reason, n = time.perf_counter(), "length", 0
            for index in range(params.max_tokens):
                if index and cancel.is_set():
                    reason = "cancelled"
                    break
                delay = self.prefill_ms if index == 0 else self.step_ms
                time.sleep(delay / 1000)
                if index == self.fail_at:
                    raise RuntimeError("injected fault")
                with self._lock:
                    self.tokens_generated += 1
                n += 1
                word = self.words[index % len(self.words)]
                yield TokenEvent(" " + word, index % len(self.words), index, float(delay),
                                 float(delay) if index == 0 else None)
            total_ms = (time.perf_counter() - start) * 1000
            yield Finish(reason, {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n},
                         {"prefill_time_ms": float(self.prefill_ms), "decode_time_ms": float(self.step_ms * max(n - 1, 0)),
                          "mean_step_ms": float(self.step_ms), "total_ms": round(total_ms, 3),
                          "tokens_per_s": round(n / total_ms * 1000, 3) if total_ms else 0.0})
        finally:
            with self._lock:
                self.running -= 1

    def generate(self, prompt, params: SamplingParams):
        return collect(self.generate_stream(prompt, params))
