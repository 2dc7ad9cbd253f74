"""Checkers for notebook 08 kv_cache; see ``checks/__init__.py`` for how checkers report.

The three exercises are decisions of the block manager and of the scheduler, so nothing here is timed:
each checker drives the student's code through cases whose right answer follows from the rules alone,
small enough to check by hand, and the allocator also through a random run against a plain count of who
holds which block.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Callable

from ..checking import attempt, checker, say


@checker
def check_block_allocator(make: Callable, blocks: int = 8, ops: int = 400) -> bool:
    """``make(num_blocks)`` gives an allocator with ``allocate() -> block id or None``, ``share(block_id)``
    (one more holder) and ``free(block_id)`` (one holder fewer)."""
    name = "BlockAllocator"
    alloc = attempt(name, make, 4)
    a, b = attempt(name, alloc.allocate), attempt(name, alloc.allocate)
    ok = say(a != b and {a, b} <= set(range(4)), name, f"two sequences got blocks {a} and {b} of 4")
    attempt(name, alloc.share, a)  # a second sequence holds block a too (a cached prefix)
    attempt(name, alloc.free, a)  # the first one lets go of it
    rest = [attempt(name, alloc.allocate) for _ in range(3)]
    ok &= say(a not in rest, name, f"block {a} had 2 holders and one let go; the next 3 allocations gave {rest} "
                                   f"(block {a} is still read by its other holder)")
    ok &= say(rest[-1] is None, name, f"with every block held, allocate() gave {rest[-1]} (expected None)")
    attempt(name, alloc.free, a)  # its last holder lets go
    again = attempt(name, alloc.allocate)
    ok &= say(again == a, name, f"after block {a}'s last holder let go, allocate() gave {again} (expected {a}, "
                                "the only free block)")
    problem = _random_run(name, make, blocks, ops)
    return ok & say(problem is None, name, problem or f"{ops} random allocations, shares and frees on {blocks} "
                                                      "blocks: no block held twice, every block back when freed")


def _random_run(name: str, make: Callable, blocks: int, ops: int) -> str | None:
    """Random operations against a count of the holders of each block; the first thing that went wrong."""
    rng, alloc, held = random.Random(0), attempt(name, make, blocks), Counter()
    for i in range(ops):
        op = rng.choice(("allocate", "allocate", "share", "free", "free"))
        if op == "allocate":
            got = attempt(name, alloc.allocate)
            if len(held) == blocks and got is not None:
                return f"operation {i}: all {blocks} blocks held, yet allocate() gave {got}"
            if len(held) < blocks and (got is None or got in held or got not in range(blocks)):
                return (f"operation {i}: blocks {sorted(held)} held, {blocks - len(held)} free; allocate() gave "
                        f"{got}" + (f", held {held[got]} time(s) already" if got in held else ""))
            if got is not None:
                held[got] += 1
        elif held:
            block = rng.choice(sorted(held))
            attempt(name, alloc.share if op == "share" else alloc.free, block)
            held[block] += 1 if op == "share" else -1
            held += Counter()  # drops blocks nobody holds any more
    return None


BS = 4  # tokens a block in the lookup's cases
P1 = list(range(1, 14))  # 3 full blocks and one of 1 token
P2 = [20, 21, 22, 23, 5, 6, 7, 8, 30, 31, 32, 33, 34, 35]  # its 2nd block has the same tokens as P1's
P3 = P1[:8] + [40, 41, 42, 43, 44]  # P1's first two blocks (shared), then its own
TABLES = {"P1": (P1, [0, 1, 2, 3]), "P2": (P2, [4, 5, 6, 7]), "P3": (P3, [0, 1, 8, 9])}
LOOKUPS = [(P1 + [99], [0, 1, 2]), (P1[:12], [0, 1]), (P1[:3], []), (P1[:5], [0]), (P3 + [99], [0, 1, 8]),
           (P1[:8] + P2[8:12] + [0], [0, 1]), (P2[:8] + P1[8:12] + [0], [4, 5]), (P1[8:12] + [0], [])]


@checker
def check_prefix_lookup(commit: Callable, lookup: Callable) -> bool:
    """``commit(cached, token_ids, table, block_size)`` names the blocks of a sequence whose K/V are written;
    ``lookup(cached, token_ids, block_size)`` returns the block ids of the longest cached prefix. Sequences
    P1, P2, P3 (blocks of 4) are committed one by one, then 8 prompts are looked up."""
    name = "prefix lookup"
    cached = {}
    attempt(name, commit, cached, P1, TABLES["P1"][1], BS)
    named = sorted(set(cached.values()))
    ok = say(named == [0, 1, 2], name, f"committed P1 = {P1} in blocks {TABLES['P1'][1]}: named blocks {named} "
                                       "(expected [0, 1, 2])")
    for seq in ("P2", "P3"):
        attempt(name, commit, cached, *TABLES[seq], BS)
    named, expected = sorted(set(cached.values())), [0, 1, 2, 4, 5, 6, 8]
    ok &= say(named == expected and len(cached) == len(expected), name,
              f"committed P2 = {P2} in blocks {TABLES['P2'][1]} and P3 = {P3} in blocks {TABLES['P3'][1]}: "
              f"{len(cached)} names for blocks {named} (expected {len(expected)} names for blocks {expected})")
    for tokens, want in LOOKUPS:
        got = attempt(name, lookup, cached, list(tokens), BS)
        got = list(got) if isinstance(got, (list, tuple)) else got
        ok &= say(got == want, name, f"lookup {tokens}: blocks {got} (expected {want})")
    return ok


CASES = [(["a", "b", "c"], ("long", 1000), 256), (["a", "b", "c"], ("long", 100), 256), (["a", "b", "c"], None, 256),
         ([], ("long", 1000), 256), (["a", "b", "c"], ("long", 1000), 3), (["a", "b", "c"], ("long", 1000), 2)]


def _expected(decoding: list, prompt, budget: int) -> list:
    """What the engine's ``Batched`` policy puts in the forward, in its order."""
    work = [(seq, 1) for seq in decoding[:budget]]
    left = budget - len(work)
    return work + ([(prompt[0], min(prompt[1], left))] if prompt and left > 0 else [])


def _why(got: list, decoding: list, prompt, budget: int) -> str:
    """What is wrong with a forward, in the order a reader would look."""
    work = _pairs(got)
    if work is None:
        return f"not a list of (sequence, tokens) pairs: {got!r}"
    total, names = sum(n for _, n in work), [seq for seq, _ in work]
    missing = [seq for seq in decoding[:budget] if seq not in names]
    if total > budget:
        return f"it carries {total} tokens, over the budget of {budget}"
    if missing:
        return f"the decode tokens of {missing} are not in it: those streams wait another forward"
    if prompt and prompt[0] in names and names.index(prompt[0]) < len(names) - 1:
        return "the prompt's chunk comes before decode tokens"
    return f"expected {_expected(decoding, prompt, budget)}"


def _pairs(got) -> list | None:
    try:
        return [(seq, n) for seq, n in got]
    except (TypeError, ValueError):
        return None


@checker
def check_chunk_choice(next_forward: Callable) -> bool:
    """``next_forward(decoding, prompt, budget)``: the (sequence, tokens) pairs of the next forward, given the
    decoding sequences (one token each), a prompt being prefilled (``(name, tokens left)`` or None) and a
    budget of tokens. Hand-made cases, then a prompt of 1000 tokens prefilled beside 3 streams."""
    name = "next_forward"
    ok = True
    for decoding, prompt, budget in CASES:
        got = attempt(name, next_forward, list(decoding), prompt, budget)
        right = _pairs(got) == _expected(decoding, prompt, budget)
        ok &= say(right, name, f"decoding {decoding}, prompt {prompt}, budget {budget}: {got}"
                               + ("" if right else f" ({_why(got, decoding, prompt, budget)})"))
    left, forwards, wrong = 1000, 0, []
    while left > 0 and forwards < 100:
        work = dict(_pairs(attempt(name, next_forward, ["a", "b", "c"], ("long", left), 64)) or [])
        forwards += 1
        if not (all(work.get(seq) == 1 for seq in "abc") and sum(work.values()) <= 64):
            wrong.append(forwards)
        left -= work.get("long", 0)
    fewest = math.ceil(1000 / 61)
    return ok & say(not wrong and forwards == fewest, name,
                    f"a 1000-token prompt beside 3 streams, budget 64: {forwards} forwards (the fewest within the "
                    f"budget: {fewest}); forwards that left a stream out or went over: {wrong or 'none'}")
