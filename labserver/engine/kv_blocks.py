"""A block of the KV cache as the block manager (``kv_cache.KVCacheManager``) sees it: who holds it, the
name of what it holds, and the prefix cache's counters. No tensor: the memory is the runner's.

Left out: where a block's K/V lie (``model.cache.PagedKVCache``) and which sequence holds which block
(the manager's block tables).
"""

from __future__ import annotations

from dataclasses import dataclass


class BlockName:
    """A full block's name: its token ids chained to the previous block's name.

    ``digest`` chains the parent's digest with the token ids (as nano-vllm's hash does) so hashing costs
    one block, not the whole prefix; equality compares the whole chain, so names equal only for equal
    prefixes. (A plain nested tuple ``(parent, token_ids)`` would be exact too, but hashing it walks the
    whole prefix every time.)
    """

    __slots__ = ("parent", "token_ids", "digest")

    def __init__(self, parent: BlockName | None, token_ids):
        self.parent, self.token_ids = parent, tuple(token_ids)
        self.digest = hash((parent.digest if parent else 0, self.token_ids))

    def __hash__(self) -> int:
        return self.digest

    def __eq__(self, other) -> bool:
        a, b = self, other
        while a is not b:  # a loop, not recursion: prefixes can be thousands of blocks long
            if not (isinstance(a, BlockName) and isinstance(b, BlockName)) or a.token_ids != b.token_ids:
                return False
            a, b = a.parent, b.parent
        return True


@dataclass
class Block:
    block_id: int
    ref_count: int = 0  # how many block tables hold it
    name: BlockName | None = None  # set when full and committed; kept while free, dropped when reused
    partial: BlockName | None = None  # a freed sequence's last, partly written block: what it holds


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up (the whole token_ids of each allocation)
    hits: int = 0  # of them, found cached
    evictions: int = 0  # named blocks taken from the free queue for something else

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
