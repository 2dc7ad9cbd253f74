"""What an API process needs of an engine that runs in another process: its tokenizer and its limits.

The routes and the pipeline ask an "engine" for ``config``, ``context_len``, ``route``, ``running``,
``encode`` and ``encode_messages``, never for the model. ``Frontend`` answers exactly those, without the
weights: the tokenizer alone (a ``tokenizers`` file, or the fake's ``WordTokenizer``), the limits of the
config, and what the engine process reported when it started (its context length and weight format).
It is a ``PromptEncoder``, as ``Engine`` is, so a prompt too long is refused by the same code, with the
same message, in either design.

``spec`` says how the engine process builds the engine; ``address`` is set when an engine process
already runs (started by ``api_servers`` for several API processes), and ``None`` when each backend
made from this frontend starts its own. Left out: the engine's phases (``begin``, ``decode_step``...):
they run in the engine process only.
"""

from __future__ import annotations

from ...engine.prompts import PromptEncoder
from .core_proc import EngineSpec


class Frontend(PromptEncoder):

    def __init__(self, spec: EngineSpec, tokenizer, context_len: int, route: dict, address: str | None = None):
        self.spec, self.config, self.tokenizer = spec, spec.config, tokenizer
        self.context_len, self.route, self.address = context_len, route, address
        self.client = None  # the engine client serving through this frontend now (for ``running``)

    @classmethod
    def of(cls, engine) -> "Frontend":
        """``engine`` itself if it is a frontend; otherwise one for a loaded ``Engine`` (its tokenizer,
        limits and route), whose engine process will build the same engine from its spec."""
        if isinstance(engine, Frontend):
            return engine
        return cls(EngineSpec.of(engine), engine.tokenizer, engine.context_len, engine.route)

    @classmethod
    def for_engine_process(cls, spec: EngineSpec, info: dict, address: str) -> "Frontend":
        """A frontend for the engine process that already runs at ``address`` and reported ``info``."""
        return cls(spec, spec.tokenizer(), info["context_len"], info["route"], address)

    @property
    def running(self) -> int:
        """Sequences the engine process is running, as it last reported them."""
        return self.client.running if self.client is not None else 0
