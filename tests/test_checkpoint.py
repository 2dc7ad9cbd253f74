"""Serving without transformers: memory-mapped safetensors, native rotary tables, and a cold server path
that never imports transformers, with the same tokens as the transformers-built engine."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from labserver import Engine, EngineConfig, SamplingParams
from labserver.model.checkpoint import Checkpoint, read_safetensors
from labserver.model.llama import LeanLlama, rope_tables, supports
from labserver.engine.loading import load_for_serving
from labserver.engine.tokenizer import Tokenizer

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_llama(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def test_read_safetensors_equals_safetensors_load_file(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "i64": torch.arange(4),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours, theirs = read_safetensors(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name])


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, LLAMA3])
def test_rope_tables_equal_transformers(rope):
    model = tiny_llama(**({"rope_parameters": rope} if rope else {}))
    positions = torch.arange(200)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    ours = rope_tables(model.config, 16, 200)
    torch.testing.assert_close(ours[0], cos[0], atol=0, rtol=0)
    torch.testing.assert_close(ours[1], sin[0], atol=0, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_builds_the_same_lean_model(tmp_path, tied):
    model = tiny_llama(tie_word_embeddings=tied, rope_parameters=LLAMA3)
    model.save_pretrained(tmp_path)
    checkpoint = Checkpoint(tmp_path)
    assert supports(checkpoint) and checkpoint.config.num_hidden_layers == 2
    ids = list(range(3, 40, 3))
    from_ckpt, from_hf = LeanLlama(checkpoint, max_len=64), LeanLlama(model, max_len=64)
    table = list(range(from_ckpt.cache.blocks_for(len(ids) + 1)))
    assert torch.equal(from_ckpt.prefill(ids, table), from_hf.prefill(ids, table))
    assert torch.equal(from_ckpt.decode([7], [len(ids)], [table]), from_hf.decode([7], [len(ids)], [table]))
    # The transformers model is still there on demand, with the same weights.
    assert torch.equal(checkpoint.hf_model().lm_head.weight, model.lm_head.weight)


def test_old_style_rope_config_is_read(tmp_path):
    """Folders saved by transformers 4 write rope_theta and rope_scaling at the top level."""
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=500000.0, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = rope_tables(Checkpoint(tmp_path).config, 16, 100)
    torch.testing.assert_close(ours[0], rope_tables(LlamaConfig(rope_parameters=LLAMA3), 16, 100)[0], atol=0, rtol=0)
    config["rope_scaling"] = {"type": "yarn", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not supports(Checkpoint(tmp_path))  # a rope the lean runner lacks stays on transformers


def test_default_model_is_served_from_the_checkpoint(default_engine):
    source, tokenizer = load_for_serving(EngineConfig())
    assert isinstance(source, Checkpoint) and isinstance(tokenizer, Tokenizer)
    assert type(default_engine.source) is Checkpoint and default_engine.runner.name == "lean-q4_1+q8_0"
    source, tokenizer = load_for_serving(EngineConfig(impl="transformers"))
    assert type(source).__name__ == "LlamaForCausalLM"


@pytest.mark.model
def test_a_cold_engine_never_imports_transformers(default_engine):
    """The whole serving path (load, encode, generate, detokenize) runs without transformers,
    and gives the tokens of the engine built through transformers."""
    params = SamplingParams(max_tokens=16, temperature=0.0)
    hf_built = Engine(default_engine.model, default_engine.tokenizer, EngineConfig(threads=2))
    assert hf_built.runner.name == default_engine.runner.name
    expected = hf_built.generate("Name a colour.", params).token_ids
    code = ("import sys, json\nfrom labserver import Engine, EngineConfig, SamplingParams\n"
            "e = Engine.from_config(EngineConfig(threads=2))\n"
            "out = e.generate('Name a colour.', SamplingParams(max_tokens=16, temperature=0.0))\n"
            "print(json.dumps([out.token_ids, sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    ids, imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert imported == [] and ids == expected
