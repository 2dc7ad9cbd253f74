"""The paged cache on every route: where the blocks are, how a prompt is cut, and who wrote a prefix.

On the C route (``fused``) a row's arithmetic does not depend on which blocks hold its sequence nor on
which call wrote them, so scattered tables, a prompt in chunks and a suffix after a shared prefix give
the bits of one whole prefill, as long as every call keeps its rows on the same products (kernels.c:
more than 4 rows, the panels; the chunks here are 5 to 8 rows). The torch routes gather the same values
whichever blocks hold them (the same bits), but a chunk runs other products and another attention kernel
than the whole prompt: float32 routes then differ by summation order only (1e-4, as test_lean_llama).
A mixed call runs its rows through products of another size than the separate calls (the C route's
another kernel: 1e-5, as test_blockquant's prompts prefilled together).
"""

import pytest
import torch

from labserver.model.llama import LeanLlama
from tests.test_blockquant import grid_llama

BLOCK = 4  # positions per block: the prompts here cross several block boundaries
ROUTES = {  # name: (quant, fused)
    "c-q4_1": ("q4_1", True), "c-w4a8": ("w4a8", True),
    "torch-float32": ("none", False), "torch-fp16": ("fp16", False), "torch-q4_1": ("q4_1", False)}


@pytest.fixture(scope="module")
def grid():
    return grid_llama(tie_word_embeddings=False)


@pytest.fixture(params=list(ROUTES))
def route(request, grid):
    quant, fused = ROUTES[request.param]
    lean = LeanLlama(grid, quant=quant, max_len=64, block_size=BLOCK, num_blocks=32)
    assert (lean.fused is not None) == (quant in ("q4_1", "w4a8"))
    if not fused:
        lean.fused = None
    return lean


def same(got, want, lean, atol=1e-4):
    """Bitwise on the C route, within summation order on the torch routes."""
    if lean.fused is not None:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(lean, prompt, table, steps=3):
    """Logits after the prompt and after each of ``steps`` decode steps (tokens 7, 8, ...)."""
    out = [lean.prefill(prompt, table)]
    out += [lean.decode([7 + i], [len(prompt) + i], [table])[0] for i in range(steps)]
    return torch.stack(out)


def test_scattered_blocks_give_the_in_order_logits(route):
    prompt = ids(13, 0)  # 13 + 3 positions: four blocks
    in_order = run(route, prompt, [0, 1, 2, 3])
    scattered = run(route, prompt, [29, 3, 17, 8])
    assert torch.equal(scattered, in_order)


def test_a_prompt_in_chunks_equals_it_whole(route):
    """Three uneven chunks (5, 8, 6 tokens) across block boundaries, each continuing the last; then steps."""
    prompt, table = ids(19, 1), [4, 9, 0, 13, 7, 2]
    whole = run(route, prompt, [20, 21, 22, 23, 24, 25])
    chunks = [route.forward([(prompt[a:b], a, table)])[0] for a, b in ((0, 5), (5, 13), (13, 19))]
    chunks = torch.stack([chunks[-1]] + [route.decode([7 + i], [19 + i], [table])[0] for i in range(3)])
    same(chunks, whole, route)


def test_a_suffix_after_a_shared_prefix_equals_the_whole_prompt(route):
    """Sequence b starts with the 8 tokens of a's first two blocks: it lists those blocks in its table and
    prefills only its own 9 tokens after them, reading a's keys; a's blocks stay as they were."""
    a = ids(14, 2)
    b = a[:8] + ids(9, 3)
    table_a, table_b = [5, 11, 2, 30], [5, 11, 6, 1, 19]
    route.prefill(a, table_a)
    k_a = route.cache.k[table_a].clone()
    suffix = route.forward([(b[8:], 8, table_b)])[0]
    assert torch.equal(route.cache.k[table_a[:2]], k_a[:2])  # only read
    whole = route.prefill(b, [12, 13, 14, 15, 16])
    same(suffix, whole, route)
    step = route.decode([7], [len(b)], [table_b])[0]
    same(step, route.decode([7], [len(b)], [[12, 13, 14, 15, 16]])[0], route)


def test_a_suffix_after_a_prefix_that_ends_inside_a_block_equals_the_whole_prompt(route):
    """Sequence b shares a's first 10 tokens: a's first two blocks, then two rows of a's third block,
    copied into b's own block (b writes on into it); b prefills its 7 tokens after them."""
    a = ids(14, 7)
    b = a[:10] + ids(7, 8)
    table_a, table_b = [5, 11, 2, 30], [5, 11, 6, 1, 19]
    route.prefill(a, table_a)
    k_a = route.cache.k[table_a[:3]].clone()  # the blocks a filled (its last one holds 2 of 4 positions)
    route.cache.copy_rows(table_a[2], table_b[2], 10 - 2 * BLOCK)
    suffix = route.forward([(b[10:], 10, table_b)])[0]
    assert torch.equal(route.cache.k[table_a[:3]], k_a)  # the lender is only read
    whole = route.prefill(b, [12, 13, 14, 15, 16])
    same(suffix, whole, route)
    assert torch.equal(route.cache.k[[6, 1]], route.cache.k[[14, 15]]) or route.fused is None


def test_a_mixed_call_equals_the_separate_calls(route):
    """Two decode steps, a chunk continuing a prompt, a new prompt and a one-token prompt in one forward."""
    p, q, r = ids(6, 4), ids(11, 5), ids(7, 6)
    tables = {"p": [0, 1, 2], "q": [3, 4, 5, 6], "r": [7, 8], "one": [9]}
    route.prefill_many([p, q[:5]], [tables["p"], tables["q"]])
    chunks = [([7], 6, tables["p"]), (q[5:], 5, tables["q"]), (r, 0, tables["r"]), ([42], 0, tables["one"])]
    k = route.cache.k.clone(), route.cache.v.clone()
    mixed = route.forward(chunks)
    route.cache.k.copy_(k[0]), route.cache.v.copy_(k[1])
    separate = torch.cat([route.forward([c]) for c in chunks])
    torch.testing.assert_close(mixed, separate, rtol=0, atol=1e-4 if route.fused is None else 1e-5)


@pytest.mark.parametrize("quant", ["q4_1", "w4a8"])
def test_a_long_prompt_runs_as_consecutive_c_calls_with_the_same_bits(grid, quant):
    """Beyond ``FUSED_PREFILL_MAX`` rows a forward is cut into C calls of nearly equal size (30 rows in
    calls of at most 8: 7, 8, 7, 8), each continuing from the keys the last wrote: no torch attention."""
    lean = LeanLlama(grid, quant=quant, max_len=64, block_size=BLOCK, num_blocks=32)
    prompt, table = ids(30, 7), [31, 0, 8, 16, 3, 24, 9, 1, 12]
    whole = run(lean, prompt, table)
    lean.FUSED_PREFILL_MAX = 8
    assert torch.equal(run(lean, prompt, table), whole)
