"""Attention over the paged KV cache in plain torch: the lean llama's route when its fused C step is not usable.

One ``PagedAttention`` serves one forward of ``LeanLlama``: its rows are the new tokens of several
sequences (``Chunk``: a decode step is one token, a prompt or a chunk of one several), each at positions
``start ..`` of its sequence. Per layer it writes every row's key and value where the sequence's block
table puts them, then each row attends to its sequence's positions up to its own:

- one-token chunks (decode steps) together in one ``scaled_dot_product_attention``: each sequence's
  written positions gathered through its table, a shorter one padded by repeating its last position
  (a written, finite value) under a mask;
- a prompt from position 0 on its own new keys and values, causal (nothing to gather);
- a chunk that continues a sequence on its gathered positions, the mask shifted by ``start``.

Left out: reading blocks in place (torch's attention wants each sequence's keys contiguous, so they are
gathered: a copy per layer), and any position no row has written (never gathered, so never read).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cache import tables_tensor


class Chunk(NamedTuple):
    """New tokens of one sequence: ``ids`` go to positions ``start .. start + len(ids) - 1``, after the
    ``start`` tokens its blocks already hold; ``table`` is its block table, covering at least
    ``start + len(ids)`` positions."""

    ids: list[int]
    start: int
    table: list[int]


class PagedAttention:
    """``attention(layer, q, k, v) -> [N, H * Dh]`` for one forward of ``chunks`` over ``cache``.

    q ``[N, H, Dh]``, k and v ``[N, Hkv, Dh]``: the forward's rows, chunk after chunk.
    """

    def __init__(self, cache, chunks: list[Chunk], heads: int):
        _, layers, self.kv_heads, bs, self.head_dim = cache.k.shape
        self.heads, self.group = heads, heads // self.kv_heads
        self.k_rows, self.v_rows = cache.k.view(-1, self.head_dim), cache.v.view(-1, self.head_dim)
        self.layer_rows = self.kv_heads * bs  # rows of Dh floats from one layer of a block to the next
        tables, heads_rows = tables_tensor([c.table for c in chunks]), torch.arange(self.kv_heads) * bs

        def rows(seq, positions):  # [..., Hkv]: layer 0's rows of these positions of these chunks' sequences
            at = tables[seq, positions // bs] * (layers * self.layer_rows) + positions % bs
            return at[..., None] + heads_rows

        lengths = [len(c.ids) for c in chunks]
        self.bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()  # chunk i's rows: bounds[i] .. bounds[i+1]
        seq = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(lengths))
        pos = torch.cat([torch.arange(c.start, c.start + n) for c, n in zip(chunks, lengths)])
        self.writes = rows(seq, pos).reshape(-1)  # [N * Hkv], as k.reshape(-1, Dh)
        self.singles = [i for i, n in enumerate(lengths) if n == 1]
        self.prompts = [i for i, n in enumerate(lengths) if n > 1 and chunks[i].start == 0]
        self.continued = [i for i, n in enumerate(lengths) if n > 1 and chunks[i].start > 0]
        if self.singles:
            singles = torch.tensor(self.singles)
            seen = torch.tensor([chunks[i].start + 1 for i in self.singles])  # positions each one attends to
            t = int(seen.max())
            upto = torch.minimum(torch.arange(t), seen[:, None] - 1)  # [B, T]: past the end, its last again
            self.single_rows = rows(singles[:, None], upto).transpose(1, 2).contiguous()  # [B, Hkv, T]
            self.single_mask = None if len(set(seen.tolist())) == 1 else \
                (torch.arange(t) < seen[:, None]).view(len(self.singles), 1, 1, t)
            self.single_at = torch.tensor([self.bounds[i] for i in self.singles])
        self.gather = {}  # chunk -> (its rows [Hkv, T], the mask [n, T]: key j for query i iff j <= start + i)
        for i in self.continued:
            c, n = chunks[i], lengths[i]
            t = c.start + n
            self.gather[i] = (rows(i, torch.arange(t)).T.contiguous(),
                              torch.arange(t)[None, :] <= c.start + torch.arange(n)[:, None])

    def __call__(self, layer: int, q, k, v):
        offset = layer * self.layer_rows
        self.k_rows.index_copy_(0, self.writes + offset, k.reshape(-1, self.head_dim))
        self.v_rows.index_copy_(0, self.writes + offset, v.reshape(-1, self.head_dim))
        out = q.new_empty(q.shape[0], self.heads * self.head_dim)
        if self.singles:
            out.index_copy_(0, self.single_at, self._steps(q[self.single_at], self.single_rows + offset))
        for i in self.prompts:  # its keys are its own rows: no gather
            r0, r1 = self.bounds[i], self.bounds[i + 1]
            out[r0:r1] = self._sdpa(q[r0:r1], k[r0:r1].transpose(0, 1), v[r0:r1].transpose(0, 1), None)
        for i in self.continued:
            r0, r1 = self.bounds[i], self.bounds[i + 1]
            rows, mask = self.gather[i]
            out[r0:r1] = self._sdpa(q[r0:r1], *self._read(rows + offset), mask)
        return out

    def _read(self, rows):
        """Keys and values at ``rows`` (any shape ``[..., T]``): ``[..., T, Dh]`` each."""
        flat = rows.reshape(-1)
        shape = (*rows.shape, self.head_dim)
        return self.k_rows.index_select(0, flat).view(shape), self.v_rows.index_select(0, flat).view(shape)

    def _sdpa(self, q, keys, values, mask):
        """One sequence's rows q ``[n, H, Dh]`` on keys and values ``[Hkv, T, Dh]``; causal without a mask."""
        out = F.scaled_dot_product_attention(  # [1, H, n, Dh]
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None,
            enable_gqa=True)
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)

    def _steps(self, q, rows):
        """One row of each of B sequences: q ``[B, H, Dh]``, their key rows ``[B, Hkv, T]``."""
        b = q.shape[0]
        keys, values = self._read(rows)  # [B, Hkv, T, Dh]
        # The `group` query heads that share a kv head act as a query "sequence" of that length.
        out = F.scaled_dot_product_attention(  # [B, Hkv, group, Dh]
            q.reshape(b, self.kv_heads, self.group, self.head_dim), keys, values, attn_mask=self.single_mask)
        return out.reshape(b, -1)
