"""The KV cache of the lean llama as memory: a pool of fixed-size blocks that sequences' block tables point into.

A sequence's keys and values live in blocks of ``block_size`` positions: position p in block
``table[p // block_size]`` at offset ``p % block_size``, where ``table`` (its block table) is a list of
block ids. Blocks need not be adjacent nor in order, and two sequences may list the same block (a prefix
one wrote and the other reads).

>>> cache = PagedKVCache(layers=2, kv_heads=2, head_dim=4, block_size=16, num_blocks=8)
>>> cache.bytes_per_block, cache.bytes_per_token  # k and v of 2 layers x 2 heads x 4 floats per position
(2048, 128)
>>> cache.blocks_for(33), location([5, 2, 7], 33, 16)  # 33 positions take 3 blocks; position 33 is in block 7
(3, (7, 1))

Left out: which block a sequence gets, sharing and eviction (the caller's block manager decides and hands
over tables), and any zeroing: the pool is fresh memory that the operating system maps as it is first
written, so memory follows the blocks in use, not the pool's size, and no route reads a position no
sequence has written (whatever the memory held there never matters).
"""

from __future__ import annotations

import torch


class PagedKVCache:
    """Keys ``k`` and values ``v`` of every layer, ``[num_blocks, layers, kv_heads, block_size, head_dim]`` each.

    Block-major: one block (every layer's keys, or values, of ``block_size`` positions) is one contiguous
    range, so the memory a run touches is that of the blocks it uses; a block manager that hands out low
    ids first keeps it at the front of the pool.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype=torch.float32):
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"a pool needs blocks of at least one position: {num_blocks} x {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_blocks, layers, kv_heads, block_size, head_dim)
        # torch.empty, not zeros: a large allocation is mapped lazily, and zeroing would touch all of it.
        self.k, self.v = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        self.bytes_per_block = 2 * self.k[0].numel() * self.k.element_size()
        self.bytes_per_token = self.bytes_per_block // block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` positions needs."""
        return -(-tokens // self.block_size)

    def copy_rows(self, src: int, dst: int, rows: int) -> None:
        """Copy the keys and values of block ``src``'s first ``rows`` positions, every layer, into block
        ``dst`` (a prefix that ends inside a block: the sequence writes on into its own copy)."""
        self.k[dst, :, :, :rows] = self.k[src, :, :, :rows]
        self.v[dst, :, :, :rows] = self.v[src, :, :, :rows]

    def check(self, table: list[int], tokens: int) -> None:
        """Raise ``ValueError`` unless ``table`` holds ``tokens`` positions in blocks of this pool."""
        if len(table) < self.blocks_for(tokens):
            raise ValueError(f"a block table of {len(table)} blocks holds {len(table) * self.block_size} "
                             f"positions, not {tokens}")
        if table and not 0 <= min(table) <= max(table) < self.num_blocks:
            raise ValueError(f"block ids must lie in 0..{self.num_blocks - 1}: {table}")


def location(table: list[int], position: int, block_size: int) -> tuple[int, int]:
    """``(block id, offset)`` where ``position`` of the sequence with block table ``table`` lives."""
    return table[position // block_size], position % block_size


def tables_tensor(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one ``[len(tables), widest]`` long tensor, shorter ones padded with block 0 (the
    padding is never read: a sequence reads only positions it holds)."""
    width = max(1, max(len(t) for t in tables))
    out = torch.zeros(len(tables), width, dtype=torch.long)
    for i, t in enumerate(tables):
        out[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return out
