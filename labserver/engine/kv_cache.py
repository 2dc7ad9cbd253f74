"""The KV cache as memory: paged blocks, reference counts and automatic prefix caching.

The model keeps the keys and values (K/V) of every token it has seen in a pool of equal blocks of
``block_size`` tokens. A sequence's *block table* lists its blocks in order: token ``p`` lives in slot
``p % block_size`` of block ``table[p // block_size]``. This module is only the bookkeeping of which block
belongs to whom; it never touches a tensor.

Prefix caching: once a block is full and its K/V written (``commit``), it gets a *name*: the previous
block's name chained with its own token ids. A token's K/V depends on every token before it, so equal
names mean equal K/V, and a later sequence whose tokens start the same way (a system prompt, a chat's
history with its earlier answers) takes the named blocks instead of computing them again. Names compare
exactly, the whole prefix, so a hash collision can never share a block wrongly.

A block held by k sequences has ``ref_count`` k. Shared blocks are full and read-only: a sequence writes
only into blocks it holds alone. So a lookup stops one token short: the last prompt token is always
computed, its logits give the first output token. A block nobody holds joins the free queue and keeps
its name, so a later lookup still finds it (and takes it back out). New blocks come from the head of the
queue, evicting the name they had. Freed named blocks join the tail, a sequence's last block first (the
longest prefixes are the least likely to be shared again), so the queue is least-recently-used order;
so does a sequence's last block written in part (it may lend its rows, below); freed blocks that hold
nothing worth keeping join the head.

Worked example, 4 tokens a block, 5 blocks:

>>> kv = KVCacheManager(num_blocks=5, block_size=4)
>>> prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]      # two full blocks and two tokens
>>> kv.allocate("a", prompt), kv.table("a")       # nothing cached yet: 0 cached tokens
(0, [0, 1, 2])
>>> kv.commit("a", prompt, 10)                    # K/V written: blocks 0 and 1 are named
>>> kv.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 42]), kv.table("b")   # 8 tokens cached, one to compute
(8, [0, 1, 3])
>>> kv.blocks[0].ref_count, kv.num_free_blocks
(2, 1)
>>> kv.free("a"); kv.free("b")
>>> kv.free_block_ids()    # 3 (b wrote nothing in it) first; a's last block 2 (9, 10) before the named ones
[3, 4, 2, 1, 0]
>>> kv.allocate("c", [1, 2, 3, 4, 0, 0, 0, 0, 0]), kv.table("c")   # hit on block 0, new blocks from the head
(4, [0, 3, 4])
>>> kv.allocate("d", list(range(100, 112))) is None    # needs 3 blocks, 2 are free: nothing changes
True
>>> kv.allocate("d", list(range(100, 108))), kv.table("d"), kv.stats   # takes 2, then evicts block 1
(0, [2, 1], PrefixCacheStats(queries=36, hits=12, evictions=1))

A prefix that ends inside a block is reused to the token when the engine can copy K/V (``copy``): of the
cached blocks after the hits (full ones, and finished sequences' last blocks, written in part), the one
whose tokens agree longest with the prompt's next ones lends its first rows, copied into the sequence's
own new block (which it goes on writing; a shared block is read-only). As in llama.cpp and SGLang (vLLM
stops at whole blocks), a question after a shared system prompt computes its own tokens only, and a
chat's next turn starts where the last answer's K/V ended. Here block 0 is shared, then 2 rows of block 1
are copied:

>>> kv = KVCacheManager(num_blocks=5, block_size=4)
>>> kv.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]); kv.commit("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 9)
0
>>> kv.allocate("b", [1, 2, 3, 4, 5, 6, 0, 0], copy=lambda *c: print("copy", c)), kv.table("b")
copy (1, 3, 2)
(6, [0, 3])

Left out: a radix tree (SGLang's; here a block's cached children are scanned), sliding windows,
several KV cache groups, and swapping blocks to host memory (a preempted sequence frees its blocks and is
recomputed later, mostly from its own cached blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .kv_blocks import Block, BlockName, PrefixCacheStats

__all__ = ["Block", "BlockName", "KVCacheManager", "PrefixCacheStats"]


@dataclass
class _Seq:
    table: list[int]
    names: list[BlockName] = field(default_factory=list)  # of its first len(names) blocks, full and written
    tail: tuple = ()  # the tokens written into the block after those, so far


class KVCacheManager:
    """Block tables for sequences over ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head: next to reuse
        self._cached: dict[BlockName, Block] = {}
        self._children: dict[BlockName | None, dict[int, Block]] = {}  # named blocks by their parent's name
        self._seqs: dict[Hashable, _Seq] = {}
        self.stats = PrefixCacheStats()

    def allocate(self, seq_id: Hashable, token_ids: list[int], num_tokens: int | None = None,
                 copy: Callable[[int, int, int], None] | None = None) -> int | None:
        """Give ``seq_id`` a table for its first ``num_tokens`` tokens (default: all ``token_ids``).

        Reuses the longest cached prefix of full blocks of ``token_ids``, at most ``len(token_ids) - 1``
        tokens, and returns its length; the table covers at least that. With ``copy(src, dst, rows)``, which
        copies the K/V of the first ``rows`` positions of block ``src`` into block ``dst``, the prefix may
        end inside a block (rows copied from a cached block into the sequence's own). Returns None, with
        nothing changed, when the free blocks cannot cover it.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        hits = self._lookup(token_ids)
        num_cached = len(hits) * self.block_size
        num_tokens = len(token_ids) if num_tokens is None else num_tokens
        lender, rows = self._lender(token_ids, hits) if copy and self.prefix_caching else (None, 0)
        need = sum(block.ref_count == 0 for block in hits)  # hits in the free queue come out of it
        num_new = self._blocks_for(max(num_tokens, num_cached + rows)) - len(hits)
        if lender is not None and num_new + need + (lender.ref_count == 0) > len(self._free):
            lender, rows = None, 0  # no room to hold the lender while it is copied: compute those rows
            num_new = self._blocks_for(max(num_tokens, num_cached)) - len(hits)
        if num_new + need > len(self._free):
            return None
        table = [self._take_cached_block(block) for block in hits]  # first: new blocks cannot evict them
        if lender is not None:
            self._take_cached_block(lender)  # held, so no new block evicts it before it is copied
        table += [self._take_free_block() for _ in range(num_new)]
        if lender is not None:
            copy(lender.block_id, table[len(hits)], rows)
            self._drop(lender.block_id)
        self._seqs[seq_id] = _Seq(table, [block.name for block in hits])
        num_cached += rows
        if self.prefix_caching:
            self.stats.queries += len(token_ids)
            self.stats.hits += num_cached
        return num_cached

    def grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Make the table cover ``num_tokens`` tokens; False, with nothing changed, if blocks run out."""
        table = self._seqs[seq_id].table
        num_new = self._blocks_for(num_tokens) - len(table)
        if num_new > len(self._free):
            return False
        table.extend(self._take_free_block() for _ in range(num_new))
        return True

    def commit(self, seq_id: Hashable, token_ids: list[int], num_computed: int) -> None:
        """The first ``num_computed`` of ``token_ids`` have their K/V written: name the newly full blocks."""
        seq = self._seqs[seq_id]
        if num_computed > min(len(token_ids), len(seq.table) * self.block_size):
            raise ValueError(f"{num_computed} tokens computed, but {len(token_ids)} tokens and "
                             f"{len(seq.table)} blocks of {self.block_size}")
        if not self.prefix_caching:
            return
        for i in range(len(seq.names), num_computed // self.block_size):
            name = BlockName(seq.names[-1] if seq.names else None, self._block_tokens(token_ids, i))
            if name in self._cached:  # computed twice (sequences ran side by side): keep the first copy
                name = self._cached[name].name
            else:
                block = self.blocks[seq.table[i]]
                block.name, self._cached[name] = name, block
                self._children.setdefault(name.parent, {})[block.block_id] = block
            seq.names.append(name)
        seq.tail = tuple(token_ids[len(seq.names) * self.block_size:num_computed])

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's table (again: nothing happens); named blocks stay cached until reused."""
        seq = self._seqs.pop(seq_id, None)
        if seq and seq.tail:  # its last block, written in part and never shared, may still lend its rows
            block = self.blocks[seq.table[len(seq.names)]]
            block.partial = BlockName(seq.names[-1] if seq.names else None, seq.tail)
            self._children.setdefault(block.partial.parent, {})[block.block_id] = block
        for block_id in reversed(seq.table if seq else []):  # tail first: evicted first
            self._drop(block_id)

    def _drop(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.name is None and block.partial is None:
                self._free.move_to_end(block_id, last=False)

    def table(self, seq_id: Hashable) -> list[int]:
        return list(self._seqs[seq_id].table)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` fit in the free blocks, ignoring hits: cheap, and never wrong when it says
        yes to ``allocate(seq_id, token_ids, num_tokens)`` with ``num_tokens >= len(token_ids) - 1``, as
        every hit either is held already or comes out of the free queue in place of a new block."""
        return self._blocks_for(num_tokens) <= len(self._free)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """The fraction of blocks held by some sequence (cached free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """The free queue, next to be reused first."""
        return list(self._free)

    def reset_prefix_cache(self) -> None:
        """Forget every name (blocks in use stay where they are) and zero the statistics."""
        for block in self._cached.values():
            block.name = None
        for block in self.blocks:
            block.partial = None
        self._cached.clear()
        self._children.clear()
        self.stats = PrefixCacheStats()

    def _lookup(self, token_ids: list[int]) -> list[Block]:
        """The cached blocks of the longest prefix of full blocks, leaving at least one token to compute."""
        hits: list[Block] = []
        if not self.prefix_caching:
            return hits
        for i in range((len(token_ids) - 1) // self.block_size):
            name = BlockName(hits[-1].name if hits else None, self._block_tokens(token_ids, i))
            block = self._cached.get(name)
            if block is None:
                break
            hits.append(block)
        return hits

    def _lender(self, token_ids: list[int], hits: list[Block]) -> tuple[Block | None, int]:
        """The cached block after ``hits`` that agrees longest with the prompt's next tokens (at most up to
        its last token, which is always computed), and how many of its first positions agree."""
        start = len(hits) * self.block_size
        want = token_ids[start:min(start + self.block_size, len(token_ids) - 1)]
        best, rows = None, 0
        for block in self._children.get(hits[-1].name if hits else None, {}).values() if want else ():
            held = (block.name or block.partial).token_ids
            agree = next((i for i, (a, b) in enumerate(zip(held, want)) if a != b), min(len(held), len(want)))
            if agree > rows:
                best, rows = block, agree
        return best, rows

    def _take_cached_block(self, block: Block) -> int:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1
        return block.block_id

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.name is not None or block.partial is not None:
            held = block.name or block.partial
            siblings = self._children[held.parent]
            del siblings[block_id]
            if not siblings:
                del self._children[held.parent]
        if block.name is not None:
            del self._cached[block.name]
            block.name = None
            self.stats.evictions += 1
        block.partial = None
        block.ref_count = 1
        return block_id

    def _block_tokens(self, token_ids: list[int], i: int) -> list[int]:
        return token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
