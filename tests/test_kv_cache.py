"""The KV cache manager: hand-computable cases, then a randomized run against the rules with a fake K/V
memory (every slot records the token prefix it was computed from), which wrong managers a student might
write must fail."""

import random
from dataclasses import astuple

import pytest

from labserver.engine import kv_blocks, kv_cache
from labserver.engine.kv_cache import BlockName, KVCacheManager, PrefixCacheStats


def snapshot(kv: KVCacheManager):
    """Everything a failed call must leave as it was."""
    blocks = [(b.ref_count, b.name) for b in kv.blocks]
    return blocks, kv.free_block_ids(), astuple(kv.stats), {s: kv.table(s) for s in list(kv._seqs)}


def committed(kv, seq_id, tokens, computed=None):
    assert kv.allocate(seq_id, tokens) is not None
    kv.commit(seq_id, tokens, len(tokens) if computed is None else computed)


# --- hand-computable cases (4 tokens a block) --------------------------------------------------------

def test_blocks_are_taken_at_block_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate("a", list(range(10))) == 0
    assert kv.table("a") == [0, 1, 2] and kv.num_used_blocks == 3 and kv.usage == 3 / 8
    assert kv.grow("a", 12) and kv.table("a") == [0, 1, 2]
    assert kv.grow("a", 13) and kv.table("a") == [0, 1, 2, 3]
    assert kv.grow("a", 5) and kv.table("a") == [0, 1, 2, 3]  # never shrinks
    assert kv.allocate("b", list(range(10)), num_tokens=4) == 0 and kv.table("b") == [4]  # a first chunk
    assert kv.num_free_blocks == 3 and "b" in kv and "c" not in kv


def test_full_blocks_are_shared_once_committed_and_the_partial_block_never():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    kv.allocate("a", prompt)
    assert kv.allocate("b", prompt) == 0  # running side by side, nothing written yet: nothing shared
    assert kv.table("b") == [3, 4, 5]
    kv.commit("a", prompt, 6)  # a chunk of 6 written: block 0 is full
    assert kv.allocate("c", prompt) == 4 and kv.table("c") == [0, 6, 7]
    kv.commit("a", prompt, 10)
    assert kv.blocks[1].name is not None and kv.blocks[2].name is None  # 10 tokens: block 2 is partial
    kv.free("c")
    assert kv.allocate("c", prompt + [99]) == 8 and kv.table("c") == [0, 1, 6]  # c's freed 7, 6 went to the head
    assert [kv.blocks[i].ref_count for i in range(8)] == [2, 2, 1, 1, 1, 1, 1, 0]


def test_the_last_prompt_token_is_always_computed():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    committed(kv, "a", list(range(8)))
    assert kv.allocate("b", list(range(8))) == 4  # all 8 cached, yet the last block is recomputed
    assert kv.table("b")[1] != kv.table("a")[1] and kv.blocks[kv.table("b")[1]].ref_count == 1
    assert kv.allocate("c", list(range(9))) == 8
    assert kv.allocate("d", [0]) == 0 and kv.allocate("e", []) == 0 and kv.table("e") == []


def test_a_name_chains_the_whole_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    committed(kv, "a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert kv.allocate("b", [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0  # same second block after another first one
    assert kv.allocate("c", [1, 2, 3, 4, 5, 6, 7, 9, 0]) == 4
    assert kv.stats == PrefixCacheStats(queries=27, hits=4, evictions=0)


def test_names_are_exact_even_when_every_digest_collides(monkeypatch):
    monkeypatch.setattr(kv_blocks, "hash", lambda _: 7, raising=False)
    kv = KVCacheManager(num_blocks=16, block_size=2)
    committed(kv, "a", [1, 2, 3, 4, 0])
    assert kv.allocate("b", [1, 2, 3, 5, 0]) == 2 and kv.allocate("c", [2, 1, 3, 4, 0]) == 0
    assert kv.allocate("d", [1, 2, 3, 4, 9]) == 4


def test_names_compare_long_chains_without_recursion():
    a = b = None
    for i in range(20_000):
        a, b = BlockName(a, [i, i]), BlockName(b, [i, i])
    assert a == b and hash(a) == hash(b) and a != BlockName(a.parent, [0, 1]) and a != (a.parent, a.token_ids)


def test_generated_tokens_are_cached_for_the_next_turn():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt, answer = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]
    kv.allocate("turn1", prompt)
    kv.commit("turn1", prompt, 6)
    tokens = list(prompt)
    for token in answer:  # decode: the K/V of the previous token is written as the next one is sampled
        assert kv.grow("turn1", len(tokens) + 1)
        kv.commit("turn1", tokens, len(tokens))
        tokens.append(token)
    kv.commit("turn1", tokens, len(tokens))
    kv.free("turn1")
    assert kv.allocate("turn2", tokens + [12, 13]) == 8  # history is 11 tokens: two full blocks


def test_a_block_computed_twice_keeps_the_first_copy_and_the_chain_goes_on():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    kv.allocate("a", prompt)
    kv.allocate("b", prompt)
    kv.commit("a", prompt, 5)
    kv.commit("b", prompt, 5)
    assert [kv.blocks[i].name is not None for i in kv.table("b")] == [False, False, False]
    assert kv.grow("b", 6)
    kv.commit("b", prompt + [6], 6)  # b's third block is named after a's second
    a, b = kv.table("a"), kv.table("b")
    kv.free("a")
    assert kv.allocate("c", prompt + [6, 7]) == 6 and kv.table("c")[:3] == a[:2] + b[2:3]


def test_free_keeps_names_and_a_lookup_takes_the_blocks_back():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    committed(kv, "a", list(range(9)), 8)  # the last token's K/V not written: block 2 holds nothing
    kv.free("a")
    kv.free("a")  # idempotent
    assert kv.num_free_blocks == 4 and kv.usage == 0 and kv.free_block_ids() == [2, 3, 1, 0]
    assert kv.allocate("b", list(range(9))) == 8
    assert kv.table("b") == [0, 1, 2] and kv.free_block_ids() == [3] and kv.stats.evictions == 0
    assert [b.ref_count for b in kv.blocks] == [1, 1, 1, 0]


def test_eviction_takes_the_least_recently_used_tail_blocks_first():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    committed(kv, "old", [1, 1, 2, 2, 0], 4)  # blocks 0, 1 named, 2 taken but not written
    committed(kv, "new", [3, 3, 4, 4, 0], 4)  # blocks 3, 4 named, 5 taken but not written
    kv.free("old")
    kv.free("new")
    assert kv.free_block_ids() == [5, 2, 1, 0, 4, 3]  # nameless first, then old's tail, old's head, ...
    assert kv.allocate("x", [9] * 6) == 0 and kv.table("x") == [5, 2, 1]
    assert kv.stats.evictions == 1 and kv.blocks[1].name is None
    assert kv.allocate("y", [1, 1, 2, 2]) == 2 and kv.table("y") == [0, 4]  # a hit on 0, then evicts 4
    assert kv.stats.evictions == 2 and kv.free_block_ids() == [3]
    assert kv.allocate("z", [3, 3, 4, 4, 0]) is None  # one hit (block 3) and two new blocks: one is free
    assert kv.allocate("z", [3, 3, 4, 4, 0], num_tokens=2) == 2 and kv.free_block_ids() == []
    assert kv.stats == PrefixCacheStats(queries=25, hits=4, evictions=2)


def test_exhaustion_changes_nothing():
    kv = KVCacheManager(num_blocks=5, block_size=2)
    committed(kv, "a", [1, 2, 3, 4, 5], 4)
    kv.free("a")
    committed(kv, "b", [7, 7])  # takes block 2, the nameless head
    before = snapshot(kv)
    assert kv.free_block_ids() == [3, 4, 1, 0] and not kv.can_allocate(10)
    assert kv.allocate("c", list(range(1, 11))) is None  # 2 hits from the queue + 3 new > 4 free
    assert kv.allocate("c", list(range(20, 30))) is None
    assert not kv.grow("b", 11)
    assert snapshot(kv) == before
    assert kv.can_allocate(8) and kv.allocate("c", list(range(1, 9))) == 4  # 2 hits + 2 new: exactly fits
    assert kv.num_free_blocks == 0 and kv.usage == 1.0 and kv.grow("c", 8) and not kv.grow("c", 9)


def test_a_freed_sequences_partly_written_block_lends_its_rows_and_waits_at_the_tail():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    committed(kv, "a", [1, 2, 3, 4, 5, 6])  # block 0 named, block 1 holds 5 and 6
    kv.free("a")
    assert kv.free_block_ids() == [2, 3, 1, 0]  # kept like a named block, not reused first
    copies = []
    assert kv.allocate("b", [1, 2, 3, 4, 5, 6, 7], copy=lambda *c: copies.append(c)) == 6
    assert copies == [(1, 2, 2)] and kv.table("b") == [0, 2] and kv.free_block_ids() == [3, 1]
    assert kv.allocate("c", [1, 2, 3, 4, 5, 9, 9], copy=lambda *c: copies.append(c)) == 5  # agrees on 5
    assert copies[-1] == (1, 3, 1) and kv.stats.evictions == 0
    kv.free("c")
    assert kv.allocate("d", list(range(20, 28))) == 0 and kv.table("d") == [3, 1]  # reused: it lends no more
    assert kv.blocks[1].partial is None and kv.allocate("e", [1, 2, 3, 4, 5, 6], copy=copies.append) is None


def test_prefix_caching_off_never_names_or_counts():
    kv = KVCacheManager(num_blocks=8, block_size=2, prefix_caching=False)
    committed(kv, "a", [1, 2, 3, 4, 5])
    assert kv.allocate("b", [1, 2, 3, 4, 5]) == 0 and kv.table("b") == [3, 4, 5]
    kv.free("a")
    assert all(b.name is None for b in kv.blocks) and kv.stats == PrefixCacheStats()
    assert kv.stats.hit_rate == 0.0


def test_reset_prefix_cache_forgets_names_and_statistics():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    committed(kv, "a", [1, 2, 3, 4, 5])
    assert kv.allocate("b", [1, 2, 3, 4, 5]) == 4 and kv.stats.hit_rate == 0.4
    kv.reset_prefix_cache()
    assert kv.stats == PrefixCacheStats() and all(b.name is None for b in kv.blocks)
    assert kv.table("b") == [0, 1, 3] and kv.blocks[0].ref_count == 2  # tables stay as they were
    assert kv.allocate("c", [1, 2, 3, 4, 5]) == 0


def test_misuse_is_an_error():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already"):
        kv.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError):
        kv.commit("a", [1, 2, 3, 4, 5], 5)  # the table covers 4 tokens
    with pytest.raises(KeyError):
        kv.table("nobody")
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=4)


# --- randomized: an engine's calls in random order, checked against the rules -----------------------

class Engine:
    """Drives a manager as the engine would, with a fake K/V memory: writing token p of a sequence
    stores the prefix tokens[:p + 1] in its slot, so reading a wrong block shows."""

    def __init__(self, kv: KVCacheManager, rng: random.Random, copies: bool = False):
        self.kv, self.rng, self.B, self.copies = kv, rng, kv.block_size, copies
        self.memory = {b: [None] * self.B for b in range(kv.num_blocks)}
        self.seqs: dict[int, dict] = {}  # id -> {"tokens": [...], "computed": n}
        self.history: list[list[int]] = []
        self.templates = [[rng.randrange(3) for _ in range(rng.randrange(9))] for _ in range(3)]
        self.next_id = self.queries = self.hits = 0

    def prompt(self) -> list[int]:
        rng = self.rng
        pick = rng.random()
        if pick < 0.4 or not self.history:
            base = rng.choice(self.templates)
        elif pick < 0.7:
            base = rng.choice(self.history)  # the next turn of a chat, or the same prompt again
        else:
            base = rng.choice(self.history)
            base = base[:max(1, len(base) // self.B) * self.B]  # a whole number of blocks
        tail = [rng.randrange(3) for _ in range(rng.choice([0, 0, 1, 2, 3, 5]))]
        return (base + tail)[:24] or [0]

    def start(self):
        tokens, sid = self.prompt(), self.next_id
        whole = self.rng.random() < 0.7
        num_tokens = len(tokens) if whole else self.rng.randint(1, len(tokens))
        before, fits = snapshot(self.kv), self.kv.can_allocate(len(tokens))
        copied = []
        cached = self.kv.allocate(sid, tokens, num_tokens, copy=self.copy(copied) if self.copies else None)
        if cached is None:
            assert not (whole and fits), "can_allocate said yes"
            assert snapshot(self.kv) == before, "a failed allocate changed something"
            assert not copied, "a failed allocate copied"
            return
        assert 0 <= cached <= len(tokens) - 1, "the last prompt token must be computed"
        rows = sum(r for *_, r in copied)
        assert cached % self.B == rows and len(copied) <= 1, "a prefix ends inside a block only by a copy"
        if copied:
            src, dst, _ = copied[0]
            assert dst == self.kv.table(sid)[cached // self.B] and self.kv.blocks[dst].ref_count == 1, \
                "copied into a block the sequence does not hold alone"
        self.next_id += 1
        self.seqs[sid] = {"tokens": list(tokens), "computed": cached}
        self.history.append(list(tokens))
        self.queries, self.hits = self.queries + len(tokens), self.hits + cached

    def copy(self, copied):
        def copy(src, dst, rows):
            assert 0 < rows < self.B and src != dst, (src, dst, rows)
            assert self.kv.blocks[src].ref_count > 0 or src not in self.kv.free_block_ids(), \
                "copies from a block that a new block could have evicted"
            self.memory[dst][:rows] = self.memory[src][:rows]
            copied.append((src, dst, rows))
        return copy

    def compute(self, sid):
        """A prefill chunk or a decode step: write K/V of the tokens not yet computed that the table covers."""
        seq, table = self.seqs[sid], self.kv.table(sid)
        end = min(len(seq["tokens"]), len(table) * self.B)
        if end <= seq["computed"]:
            return
        end = self.rng.randint(seq["computed"] + 1, end)
        for p in range(seq["computed"], end):
            block = table[p // self.B]
            assert self.kv.blocks[block].ref_count == 1, f"sequence {sid} writes into shared block {block}"
            self.memory[block][p % self.B] = tuple(seq["tokens"][:p + 1])
        seq["computed"] = end
        self.kv.commit(sid, seq["tokens"], end)

    def grow(self, sid):
        seq = self.seqs[sid]
        tokens = seq["tokens"]
        prefill = seq["computed"] < len(tokens)
        if not prefill and len(tokens) >= 30:
            return
        target = min(len(tokens), seq["computed"] + self.rng.randint(1, 6)) if prefill else len(tokens) + 1
        before = snapshot(self.kv)
        if not self.kv.grow(sid, target):
            assert snapshot(self.kv) == before, "a failed grow changed something"
        elif not prefill:  # a sampled token, its K/V to be written by the next compute
            tokens.append(self.rng.randrange(3))
            self.history.append(list(tokens))

    def free(self, sid):
        self.kv.free(sid)
        if self.rng.random() < 0.2:
            self.kv.free(sid)
        del self.seqs[sid]

    def step(self):
        r = self.rng.random()
        if not self.seqs or (r < 0.25 and len(self.seqs) < 5):
            self.start()
        elif r < 0.999:
            sid = self.rng.choice(list(self.seqs))
            self.rng.choice([self.compute, self.compute, self.grow, self.grow, self.free])(sid)
        else:
            self.kv.reset_prefix_cache()
            self.queries = self.hits = 0
        self.check()

    def check(self):
        kv, B = self.kv, self.B
        holders: dict[int, list[tuple[int, int]]] = {b: [] for b in range(kv.num_blocks)}
        for sid, seq in self.seqs.items():
            table = kv.table(sid)
            assert len(table) * B >= seq["computed"]
            for i, block in enumerate(table):
                holders[block].append((sid, i))
            for p in range(seq["computed"]):  # what the sequence reads is what it would have computed
                assert self.memory[table[p // B]][p % B] == tuple(seq["tokens"][:p + 1]), f"{sid} reads wrong K/V"
        free = kv.free_block_ids()
        assert len(free) == len(set(free)) == kv.num_free_blocks
        for block in kv.blocks:
            held = holders[block.block_id]
            assert block.ref_count == len(held), "ref count is not the number of tables holding the block"
            assert (block.ref_count == 0) == (block.block_id in free), "neither held nor free, or both"
            if len(held) > 1:  # shared: full and computed by every holder
                assert all(self.seqs[sid]["computed"] >= (i + 1) * B for sid, i in held), "shares an unwritten block"
            if block.name is not None:  # a name tells the truth about the block's contents
                chain, name = [], block.name
                while name is not None:
                    chain[:0], name = name.token_ids, name.parent
                assert len(block.name.token_ids) == B, "names a partial block"
                expected = [tuple(chain[:len(chain) - B + j + 1]) for j in range(B)]
                assert self.memory[block.block_id] == expected, f"block {block.block_id} holds other K/V than named"
            if block.partial is not None:  # a freed sequence's partly written block tells the truth too
                chain, name = [], block.partial
                while name is not None:
                    chain[:0], name = name.token_ids, name.parent
                k = len(block.partial.token_ids)
                assert block.ref_count == 0 and 0 < k < B, "lends a block someone writes, or a full one"
                assert self.memory[block.block_id][:k] == [tuple(chain[:len(chain) - k + j + 1]) for j in range(k)]
        names = [b.name for b in kv.blocks if b.name is not None]
        assert len(set(names)) == len(names), "two blocks share a name"
        assert kv.num_used_blocks + kv.num_free_blocks == kv.num_blocks and 0 <= kv.usage <= 1
        if kv.prefix_caching:
            assert (kv.stats.queries, kv.stats.hits) == (self.queries, self.hits)
        else:
            assert kv.stats == PrefixCacheStats() and not names


def run(make=KVCacheManager, seeds=range(50), steps=400, copies=False, **kwargs):
    """Returns the statistics summed over the runs, so a test can see that it exercised hits and evictions."""
    total = PrefixCacheStats()
    for seed in seeds:
        rng = random.Random(seed)
        kv = make(num_blocks=rng.randint(3, 16), block_size=rng.choice([1, 2, 2, 3, 4]), **kwargs)
        engine = Engine(kv, rng, copies)
        for _ in range(steps):
            engine.step()
        total = PrefixCacheStats(*(a + b for a, b in zip(astuple(total), astuple(kv.stats))))
    return total


def test_random_engine_follows_the_rules():
    total = run()
    assert total.hits > 1000 and total.evictions > 100  # the runs did exercise sharing and eviction


def test_random_engine_with_prefixes_that_end_inside_a_block():
    assert run(copies=True).hits > 1.1 * run().hits  # the same calls: more of the prompts found cached


def test_random_engine_without_prefix_caching():
    run(prefix_caching=False, seeds=range(10))


def test_random_engine_with_every_digest_colliding(monkeypatch):
    monkeypatch.setattr(kv_blocks, "hash", lambda _: 7, raising=False)
    assert run(seeds=range(10)).hits > 100


# --- what a student might get wrong: each must fail the randomized run -------------------------------

class CachesTheWholePrompt(KVCacheManager):
    def _lookup(self, token_ids):
        return super()._lookup(token_ids + [None])  # as if there were no last token to compute


class SharesPartialBlocks(KVCacheManager):
    """Also names a written partial block, and a lookup may end on one."""

    def _lookup(self, token_ids):
        hits = super()._lookup(token_ids)
        rest = token_ids[len(hits) * self.block_size:len(token_ids) - 1]
        block = self._cached.get(BlockName(hits[-1].name if hits else None, rest)) if rest else None
        return hits + [block] if block else hits

    def commit(self, seq_id, token_ids, num_computed):
        super().commit(seq_id, token_ids, num_computed)
        seq, full = self._seqs[seq_id], num_computed // self.block_size * self.block_size
        name = BlockName(seq.names[-1] if seq.names else None, token_ids[full:num_computed])
        if full < num_computed and name not in self._cached:
            block = self.blocks[seq.table[len(seq.names)]]
            block.name, self._cached[name] = name, block


class KeepsTheNameOfAReusedBlock(KVCacheManager):
    def _take_free_block(self):
        block_id, _ = self._free.popitem(last=False)
        self.blocks[block_id].ref_count = 1
        return block_id


class LeavesHitsInTheFreeQueue(KVCacheManager):
    def _take_cached_block(self, block):
        block.ref_count += 1
        return block.block_id


class UnchainedName(BlockName):
    def __init__(self, parent, token_ids):
        super().__init__(None, token_ids)


class DigestOnlyName(BlockName):
    def __init__(self, parent, token_ids):
        super().__init__(parent, token_ids)
        self.digest %= 5  # a short hash...

    def __eq__(self, other):
        return self.digest == other.digest  # ...trusted without looking at the tokens

    __hash__ = BlockName.__hash__


class LendsOneRowTooMany(KVCacheManager):
    def _lender(self, token_ids, hits):
        block, rows = super()._lender(token_ids, hits)
        return block, rows + (block is not None and rows < self.block_size - 1)


@pytest.mark.parametrize("make", [CachesTheWholePrompt, SharesPartialBlocks, KeepsTheNameOfAReusedBlock,
                                  LeavesHitsInTheFreeQueue, LendsOneRowTooMany])
def test_a_wrong_manager_fails(make):
    with pytest.raises(AssertionError):
        run(make, seeds=range(20), copies=True)


@pytest.mark.parametrize("name", [UnchainedName, DigestOnlyName])
def test_wrong_names_fail(monkeypatch, name):
    monkeypatch.setattr(kv_cache, "BlockName", name)
    with pytest.raises(AssertionError):
        run(seeds=range(20))
