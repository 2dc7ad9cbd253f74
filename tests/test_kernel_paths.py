"""Every vector path of the C kernels this machine can build, product by product and for the whole step.

The paths: the native build (AVX-512 on an AVX-512 CPU), AVX2 + FMA (``x86-64-v3``), AVX2 with AVX-VNNI,
portable C (``x86-64``), and a build without OpenMP. Tolerances follow from float32 arithmetic, u = 2^-24:
a sum of n rounded terms, in any order, with or without fused multiply-adds, is within
gamma_n * sum |terms| of the exact sum, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of
Numerical Algorithms, 3.1). The integer route's sums are exact, and its step runs in one fixed order of
float32 operations on every path (kernels.c), so those are compared for equality.
"""

import platform
from pathlib import Path

import pytest
import torch

from labserver.model import blocks as blockquant, kernels
from labserver.model import toolchain
from labserver.model.llama import LeanLlama
from tests.test_blockquant import grid_llama, on_grid
from tests.test_lean_llama import lean_logits
from tests.test_w4a8 import w4a8_reference

U = 2.0**-24


def gamma(n):
    return n * U / (1 - n * U)


def cpu_flags() -> set:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def buildable():
    """(arch, openmp, the path the library must report) for every path this CPU runs."""
    flags, paths = cpu_flags(), []
    native = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else None
    paths += [("native", True, native), ("native", False, native)]
    if platform.machine() in ("x86_64", "AMD64"):
        paths.append(("x86-64", True, "portable"))
        if {"avx2", "fma"} <= flags:
            paths.append(("x86-64-v3", True, "avx2"))
        if {"avx2", "fma", "avx_vnni"} <= flags:
            paths.append(("x86-64-v3+avxvnni", True, "avx2"))
    return paths


PATHS = buildable()
IDS = [f"{a}{'' if omp else '-no-openmp'}" for a, omp, _ in PATHS]


@pytest.fixture(scope="module", params=PATHS, ids=IDS)
def lib(request):
    arch, openmp, _ = request.param
    return toolchain.load(toolchain.build(arch=arch, openmp=openmp))


def use(matrix, lib):
    matrix._lib = lib
    return matrix


@pytest.mark.parametrize("arch,openmp,expected", PATHS, ids=IDS)
def test_each_build_reports_its_path(arch, openmp, expected):
    path, features = toolchain.describe(toolchain.load(toolchain.build(arch=arch, openmp=openmp)))
    if expected is not None:
        assert path == expected
    assert ("openmp" in features.split()) == openmp
    assert ("avxvnni" in features.split()) == arch.endswith("+avxvnni")


def q4_1_matrix(n, k, seed):
    """A Q4_1 matrix: its blocks (q, d, m) and its float32 weights w = q * d + m, rounded twice."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    (q, d, m), _ = blockquant.quantize_q4_1(w)
    return (q, d, m), blockquant.dequantize_q4_1(q, d, m)


def weights_are_the_columns(product, w) -> bool:
    """The check of an exact route: x = the identity's rows picks each weight alone (every other term is
    an exact zero), so a product that forms the weights as the float32 model did returns them bit for bit."""
    return torch.equal(product, w.T)


@pytest.mark.parametrize("rows", [1, 3, 64])  # one row, a tile of 3, panels (64 > PANEL_MIN)
def test_the_weights_are_rounded_twice_on_every_path(lib, rows):
    matrix = use(blockquant.lossless(q4_1_matrix(96, 64, 0)[1], "q4_1"), lib)
    (q, d, m), w = matrix.parts, blockquant.dequantize_q4_1(*matrix.parts)  # the blocks it multiplies
    eye = torch.eye(64)
    got = torch.cat([matrix(eye[i:i + rows]) for i in range(0, 64, rows)])
    assert weights_are_the_columns(got, w)
    # The check would catch a kernel that fuses q * d + m into one rounding: those weights differ.
    qs = torch.cat([q.reshape(96, -1, 16) & 15, q.reshape(96, -1, 16) >> 4], -1).double()
    fused = (qs * d.double()[..., None] + m.double()[..., None]).reshape(96, 64).float()
    assert not weights_are_the_columns(fused.T, w)
    q8 = use(blockquant.lossless(on_grid(torch.randn(96, 64) * 0.05, "q8_0"), "q8_0"), lib)
    assert weights_are_the_columns(q8(eye[:rows]), blockquant.dequantize_q8_0(*q8.parts)[:, :rows])


def within_the_float32_bound(got, x, w, terms, extra=None):
    """|got - x.w^T| <= gamma_n * sum |terms|, exact value and sums in float64 from the float32 inputs.

    The Q4_1 kernels sum q_j d x_j and m x_j (the one-row kernel factors d and m out of each block): 2K
    terms, each through at most 2K - 1 additions, a product by x, one by d or m, and the weight's own two
    roundings: n = 2K + 4. ``terms``: sum_j (|q_j d| + |m|) |x_j| per output."""
    k = x.shape[1]
    exact = x.double() @ w.double().T
    bound = gamma(2 * k + 4) * terms
    if extra is not None:  # y += x.w^T: the residual and one more rounding
        exact, bound = exact + extra.double(), bound + gamma(2 * k + 5) * (terms + extra.double().abs())
    return bool(((got.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 43])
def test_products_stay_within_the_float32_bound_on_every_path(lib, rows):
    g = torch.Generator().manual_seed(100 + rows)
    x, r = torch.randn(rows, 576, generator=g), torch.randn(rows, 96, generator=g)
    for n in (96, 40):  # 96: panels of 32 from 5 rows on; 40: rows alone
        matrix = use(blockquant.lossless(q4_1_matrix(n, 576, rows)[1], "q4_1"), lib)
        q, d, m = matrix.parts
        w = blockquant.dequantize_q4_1(q, d, m)  # the weights its blocks hold
        qd = (w - m.repeat_interleave(32, 1)).abs()  # |q d| up to a rounding, covered by gamma
        terms = x.double().abs() @ (qd.double() + m.repeat_interleave(32, 1).double().abs()).T
        assert within_the_float32_bound(matrix(x), x, w, terms)
        assert within_the_float32_bound(matrix.add(r[:, :n].clone(), x), x, w, terms, r[:, :n])
    matrix = use(blockquant.lossless(on_grid(torch.randn(96, 576, generator=g) * 0.05, "q8_0"), "q8_0"), lib)
    q8 = blockquant.dequantize_q8_0(*matrix.parts)
    got = matrix(x)
    assert within_the_float32_bound(got, x, q8, x.double().abs() @ q8.double().abs().T)


def test_the_bound_rejects_a_wrong_product():
    """One block's nibbles read in the wrong halves (q[j] for q[j + 16]): far outside the bound."""
    (q, d, m), w = q4_1_matrix(8, 64, 3)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    swapped = torch.cat([w[:, 16:32], w[:, :16], w[:, 32:]], 1)
    terms = x.double().abs() @ (w.double().abs() * 3).T
    assert within_the_float32_bound((x.double() @ w.double().T).float(), x, w, terms)
    assert not within_the_float32_bound((x.double() @ swapped.double().T).float(), x, w, terms)


def scaled(q, g, lo, hi):
    """Integers q [rows, K] times 2^e, one e per row: every block of a row has the same power-of-two scale."""
    return q.float() * torch.exp2(torch.randint(lo, hi, (q.shape[0], 1), generator=g).float())


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_the_integer_sums_are_exact_on_every_path(lib, rows):
    """Weights and activations whose block scales are powers of two, one per row (Q4_1: q in 0..15 with a
    0 and a 15 in each block, so m = 0 and d = 2^e; Q8_0 and the activations: a +-127 in each block): every
    d_w d_x is a power of two and each output's integer sums fit 24 bits, so the float32 result is exactly
    the integer sums times their scale, and must equal the integer reference to the last bit."""
    g = torch.Generator().manual_seed(rows)
    q4 = torch.randint(0, 16, (96, 128), generator=g)
    q4[:, ::32], q4[:, 1::32] = 0, 15
    q8 = torch.randint(-127, 128, (96, 128), generator=g)
    q8[:, ::32] = -127
    qx = torch.randint(-127, 128, (rows, 128), generator=g)
    qx[:, 5::32] = 127
    x = scaled(qx, g, -3, 3)
    matrix = use(blockquant.lossless(scaled(q4, g, -8, -3), "q4_1", w4a8=True), lib)
    assert matrix.format == "w4a8" and not matrix.parts[2].any()  # m = 0
    assert torch.equal(matrix(x).double(), w4a8_reference(x, matrix.parts))
    w8 = scaled(q8, g, -8, -3)
    out = use(blockquant.lossless(w8, "q8_0", w4a8=True), lib)
    assert out.format == "w8a8"
    assert torch.equal(out(x).double(), (qx.double() @ q8.double().T) * (x.double().abs().amax(1, keepdim=True) / 127)
                       * (w8.double().abs().amax(1) / 127))


@pytest.fixture(scope="module")
def grid():
    return grid_llama(tie_word_embeddings=False, num_hidden_layers=4)


def on_path(lean, lib):
    """``lean`` running the kernels of ``lib``: its fused step and every matrix."""
    lean.fused.lib = lib
    for p in [*lean.layers, {"lm_head": lean.lm_head}]:
        for matrix in p.values():
            if hasattr(matrix, "_lib"):
                use(matrix, lib)
    return lean


def run_on(lib, grid, quant, ids):
    lean = on_path(LeanLlama(grid, quant=quant, max_len=32, block_size=4, num_blocks=8), lib)
    lean.cache.k.zero_(), lean.cache.v.zero_()  # the pools are compared whole
    return lean_logits(lean, ids, 5, table=[5, 2, 7]), lean.cache.k.clone()


IDS_STEP = [5, 17, 99, 3, 42, 7, 11, 200, 31]


@pytest.fixture(scope="module")
def native_w4a8(grid):
    return run_on(toolchain.load(toolchain.build()), grid, "w4a8", IDS_STEP)


def test_the_w4a8_step_gives_the_same_bits_on_every_path(lib, grid, native_w4a8):
    """Integer products and the step's other float32 operations in one fixed order (kernels.c): the same
    activations round to the same 8 bits, so no rounding can tip on one path and not another."""
    logits, cache = run_on(lib, grid, "w4a8", IDS_STEP)
    assert torch.equal(logits, native_w4a8[0]) and torch.equal(cache, native_w4a8[1])


@pytest.fixture(scope="module")
def wide_heads():
    """The served model's head size (64) and block size (16), and a context of several blocks: the
    attention's vector code for 16 keys at a time and for a 64-wide head runs here, not at the grid's."""
    return grid_llama(tie_word_embeddings=False, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)


def long_run(lib, model):
    lean = on_path(LeanLlama(model, quant="w4a8", max_len=64, block_size=16, num_blocks=8), lib)
    lean.cache.k.zero_(), lean.cache.v.zero_()
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    return lean_logits(lean, ids, 45, table=[6, 1, 4, 7]), lean.cache.k.clone(), lean.cache.v.clone()


def test_the_w4a8_step_over_several_blocks_of_64_wide_heads_gives_the_same_bits_on_every_path(lib, wide_heads):
    native = long_run(toolchain.load(toolchain.build()), wide_heads)
    assert all(torch.equal(a, b) for a, b in zip(long_run(lib, wide_heads), native))


def test_the_q4_1_step_stays_near_float64_on_every_path(lib, grid):
    """The exact route against the model evaluated in float64 (transformers, the same float32 weights).
    Each product is within gamma_n of its exact value (above); the step's other operations (norms,
    softmax, SiLU) add a few roundings each. How much this network amplifies a step's roundings is what
    its float32 evaluation by transformers deviates from float64: any path rounds each operation as
    finely (n u, in any order), so it may deviate as much; twice that allows for roundings that happen
    not to cancel in one order and do in the other (the paths here reach 0.8-1.2 times it). This is a
    yardstick, not a proof: the proofs are the products' bounds above. A wrong step (a row, a block, a
    norm) misses by the logits themselves."""
    import copy

    logits, _ = run_on(lib, grid, "q4_1", IDS_STEP)
    with torch.inference_mode():
        ref32, ref64 = (m(input_ids=torch.tensor([IDS_STEP])).logits[0, 4:].double()
                        for m in (grid, copy.deepcopy(grid).double()))
    spread = (ref32 - ref64).abs().max()
    assert spread > 0  # float32 differs from float64 here: the yardstick is not empty
    assert (logits.double() - ref64).abs().max() <= 2 * spread


@pytest.mark.parametrize("quant", ["q4_1", "w4a8"])
def test_blocks_chunks_and_shared_prefixes_keep_the_bits_on_every_path(lib, grid, quant):
    """On each path a prompt gives one set of bits however it reaches the cache: whole in order, whole in
    scattered blocks, in three chunks (6, 7, 7 tokens) across block boundaries, and as its last 12 tokens
    after the first two blocks another sequence wrote (test_paged_cache.py says why, on this machine's
    native build and the torch routes)."""
    lean = on_path(LeanLlama(grid, quant=quant, max_len=32, block_size=4, num_blocks=16), lib)
    prompt = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(8)).tolist()
    whole = lean.prefill(prompt, [0, 1, 2, 3, 4])
    assert torch.equal(lean.prefill(prompt, [14, 3, 9, 6, 11]), whole)
    table = [7, 5, 12, 15, 10]
    chunks = [lean.forward([(prompt[a:b], a, table)])[0] for a, b in ((0, 6), (6, 13), (13, 20))]
    assert torch.equal(chunks[-1], whole)
    assert torch.equal(lean.forward([(prompt[8:], 8, [0, 1, 8, 2, 13])])[0], whole)
