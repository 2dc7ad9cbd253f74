"""The C kernels and GGUF blocks: exact products, lossless-only quantization, the fused decode step.

A matrix is put on the Q4_1 (or Q8_0) grid first (quantize, dequantize), as the default model's weights
are; products then equal float32 ones up to summation order. Tests marked ``model`` check the served
default against the float32 lean route on SmolLM2-135M.
"""


import pytest
import torch

from labserver.model import blocks as blockquant, kernels
from labserver.model import toolchain
from labserver.config import EngineConfig, SamplingParams
from labserver.engine.engine import Engine
from labserver.model.llama import Fp16, LeanLlama
from tests.test_lean_llama import lean_logits, tiny_llama


def on_grid(w, kind="q4_1"):
    """``w`` moved onto the block grid: what a GGUF file's dequantized weights look like."""
    if kind == "q4_1":
        return blockquant.dequantize_q4_1(*blockquant.quantize_q4_1(w)[0])
    return blockquant.dequantize_q8_0(*blockquant.quantize_q8_0(w)[0])


def test_the_kernels_build_here():
    assert kernels.available() == (True, "")
    assert toolchain.build() == toolchain.build()  # cached: the second call compiles nothing


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 13, 20])
@pytest.mark.parametrize("n", [96, 40])  # 96: three panels of 32 (used from 5 rows on); 40: no panels
def test_block_products_equal_float32_ones(kind, rows, n):
    g = torch.Generator().manual_seed(rows)
    w = on_grid(torch.randn(n, 64, generator=g) * 0.05, kind)
    matrix = blockquant.lossless(w, kind)
    assert type(matrix).__name__ == kind.upper()
    x, r = torch.randn(rows, 64, generator=g), torch.randn(rows, n, generator=g)
    torch.testing.assert_close(matrix(x), x @ w.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(matrix.add(r.clone(), x), r + x @ w.T, rtol=0, atol=1e-5)


def test_only_weights_on_the_grid_become_blocks():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    assert blockquant.lossless(w, "q4_1") is None and blockquant.lossless(w, "q8_0") is None
    assert blockquant.lossless(on_grid(w), "q4_1") is not None
    assert blockquant.lossless(on_grid(w)[:, :48], "q4_1") is None  # 48 inputs: not whole blocks
    assert blockquant.lossless(on_grid(w, "q8_0"), "q8_0").nbytes == 8 * 64 + 8 * 2 * 4


def grid_llama(**overrides):
    """A tiny llama whose matrices sit on the Q4_1 grid and whose output matrix on the Q8_0 one."""
    model = tiny_llama(**overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(on_grid(p))
        model.lm_head.weight.copy_(on_grid(model.lm_head.weight, "q8_0"))
    return model


@pytest.fixture(scope="module")
def grid():
    return grid_llama(tie_word_embeddings=False)


def test_block_llama_equals_float32_and_decodes_in_one_call(grid):
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    blocks = LeanLlama(grid, quant="q4_1", max_len=32)
    assert blocks.formats() == ["q4_1", "q8_0"] and blocks.fused is not None
    ref = lean_logits(LeanLlama(grid, max_len=32), ids, 6)
    torch.testing.assert_close(lean_logits(blocks, ids, 6), ref, rtol=0, atol=1e-4)
    blocks.FUSED_PREFILL_MAX = 4  # a long prompt's path: consecutive C calls, each continuing the last
    torch.testing.assert_close(lean_logits(blocks, ids, 6), ref, rtol=0, atol=1e-4)
    blocks.fused = None  # the torch route: torch's attention around the block products
    torch.testing.assert_close(lean_logits(blocks, ids, 6), ref, rtol=0, atol=1e-4)


def test_fused_step_equals_the_torch_step_in_a_batch(grid):
    """Three sequences at different lengths, in scattered blocks: the fused step matches the torch one."""
    lean = LeanLlama(grid, quant="q4_1", max_len=32, block_size=4, num_blocks=12)
    lean.cache.k.zero_(), lean.cache.v.zero_()  # the pools are compared whole below
    g = torch.Generator().manual_seed(2)
    tables, lengths = [[2, 9, 4], [0, 7, 11], [5, 1, 10]], [3, 9, 5]
    for table, n in zip(tables, lengths):
        lean.prefill(torch.randint(0, 256, (n,), generator=g).tolist(), table)
    k, v = lean.cache.k.clone(), lean.cache.v.clone()
    fused = lean.decode([7, 8, 9], lengths, tables)
    fused_cache = lean.cache.k.clone()
    lean.cache.k, lean.cache.v, lean.fused = k, v, None
    torch.testing.assert_close(fused, lean.decode([7, 8, 9], lengths, tables), rtol=0, atol=1e-4)
    torch.testing.assert_close(fused_cache, lean.cache.k, rtol=0, atol=1e-5)


def test_matrices_off_the_grid_stay_in_float16():
    lean = LeanLlama(tiny_llama(), quant="q4_1", max_len=8)  # random weights: no block reproduces them
    assert lean.formats() == ["fp16"] and lean.fused is None
    assert all(isinstance(p["qkv"], Fp16) for p in lean.layers)


def test_auto_takes_a_torch_route_without_a_compiler(default_engine, monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: (False, "no C compiler (cc or gcc) on PATH"))
    config = EngineConfig(threads=2, max_batch=1)
    route = Engine(default_engine.source, default_engine.tokenizer, config).route
    assert route["quant"] in ("fp16", "none") and "no C compiler" in route["excluded"]["q4_1"]


@pytest.mark.model
def test_default_model_is_all_blocks_and_its_logits_are_float32s(default_engine, exact_engine):
    lean = default_engine.runner.lean
    assert lean.fused is not None and lean.weight_bytes() < exact_engine.runner.lean.weight_bytes() / 4.5
    params = SamplingParams(max_tokens=1, temperature=0)
    a, b = default_engine.begin("Why is the sky blue?", params), exact_engine.begin("Why is the sky blue?", params)
    try:
        got, ref = default_engine.forward([(a, a.remaining)])[0], exact_engine.forward([(b, b.remaining)])[0]
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-3)  # logits reach ~30: summation order only
        a.tokens.append(int(ref.argmax())), b.tokens.append(int(ref.argmax()))
        torch.testing.assert_close(default_engine.forward([(a, 1)]), exact_engine.forward([(b, 1)]), rtol=0, atol=2e-3)
    finally:
        default_engine.end(a), exact_engine.end(b)


@pytest.mark.model
def test_batched_block_decoding_equals_each_sequence_alone(default_engine):
    prompts = ["Write a haiku about the sea.", "List three uses of a paperclip.", "Why is the sky blue?"]
    params = SamplingParams(max_tokens=12, temperature=0)
    alone = [default_engine.generate(p, params).token_ids for p in prompts]
    seqs = [default_engine.begin(p, params) for p in prompts]
    out = [[] for _ in prompts]
    try:
        for i, s in enumerate(seqs):
            out[i].append(int(default_engine.forward([(s, s.remaining)])[0].argmax()))
            s.tokens.append(out[i][-1])
        for _ in range(11):
            for i, (s, logits) in enumerate(zip(seqs, default_engine.forward([(s, 1) for s in seqs]))):
                out[i].append(int(logits.argmax()))
                s.tokens.append(out[i][-1])
    finally:
        for s in seqs:
            default_engine.end(s)
    assert [o[:len(a)] for o, a in zip(out, alone)] == alone


def test_blocks_are_kept_for_the_next_start(grid, tmp_path):
    path = tmp_path / "blocks.safetensors"
    ids = [5, 17, 99, 3, 42, 7]
    first = LeanLlama(grid, quant="q4_1", max_len=16, blocks_file=path)
    assert path.is_file()
    store = blockquant.BlockStore(path)
    assert store.loaded and set(store.tensors) >= {"layers.0.qkv.0", "layers.1.down.2", "lm_head.1"}
    again = LeanLlama(grid, quant="q4_1", max_len=16, blocks_file=path)  # reads the file, quantizes nothing
    assert again.layers[0]["qkv"].parts[0].data_ptr() != first.layers[0]["qkv"].parts[0].data_ptr()
    torch.testing.assert_close(lean_logits(again, ids, 3), lean_logits(first, ids, 3), rtol=0, atol=0)


def test_an_unreadable_block_file_is_quantized_again(grid, tmp_path):
    path = tmp_path / "blocks.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    lean = LeanLlama(grid, quant="q4_1", max_len=16, blocks_file=path)
    assert lean.fused is not None and lean.formats() == ["q4_1", "q8_0"]


# (rows of x, products' atol, logits' atol): q4_1 sums in another order (its bounds: test_kernel_paths.py);
# w4a8's integer products and the step's fixed order of float32 operations give the same bits.
PORTABLE = {"q4_1": (3, 1e-5, 1e-4), "w4a8": (11, 0, 0)}


@pytest.mark.parametrize("quant", PORTABLE)
def test_the_portable_c_paths_agree_with_the_native_ones(grid, tmp_path, quant):
    """A CPU without AVX-512 runs the plain C loops: built for generic x86-64, they must give the same
    products, quantization and decode step as the vector code."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the native build is the portable one here")
    rows, product_atol, logits_atol = PORTABLE[quant]
    portable = toolchain.load(toolchain.build(arch="x86-64"))
    blocks = LeanLlama(grid, quant=quant, max_len=32, num_blocks=4)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(3))
    for native in (blocks.layers[0]["gate_up"], blocks.lm_head):  # w4a8: also the output matrix's w8a8
        expected = native(x)
        native._lib = portable
        torch.testing.assert_close(native(x), expected, rtol=0, atol=product_atol)
    w = on_grid(torch.randn(96, 64, generator=torch.Generator().manual_seed(4)))
    q, d, m = (torch.empty(96, 32, dtype=torch.uint8), torch.empty(96, 2), torch.empty(96, 2))
    assert portable.q4_1_quantize(w.data_ptr(), 96, 64, q.data_ptr(), d.data_ptr(), m.data_ptr(), 4e-7) == 0
    assert torch.equal(q, blockquant.quantize_q4_1(w)[0][0])
    ids = [5, 17, 99, 3, 42, 7]
    ref = lean_logits(blocks, ids, 3, table=[0])
    blocks.fused.lib = portable
    for p in blocks.layers:
        for matrix in p.values():
            if hasattr(matrix, "_lib"):
                matrix._lib = portable
    torch.testing.assert_close(lean_logits(blocks, ids, 3, table=[2]), ref, rtol=0, atol=logits_atol)


@pytest.mark.parametrize("quant", ["q4_1", "w4a8"])
def test_prompts_prefilled_together_equal_each_prefilled_alone(grid, quant):
    """Three prompts as rows of one C call, in their own blocks: the logits and cache of three calls."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 5)]
    tables = [[0], [4, 2], [3]]
    lean = LeanLlama(grid, quant=quant, max_len=32, block_size=8, num_blocks=5)
    lean.cache.k.zero_(), lean.cache.v.zero_()  # the pools are compared whole below
    together = lean.prefill_many(prompts, tables)
    k = lean.cache.k.clone()
    assert together.shape == (3, 256)
    alone = torch.stack([lean.prefill(ids, table) for ids, table in zip(prompts, tables)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(k, lean.cache.k, rtol=0, atol=1e-6)  # 3 rows alone: another kernel's rounding
    lean.fused = None  # each prompt through torch's attention instead
    torch.testing.assert_close(lean.prefill_many(prompts, tables), alone, rtol=0,
                               atol=1e-4 if quant == "q4_1" else 1e-2)  # w4a8: a rounding can tip (test_w4a8)
