"""Shared fixtures: the real default model (loaded once), a tiny random-weight model, a fake engine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from labserver import Engine, EngineConfig
from labserver.engine import fake


@pytest.fixture(scope="session")
def default_engine():
    """SmolLM2-135M-Instruct, the model the lab measures (converted once to the cache)."""
    return Engine.from_config(EngineConfig(threads=2))


@pytest.fixture(scope="session")
def exact_engine(default_engine):
    """The lean runner in float32 weights: equal to transformers token for token (the oracle tests)."""
    return Engine(default_engine.source, default_engine.tokenizer, EngineConfig(threads=2, quant="none"))


@pytest.fixture(scope="session")
def hf_engine(default_engine):
    """The same model and weights through transformers' own forward (the runner for non-llama models)."""
    return Engine(default_engine.model, default_engine.tokenizer, EngineConfig(threads=2, impl="transformers"))


@pytest.fixture(scope="session")
def tiny_engine(default_engine):
    """A 2-layer random-weight llama with the real tokenizer: fast, for plumbing tests only."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = default_engine.tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    return Engine(model, tok, EngineConfig(model="tiny-random", threads=2, max_prompt_tokens=400))


@pytest.fixture
def fake_engine():
    """The real engine on a ``FakeRunner``: 30 ms per prefill, 10 ms per decode step, " one two three ..."."""
    return fake.fake_engine(prefill_ms=30, step_ms=10)


@pytest.fixture
def fail_decode(monkeypatch):
    """``fail_decode(runner, at, message)``: the runner's ``at``-th decode forward (every entry one token of a
    sequence that has output already) raises RuntimeError(message)."""
    def install(runner, at: int, message: str) -> None:
        real, calls = runner.forward, {"n": 0}

        def forward(entries):
            if all(n == 1 and len(seq.tokens) > len(seq.ids) for seq, _, n, _ in entries):
                calls["n"] += 1
                if calls["n"] == at:
                    raise RuntimeError(message)
            return real(entries)

        monkeypatch.setattr(runner, "forward", forward)
    return install


MODEL_FIXTURES = {"default_engine", "exact_engine", "hf_engine", "tiny_engine"}


def pytest_collection_modifyitems(config, items):
    """A test that loads the real model is marked ``model`` however it asks for it, so ``make test-fast``
    (``-m "not model"``) leaves out exactly those."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
