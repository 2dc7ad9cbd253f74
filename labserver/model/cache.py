"""The KV cache of the lean llama: one slot per sequence, a position axis that grows on demand.

Left out: paging (all slots share one position axis), eviction and prefix sharing.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for ``max_batch`` sequences (slots) of up to ``max_len`` tokens, every layer.

    The position axis grows on demand (doubling, up to ``max_len``) so memory follows the longest
    sequence in use, not the longest one allowed: a cache sized for 16 x 6144 tokens up front costs
    gigabytes, and lazily mapped pages would fault in whole huge pages (measured: ~0.8 s for a slot's
    first prefill). Zero-filled so the positions a shorter sequence masks out in a batch hold finite
    numbers (a masked score times a NaN value would still be NaN).
    """

    def __init__(self, layers, max_batch, kv_heads, max_len, head_dim, dtype, initial_len=512):
        self.shape = (layers, max_batch, kv_heads, min(initial_len, max_len), head_dim)  # [L, S, Hkv, T, Dh]
        self.k, self.v = torch.zeros(self.shape, dtype=dtype), torch.zeros(self.shape, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * max_batch  # tokens held by each slot
        self.free = list(range(max_batch))

    def reserve(self, length: int) -> None:
        """Make room for positions ``0 .. length - 1`` in every slot (``length <= max_len``)."""
        if length <= self.k.shape[3]:
            return
        new_len = min(self.max_len, max(length, 2 * self.k.shape[3]))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], new_len, old.shape[4])
            new[:, :, :, :old.shape[3]] = old
            setattr(self, name, new)

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError(f"all {len(self.lengths)} cache slots are in use")
        # The lowest free slot keeps running sequences in a block, which decode reads as a view.
        slot = min(self.free)
        self.free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)
