"""`Trace`: one request as the client saw it, with the metrics `vllm bench serve` names TTFT, ITL, TPOT, E2E.

A Trace holds what a user sees (when each output event arrived, `time.perf_counter`, ms since the
request was sent) next to what the server says it spent (`step_ms`, `prefill_time_ms`). An event is one
SSE chunk: labserver sends one per token, other servers may pack several tokens into one. So, as in
`vllm bench serve`, ITL is the gap between chunks, while the token count (and with it TPOT and tokens/s)
comes from the server's `usage.completion_tokens`, else from `counted_tokens` (a tokenizer's count of the
text, filled in by the caller), else from the number of chunks.

    >>> t = Trace(arrival_ms=[100.0, 130.0, 170.0], tokens=["a", "b", "c"])
    >>> t.ttft_ms, t.itl_ms, t.tpot_ms, t.e2e_ms
    (100.0, [30.0, 40.0], 35.0, 170.0)
    >>> packed = Trace(arrival_ms=[100.0, 170.0], tokens=["a b c", "d e"], usage={"completion_tokens": 5})
    >>> packed.n_tokens, packed.output_tokens, packed.itl_ms, packed.tpot_ms
    (2, 5, [70.0], 17.5)

Left out: statistics over many traces (`stats.py`) and how a trace is recorded (`client.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocols import Parsed


@dataclass
class Trace:
    prompt: str = ""
    stream: bool = True
    sent_s: float = 0.0                     # perf_counter() when sent: lines a Trace up with a HealthProbe
    arrival_ms: list[float] = field(default_factory=list)   # per token event, ms after sent_s
    tokens: list[str] = field(default_factory=list)
    token_ids: list[int | None] = field(default_factory=list)
    step_ms: list[float | None] = field(default_factory=list)  # server compute per token; [0] is the prefill
    batch: list[int | None] = field(default_factory=list)  # per token: sequences in its step, if the server says
    prefill_time_ms: float | None = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    error: dict | None = None
    text: str = ""
    done_ms: float | None = None            # response fully read ([DONE] or the JSON body)
    closed_early: bool = False              # the client hung up (stop_after)
    counted_tokens: int | None = None       # the output's tokens by a tokenizer, when the server sends no usage

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def n_tokens(self) -> int:
        """Output events received (chunks): tokens only on a server that sends one token per chunk."""
        return len(self.arrival_ms)

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the server's usage count, else the tokenizer's count, else the chunks."""
        usage = (self.usage or {}).get("completion_tokens")
        if isinstance(usage, int):
            return usage
        return self.counted_tokens if self.counted_tokens is not None else self.n_tokens

    @property
    def ttft_ms(self) -> float | None:
        return self.arrival_ms[0] if self.arrival_ms else None

    @property
    def e2e_ms(self) -> float | None:
        # Last *token* event, so that TPOT is exactly the mean ITL.
        return self.arrival_ms[-1] if self.arrival_ms else None

    @property
    def itl_ms(self) -> list[float]:
        return [b - a for a, b in zip(self.arrival_ms, self.arrival_ms[1:])]

    @property
    def tpot_ms(self) -> float | None:
        n = self.output_tokens
        return (self.e2e_ms - self.ttft_ms) / (n - 1) if n > 1 and self.n_tokens else None

    @property
    def tokens_per_s(self) -> float | None:
        return 1000.0 * self.output_tokens / self.e2e_ms if self.e2e_ms else None

    @property
    def decode_step_ms(self) -> list[float]:
        return [s for s in self.step_ms[1:] if s is not None]

    def _add(self, parsed: Parsed, t_ms: float) -> None:
        for chunk in parsed.tokens:
            self.arrival_ms.append(t_ms)
            self.tokens.append(chunk.text)
            self.token_ids.append(chunk.token_id)
            self.step_ms.append(chunk.step_ms)
            self.batch.append(chunk.batch)
            if chunk.prefill_time_ms is not None:
                self.prefill_time_ms = chunk.prefill_time_ms
        for key, value in parsed.finish.items():
            setattr(self, key, value)
        self.error = parsed.error or self.error
