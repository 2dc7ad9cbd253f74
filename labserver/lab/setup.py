"""The notebooks' engine, loaded with what it chose for this machine said once, plainly, on stdout.

The engine's loader reports its route (weights format, kernels, threads, KV pool) on stderr, where a
server's log belongs; in a notebook stderr is a red box that reads as an error. ``load_engine`` keeps
those lines and prints them as what they are: the choice made for this CPU.

    engine = load_engine()          # SmolLM2-135M-Instruct with the route measured at a first start
    engine = load_engine(prefix_caching=False)   # notebooks 1-7: every prompt is prefilled

Notebooks 1 to 7 measure what a prefill costs, again and again with the same prompt: the prefix cache
(notebook 8's subject) would answer a repeated prompt from memory, so they run without it.

Left out: any other configuration than ``EngineConfig``'s defaults and the overrides given.
"""
from __future__ import annotations

import contextlib
import io

from ..config import EngineConfig
from ..engine.engine import Engine


def load_engine(config: EngineConfig | None = None, **overrides) -> Engine:
    """``Engine.from_config`` (``config``, or ``EngineConfig(**overrides)``); its stderr report printed once
    to stdout (and shown as is on a failure)."""
    if config is not None and overrides:
        raise TypeError(f"give a config or overrides, not both: {sorted(overrides)}")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            engine = Engine.from_config(config or EngineConfig(**overrides))
    except BaseException:
        print(said.getvalue(), end="")
        raise
    lines = [line.removeprefix("labserver: ").strip() for line in said.getvalue().splitlines() if line.strip()]
    print("The engine is loaded. What it chose for this CPU (measured at its first start here, then cached):")
    for line in lines:
        print("  " + line)
    return engine
