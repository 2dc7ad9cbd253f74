"""LeanLlama against transformers: the same logits and greedy tokens, alone and in a batch.

Fast tests use a tiny random llama; tests marked ``model`` use SmolLM2-135M and ``model.generate``.
Tolerances: float32 routes differ from transformers only by summation order (logits within 1e-4 on the
tiny model, 2e-3 on SmolLM2 whose logits reach ~30); quantized routes are only checked to be close.
Chunks, prefixes and block tables on every route: ``test_paged_cache.py``.
"""

import resource

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labserver.model.cache import PagedKVCache, location, tables_tensor
from labserver.model.llama import LeanLlama, supports


def tiny_llama(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def hf_logits(model, ids):
    """transformers' logits for every position of ``ids``: ``[S, V]``."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def lean_logits(lean, ids, n_prompt, table=None):
    """Prefill ``ids[:n_prompt]`` then decode the rest one by one, in the blocks of ``table`` (default: the
    first blocks of the pool): logits for positions n_prompt-1 .. end."""
    table = list(range(lean.cache.blocks_for(len(ids)))) if table is None else table
    steps = [lean.prefill(ids[:n_prompt], table)]
    steps += [lean.decode([t], [p], [table])[0] for p, t in enumerate(ids[n_prompt:], n_prompt)]
    return torch.stack(steps)


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}])
def test_tiny_logits_match_transformers(rope):
    model = tiny_llama(**({"rope_parameters": rope} if rope else {}))
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    lean = LeanLlama(model, max_len=64)
    torch.testing.assert_close(lean_logits(lean, ids, 25), hf_logits(model, ids)[24:], atol=1e-4, rtol=1e-4)


# Three sequences' blocks: each in order and apart, then interleaved and out of order (blocks of 4 positions).
TABLES = {"in order": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
          "scattered": [[11, 3, 7, 0], [1, 9, 5, 10], [6, 2, 8, 4]]}


@pytest.mark.parametrize("tables", TABLES.values(), ids=list(TABLES))
def test_batched_decode_equals_each_alone(tiny, tables):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    continuations = [[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]]
    alone = [lean_logits(LeanLlama(tiny, max_len=32), p + c, len(p)) for p, c in zip(prompts, continuations)]
    lean = LeanLlama(tiny, max_len=32, block_size=4, num_blocks=12)
    batched = [[lean.prefill(p, t)] for p, t in zip(prompts, tables)]
    for step in range(4):
        logits = lean.decode([c[step] for c in continuations], [len(p) + step for p in prompts], tables)  # [3, V]
        for b in range(3):
            batched[b].append(logits[b])
    for b in range(3):
        torch.testing.assert_close(torch.stack(batched[b]), alone[b], atol=1e-5, rtol=1e-5)


def test_fp16_weights_run_close_to_float32(tiny):
    ids = list(range(1, 20))
    ref = hf_logits(tiny, ids)[9:]
    got = lean_logits(LeanLlama(tiny, quant="fp16", max_len=32), ids, 10)
    assert (got - ref).norm() / ref.norm() < 2e-3
    with pytest.raises(ValueError, match="float32"):
        LeanLlama(tiny, dtype=torch.bfloat16, quant="fp16")


def test_bfloat16_route_runs_close(tiny):
    ids = list(range(10, 30))
    ref = hf_logits(tiny, ids)[9:]
    got = lean_logits(LeanLlama(tiny, dtype=torch.bfloat16, quant="none", max_len=32), ids, 10)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() < 0.02  # bfloat16's 8 bits of mantissa, over two layers


def test_supports_only_plain_llama():
    assert supports(tiny_llama())
    assert not supports(tiny_llama(attention_bias=True))
    with pytest.raises(ValueError, match="llama"):
        LeanLlama(tiny_llama(attention_bias=True))
    with pytest.raises(ValueError, match="float32"):
        LeanLlama(tiny_llama(), dtype=torch.bfloat16, quant="w4a8")


def test_the_pool_and_its_tables():
    cache = PagedKVCache(layers=2, kv_heads=2, head_dim=16, block_size=4, num_blocks=6)
    assert cache.k.shape == cache.v.shape == (6, 2, 2, 4, 16)  # block-major: a block is one range
    assert cache.bytes_per_block == 2 * 2 * 2 * 4 * 16 * 4 and cache.bytes_per_token == cache.bytes_per_block // 4
    assert [cache.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert [location([5, 2, 0], p, 4) for p in (0, 3, 4, 9)] == [(5, 0), (5, 3), (2, 0), (0, 1)]
    assert tables_tensor([[5, 2], [1]]).tolist() == [[5, 2], [1, 0]]
    cache.check([5, 2], 8)
    with pytest.raises(ValueError, match="holds 8 positions"):
        cache.check([5, 2], 9)
    with pytest.raises(ValueError, match="block ids"):
        cache.check([6], 1)


def test_limits(tiny):
    lean = LeanLlama(tiny, max_len=8, block_size=4)
    assert lean.cache.num_blocks == 2  # by default: one sequence of max_len
    with pytest.raises(ValueError, match="exceeds"):
        lean.prefill(list(range(9)), [0, 1, 1])
    with pytest.raises(ValueError, match="holds 4 positions"):
        lean.prefill(list(range(5)), [0])
    lean.prefill(list(range(8)), [0, 1])
    with pytest.raises(ValueError, match="exceeds"):
        lean.decode([1], [8], [[0, 1]])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_memory_follows_the_blocks_written_not_the_pool(tiny):
    """A pool of 1 GiB costs nothing until written; a prompt costs about its own blocks (the pool is
    not zeroed, and what it held never matters: no route reads a position no sequence wrote)."""
    lean = LeanLlama(tiny, max_len=64, block_size=16)
    before = rss_bytes()
    lean.new_cache(num_blocks=(1 << 30) // lean.cache.bytes_per_block)
    assert rss_bytes() - before < 16 << 20
    table = [9, 500, 77]  # 48 positions for 40 tokens
    for block in table:  # garbage, also in the 8 positions past the end that no token writes
        lean.cache.k[block].fill_(float("nan")), lean.cache.v[block].fill_(float("nan"))
    ids = list(range(1, 41))
    torch.testing.assert_close(lean_logits(lean, ids, 30, table), hf_logits(tiny, ids)[29:], atol=1e-4, rtol=1e-4)
    assert rss_bytes() - before < 32 << 20


# -- the real model ---------------------------------------------------------------------------------
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "List three colors."]


@pytest.fixture(scope="module")
def lean_default(default_engine):
    return LeanLlama(default_engine.model, max_len=256, num_blocks=3 * 16)  # three sequences of 256


@pytest.mark.model
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers_generate(default_engine, lean_default, prompt):
    ids = default_engine.encode(prompt)
    with torch.inference_mode():
        expected = default_engine.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    expected = expected[0, len(ids):].tolist()
    table = list(range(16))
    logits, got = lean_default.prefill(ids, table), []
    for p in range(len(ids), len(ids) + len(expected)):
        got.append(int(logits.argmax()))
        logits = lean_default.decode([got[-1]], [p], [table])[0]
    assert got == expected


@pytest.mark.model
def test_logits_close_to_transformers(default_engine, lean_default):
    ids = default_engine.encode(PROMPTS[0]) + [504, 4553, 282, 260, 4918, 28]
    n = len(ids) - 6
    expected = hf_logits(default_engine.model, ids)[n - 1:]
    torch.testing.assert_close(lean_logits(lean_default, ids, n), expected, atol=2e-3, rtol=1e-3)


@pytest.mark.model
def test_batched_decode_equals_each_alone_on_the_default_model(default_engine, lean_default):
    prompts = [default_engine.encode(p) for p in PROMPTS]  # three different lengths
    tables = [list(range(16 * b, 16 * b + 16)) for b in range(3)]
    alone = []
    for p in prompts:
        logits, toks = lean_default.prefill(p, tables[0]), []
        for step in range(6):
            toks.append(int(logits.argmax()))
            logits = lean_default.decode([toks[-1]], [len(p) + step], tables[:1])[0]
        alone.append(toks)
    logits = lean_default.prefill_many(prompts, tables)
    batched = [[] for _ in prompts]
    for step in range(6):
        toks = logits.argmax(-1).tolist()
        for b, t in enumerate(toks):
            batched[b].append(t)
        logits = lean_default.decode(toks, [len(p) + step for p in prompts], tables)
    assert batched == alone


def test_weight_bytes_counts_what_a_step_reads(tiny):
    """Every matrix and norm once, plus one embedding row: in float32, then with float16 matrices."""
    named = dict(tiny.named_parameters())
    params = sum(p.numel() for n, p in named.items() if "embed" not in n)
    norms = sum(p.numel() for n, p in named.items() if "norm" in n)
    row = tiny.config.hidden_size
    assert "lm_head.weight" in named
    assert LeanLlama(tiny, max_len=8).weight_bytes() == 4 * (params + row)
    assert LeanLlama(tiny, quant="fp16", max_len=8).weight_bytes() == 2 * (params - norms) + 4 * (norms + row)
