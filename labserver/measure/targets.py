"""A server to measure, as the benches see it: its URL, its protocol, how a prompt is sent to it, and the
traces it gave; with the request fields that make our server and llama-server answer alike.

Left out: starting or stopping the server (``background.py``, ``peer.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .client import run_concurrent, stream_generate
from .trace import Trace

PEER_EXTRA = {"ignore_eos": True, "cache_prompt": False}
# Both servers are asked for exactly max_tokens: the answers never end early.
OURS_EXTRA = {"ignore_eos": True}


@dataclass
class Target:
    name: str
    url: str
    protocol: object
    encode: Callable  # prompt text -> the body's "prompt"
    extra: dict
    single: list = field(default_factory=list)   # 1-stream traces, all rounds
    rounds: list = field(default_factory=list)   # per round: the traces of STREAMS concurrent streams

    def one(self, text: str, max_tokens: int) -> Trace:
        return stream_generate(self.url, self.encode(text), max_tokens, 0.0, protocol=self.protocol, **self.extra)

    def many(self, texts: list[str], max_tokens: int) -> list[Trace]:
        return run_concurrent(self.url, [self.encode(t) for t in texts], max_tokens=max_tokens, temperature=0.0,
                              protocol=self.protocol, **self.extra)
