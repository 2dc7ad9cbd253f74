"""The W4A8 route: Q4_1 weights (and the Q8_0 output matrix's) times activations rounded to 8 bits per
block, in integer products.

Its products must equal an independent reference of that arithmetic (torch, integer sums), stay within
the rounding bound of the exact product, run the same in the fused step and the torch path (and on every
vector path, to the bit: test_kernel_paths.py), and on the default model agree with float32 on most greedy steps
(``make bench`` prints the exact share).
"""

import pytest
import torch

from labserver.model import blocks as blockquant
from labserver.measure.bench_speed import AGREEMENT_PROMPTS, agreement
from labserver.config import EngineConfig
from labserver.engine.engine import Engine
from labserver.model.llama import LeanLlama
from tests.test_blockquant import grid_llama, on_grid


def round_activations(x):
    """x [M, K] in blocks of 32: (q as int64, d = max |x| / 127, block sums), as llama.cpp's Q8_1 has them."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))[..., None]).long()
    return q, d, blocks.sum(-1)


def w4a8_reference(x, parts):
    """sum_g d_w d_x (q_w . q_x) + m_w sum(x), in float64 from exact integer sums."""
    packed, dw, mw = parts
    nibbles = packed.reshape(packed.shape[0], -1, 16)
    qw = torch.cat([nibbles & 15, nibbles >> 4], -1).long()  # [N, G, 32]
    qx, dx, sx = round_activations(x)
    dots = torch.einsum("mgk,ngk->mng", qx, qw).double()
    return (dots * (dw.double()[None] * dx.double()[:, None]) + mw.double()[None] * sx.double()[:, None]).sum(-1)


@pytest.mark.parametrize("rows", [1, 3, 8, 13])  # 13: a register tile of 8 rows and one of 5
def test_products_equal_the_integer_reference_and_stay_within_the_rounding_bound(rows):
    g = torch.Generator().manual_seed(rows)
    w = on_grid(torch.randn(96, 64, generator=g) * 0.05)
    matrix = blockquant.lossless(w, "q4_1", w4a8=True)
    assert matrix.format == "w4a8"
    x, r = torch.randn(rows, 64, generator=g), torch.randn(rows, 96, generator=g)
    got = matrix(x)
    torch.testing.assert_close(got.double(), w4a8_reference(x, matrix.parts), rtol=0, atol=1e-5)
    torch.testing.assert_close(matrix.add(r.clone(), x), r + got, rtol=0, atol=1e-6)
    # Rounding moves each activation by at most half its block's step: the product by at most sum |w| d / 2.
    _, dx, _ = round_activations(x)
    bound = torch.einsum("mg,ngk->mn", dx / 2, w.abs().reshape(96, -1, 32))
    exact = x @ w.T
    assert ((got - exact).abs() <= bound + 1e-5).all()
    assert (got - exact).abs().max() > 1e-6  # and it is not the exact product


@pytest.mark.parametrize("rows", [1, 8, 13])
def test_the_output_matrix_equals_its_integer_reference(rows):
    """Q8_0 times 8-bit activations (w8a8): sum_g d_w d_x (q_w . q_x), the weights stored as q_w + 128."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g) * 0.05
    w[0, :32] = 0.0  # a block of zeros (d = 0) and one with q_w = -127 and 127
    w[1, :32] = torch.linspace(-1, 1, 32)
    (qw, dw), _ = blockquant.quantize_q8_0(w)
    on_grid8 = blockquant.dequantize_q8_0(qw, dw)
    matrix = blockquant.lossless(on_grid8, "q8_0", w4a8=True)
    assert matrix.format == "w8a8" and int(matrix.parts[0].min()) == -127
    x = torch.randn(rows, 64, generator=g)
    x[0, 32:] = 0.0  # a block of zero activations
    qx, dx, _ = round_activations(x)
    dots = torch.einsum("mgk,ngk->mng", qx, matrix.parts[0].long().reshape(96, -1, 32)).double()
    reference = (dots * (matrix.parts[1].double()[None] * dx.double()[:, None])).sum(-1)
    got = matrix(x)
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=1e-6)
    r = torch.randn(rows, 96, generator=g)
    torch.testing.assert_close(matrix.add(r.clone(), x), r + got, rtol=0, atol=1e-6)
    assert blockquant.lossless(on_grid8, "q8_0").format == "q8_0"  # the exact route's keeps float32 activations


def test_rows_not_in_whole_panels_keep_float32_activations():
    w = on_grid(torch.randn(40, 64, generator=torch.Generator().manual_seed(0)) * 0.05)
    matrix = blockquant.lossless(w, "q4_1", w4a8=True)
    assert matrix.format == "q4_1"
    x = torch.randn(3, 64)
    torch.testing.assert_close(matrix(x), x @ w.T, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def grid():
    return grid_llama(tie_word_embeddings=False)


def test_the_fused_step_equals_the_torch_path(grid):
    """Prefill and a batch of three sequences in scattered blocks: the C step (norms, attention, 8-bit
    products) against torch's norms and attention around the same products."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 5)]
    tables = [[2, 9, 4], [0, 7, 11], [5, 1, 10]]  # blocks of 4 positions, scattered

    def run(lean):
        return torch.cat([lean.prefill(ids, table)[None] for ids, table in zip(prompts, tables)]
                         + [lean.decode([7, 8, 9], [len(p) for p in prompts], tables)])

    lean = LeanLlama(grid, quant="w4a8", max_len=32, block_size=4, num_blocks=12)
    assert lean.formats() == ["w4a8", "w8a8"] and lean.fused is not None
    fused = run(lean)
    lean.fused = None
    unfused, exact = run(lean), run(LeanLlama(grid, quant="q4_1", max_len=32, block_size=4, num_blocks=12))
    # The two differ only where an activation, summed in another order by torch's norms and attention,
    # lands on the other side of an 8-bit rounding boundary: each such tip is one rounding of the route,
    # which rounds every activation. So each of them is the exact route plus the same kind of rounding
    # noise, spread over thousands of logits (their root mean square concentrates), and by the triangle
    # inequality rms(fused - unfused) <= rms(fused - exact) + rms(unfused - exact) ~ 2 rms(unfused - exact),
    # on any machine. A step wired wrongly (a row, a block, a matrix) differs by the logits themselves.
    def rms(t):
        return float(t.double().pow(2).mean().sqrt())

    assert rms(unfused - exact) > 0  # the route does round
    assert rms(fused - unfused) <= 2 * rms(unfused - exact)
    assert rms(fused - exact) <= 2 * rms(unfused - exact)  # the same noise as the torch path's, no more
    assert 2 * rms(unfused - exact) < rms(exact) / 10  # and the check could see a wrong step


@pytest.mark.model
def test_default_model_agrees_with_float32_on_most_greedy_steps(default_engine, exact_engine):
    config = EngineConfig(threads=2, quant="w4a8", max_batch=2)
    route = Engine(default_engine.source, default_engine.tokenizer, config)
    assert route.runner.name == "lean-w4a8+w8a8" and route.runner.lean.fused is not None
    figures = agreement(exact_engine, route, AGREEMENT_PROMPTS[:4], n=16)
    # Teacher-forced: the float32 token is its argmax at 93% of steps here; a wrong product would be near 0.
    assert figures["teacher_forced_pct"] >= 85
