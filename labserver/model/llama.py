"""A lean llama forward in plain PyTorch: the weights of a transformers model, none of its machinery.

A decode step of SmolLM2-135M spends more time in Python and small ops than in reading weights. This
module keeps only what a llama needs: fused projections (one matmul for q, k and v; one for gate and up),
a paged KV cache (``cache.py``: a pool of blocks, each sequence's positions found through its block
table), rotary tables computed once, and its matrices in one weight format of the registry
(``formats.py``: dense float32 or bfloat16, float16, GGUF blocks). When every matrix is in
blocks the whole forward runs as C calls (``fused.FusedDecode``); otherwise torch's attention reads the
cache (``attention.py``). It builds from any object with a transformers-style ``config`` and
``state_dict()``: a transformers model, or a memory-mapped ``checkpoint.Checkpoint``.

``forward`` takes the new tokens of several sequences, each continuing its sequence from any position
(``Chunk``): decode steps of many sequences, prompts, chunks of a prompt, a prompt after a prefix whose
blocks another sequence wrote, or a mix of these, in one call; the shape continuous batching and chunked
prefill need. ``prefill``, ``prefill_many`` and ``decode`` are its common cases.

Left out on purpose: other architectures (``supports`` says no and the caller keeps transformers),
attention or MLP biases, sliding windows, rope scalings other than linear and llama3, which blocks a
sequence gets (the caller's block tables say: see ``engine/runners.py``), and training.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from . import formats as registry
from .attention import Chunk, PagedAttention
from .blocks import BlockStore
from .cache import PagedKVCache, tables_tensor
from .fused import FusedDecode
from .linear import Fp16, Linear  # noqa: F401  (Fp16: still importable from here)

ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config) -> dict:
    """Rotary settings from either config style: transformers 5's ``rope_parameters`` or older
    ``rope_theta`` + ``rope_scaling`` (whose type may be spelled ``type``)."""
    p = {**(getattr(config, "rope_scaling", None) or {}), **(getattr(config, "rope_parameters", None) or {})}
    p.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    p["rope_type"] = p.get("rope_type", p.get("type", "default"))
    return p


def supports(model) -> bool:
    """True for the llama family this module implements; anything else stays on transformers."""
    c = model.config
    return (getattr(c, "model_type", None) == "llama" and getattr(c, "hidden_act", "silu") == "silu"
            and not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False)
            and rope_parameters(c)["rope_type"] in ROPE_TYPES
            and getattr(c, "partial_rotary_factor", 1.0) == 1.0)


def rope_tables(config, head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [max_len, head_dim]`` computed as transformers computes them (the oracle test checks)."""
    p = rope_parameters(config)
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if p["rope_type"] == "linear":
        inv_freq = inv_freq / p["factor"]
    elif p["rope_type"] == "llama3":  # long wavelengths slowed by `factor`, short kept, a blend between
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    freqs = torch.arange(max_len).float()[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


class LeanLlama:
    """Llama inference over a paged cache: ``forward(chunks) -> logits [len(chunks), V]``.

    ``model`` is anything with a transformers-style ``config`` and ``state_dict()``: a transformers model
    or a ``checkpoint.Checkpoint``. The weights are copied into this class's own layouts, in the format
    ``quant`` names in ``formats.FORMATS`` ("none": ``dtype`` itself).

    Public parts, what ``fused.FusedDecode`` reads: ``layers`` (per layer a dict of ``ln1``, ``qkv``,
    ``o``, ``ln2``, ``gate_up``, ``down``: norms as float32 tensors, matrices as ``linear.Linear``),
    ``lm_head``, ``norm``, ``embed [V, D]``, ``cos`` and ``sin [max_len, Dh]`` (``sin`` carrying
    rotate_half's signs), ``cache`` (a ``PagedKVCache``), and the sizes ``eps``, ``heads``, ``kv_heads``,
    ``head_dim``, ``intermediate``, ``vocab``, ``max_len`` (positions a sequence may reach).

    The cache has ``num_blocks`` blocks of ``block_size`` positions (default: room for one sequence of
    ``max_len``); ``new_cache`` replaces it.
    """

    FUSED_PREFILL_MAX = 512  # rows per C call: a longer forward runs as several, each continuing the last

    def __init__(self, model, dtype=torch.float32, quant="none", max_len=2048, blocks_file=None, block_size=16,
                 num_blocks=None):
        if not supports(model):
            raise ValueError(f"LeanLlama supports llama models only, not {model.config.model_type!r}")
        fmt = registry.get(quant)
        fmt.check(dtype)
        c, w = model.config, model.state_dict()
        self.quant, self.dtype, self.eps = quant, dtype, c.rms_norm_eps
        self.heads, self.kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.intermediate, self.vocab = c.intermediate_size, c.vocab_size
        self.n_qk = (self.heads + self.kv_heads) * self.head_dim  # q and k get rotary, v does not
        store = BlockStore(blocks_file) if fmt.blocks else None  # blocks quantized by an earlier start, if any

        def matrix(name, parts):
            return fmt.build(name, parts, dtype, store)

        def layer(i):
            def get(name, p=f"model.layers.{i}."):
                return w[p + name + ".weight"]

            def proj(*names, module="self_attn"):
                return [get(f"{module}.{n}_proj") for n in names]

            return dict(
                ln1=get("input_layernorm").float(),
                qkv=matrix(f"layers.{i}.qkv", proj("q", "k", "v")),
                o=matrix(f"layers.{i}.o", proj("o")),
                ln2=get("post_attention_layernorm").float(),
                gate_up=matrix(f"layers.{i}.gate_up", proj("gate", "up", module="mlp")),
                down=matrix(f"layers.{i}.down", proj("down", module="mlp")))

        # Packing (fbgemm's float16 layout) runs on one core per matrix: spread the
        # matrices over short-lived threads, one per torch thread (2.0 s instead of 3.2 s here for float16).
        with ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="lean-build") as pool:
            lm_head = pool.submit(matrix, registry.HEAD, [w["lm_head.weight"]])
            self.layers = list(pool.map(layer, range(c.num_hidden_layers)))
            self.lm_head = lm_head.result()
        if store is not None:
            store.save({f"layers.{i}.{k}": m for i, p in enumerate(self.layers) for k, m in p.items()}
                       | {registry.HEAD: self.lm_head})
        self.embed = w["model.embed_tokens.weight"].float()  # [V, D]
        self.norm = w["model.norm.weight"].float()
        half = self.head_dim // 2
        cos, sin = rope_tables(c, self.head_dim, max_len)
        self.cos, self.max_len = cos, max_len
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], -1)  # signs of rotate_half
        self.new_cache(num_blocks or -(-max_len // block_size), block_size)
        # The whole forward as C calls, when every matrix is in GGUF blocks.
        self.fused = FusedDecode(self) if fmt.blocks and FusedDecode.usable(self) else None

    def new_cache(self, num_blocks: int, block_size: int | None = None) -> None:
        """A pool of ``num_blocks`` blocks of ``block_size`` positions (default: the current size), float32,
        replacing the old one and whatever it held."""
        block_size = block_size or self.cache.block_size
        self.cache = PagedKVCache(len(self.layers), self.kv_heads, self.head_dim, block_size, num_blocks)

    def formats(self) -> list[str]:
        """The storage formats of the matrices, e.g. ``["q4_1", "q8_0"]``."""
        def name(m):
            return getattr(m, "format", type(m).__name__.lower())

        return sorted({name(m) for p in self.layers for m in p.values() if isinstance(m, Linear)} | {name(self.lm_head)})

    def weight_bytes(self) -> int:
        """Bytes a decode step reads: every layer's matrices and norms, the output matrix, one embedding row."""
        def nbytes(t):
            return t.numel() * t.element_size()

        layers = sum(v.nbytes if isinstance(v, Linear) else nbytes(v) for p in self.layers for v in p.values())
        return layers + self.lm_head.nbytes + nbytes(self.norm) + nbytes(self.embed[0])

    def _forward(self, x, positions, attend):
        """Run every block on ``x [N, D]``; ``attend`` stores k, v and returns attention ``[N, H*Dh]``."""
        n, d = x.shape
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [N, 1, Dh]
        for i, p in enumerate(self.layers):
            h = F.rms_norm(x, (d,), p["ln1"], self.eps).to(self.dtype)
            qkv = p["qkv"](h).float()  # [N, (H + 2*Hkv) * Dh]
            qk = qkv[:, :self.n_qk].view(n, -1, self.head_dim)  # [N, H + Hkv, Dh]
            # Rotary on q and k at once: x*cos + rotate_half(x)*sin, with rotate_half as a roll.
            qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, -1), sin)
            v = qkv[:, self.n_qk:].view(n, self.kv_heads, self.head_dim)  # [N, Hkv, Dh]
            x = p["o"].add(x, attend(i, qk[:, :self.heads], qk[:, self.heads:], v).to(self.dtype))
            h = F.rms_norm(x, (d,), p["ln2"], self.eps).to(self.dtype)
            gate, up = p["gate_up"](h).chunk(2, dim=-1)  # [N, I] each
            x = p["down"].add(x, F.silu(gate).mul_(up))
        return x

    def _logits(self, x):
        return self.lm_head(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps).to(self.dtype)).float()  # [N, V]

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run each chunk's new tokens; return the logits after each chunk's last one ``[len(chunks), V]``.

        A chunk is ``(ids, start, table)`` (``attention.Chunk``): ``ids`` continue a sequence whose first
        ``start`` positions its blocks hold already (written by earlier calls, or by another sequence that
        shares those blocks), and its block table covers ``start + len(ids)`` positions. Each token's key
        and value go to its position; each token attends to its sequence's positions up to its own.
        A decode step is a chunk of one token; a prompt a chunk from 0; chunks of several sequences may
        mix in one call (one product of all their rows: the weights are read once).

        On the C route, a token's logits do not depend on how its prompt was cut into chunks or where its
        blocks are, to the bit, as long as every call keeps its rows on the same products (kernels.c: one
        row, 2 to 4 rows, or more than 4, the panels; the output matrix: one wanted row, or several).
        """
        chunks = [Chunk(list(ids), int(start), list(table)) for ids, start, table in chunks]
        for c in chunks:
            end = c.start + len(c.ids)
            if not c.ids or c.start < 0:
                raise ValueError(f"a chunk needs new tokens and a start >= 0: {len(c.ids)} at {c.start}")
            if end > self.max_len:
                raise ValueError(f"a sequence of {end} tokens exceeds the model's {self.max_len} positions")
            self.cache.check(c.table, end)
        return self._fused(chunks) if self.fused is not None else self._torch(chunks)

    def _fused(self, chunks: list[Chunk]) -> torch.Tensor:
        """``forward`` as C calls of at most ``FUSED_PREFILL_MAX`` rows, of nearly equal size: a long prompt
        runs as consecutive calls, each continuing from the keys the last one wrote."""
        lengths = torch.tensor([len(c.ids) for c in chunks])
        tokens = torch.tensor([t for c in chunks for t in c.ids])
        pos = torch.cat([torch.arange(c.start, c.start + len(c.ids)) for c in chunks])
        seqs = torch.repeat_interleave(torch.arange(len(chunks)), lengths)
        tables, last = tables_tensor([c.table for c in chunks]), lengths.cumsum(0) - 1
        n = tokens.shape[0]
        calls = -(-n // self.FUSED_PREFILL_MAX)
        cuts = [n * i // calls for i in range(calls + 1)]
        logits = torch.empty(len(chunks), self.vocab)
        for r0, r1 in zip(cuts, cuts[1:]):
            ends = (last >= r0) & (last < r1)  # the chunks whose last token is in this call
            logits[ends] = self.fused(tokens[r0:r1], pos[r0:r1], seqs[r0:r1], tables, last[ends] - r0)
        return logits

    def _torch(self, chunks: list[Chunk]) -> torch.Tensor:
        """``forward`` in torch, attention through ``attention.PagedAttention``."""
        tokens = torch.tensor([t for c in chunks for t in c.ids])
        pos = torch.cat([torch.arange(c.start, c.start + len(c.ids)) for c in chunks])
        last = torch.tensor([len(c.ids) for c in chunks]).cumsum(0) - 1
        x = self._forward(self.embed[tokens], pos, PagedAttention(self.cache, chunks, self.heads))
        return self._logits(x[last])

    def prefill(self, ids: list[int], table: list[int]) -> torch.Tensor:
        """Fill the blocks of ``table`` with the prompt ``ids`` (from position 0); return the last logits ``[V]``."""
        return self.forward([Chunk(ids, 0, table)])[0]

    def prefill_many(self, prompts: list[list[int]], tables: list[list[int]]) -> torch.Tensor:
        """Prefill each prompt into its blocks in one forward; return each one's last logits ``[len(prompts), V]``."""
        return self.forward([Chunk(ids, 0, table) for ids, table in zip(prompts, tables)])

    def decode(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Append ``tokens[b]`` at ``positions[b]`` (the tokens its sequence holds) of the sequence with block
        table ``tables[b]``, for each b; return next-token logits ``[B, V]``."""
        return self.forward([Chunk([t], p, table) for t, p, table in zip(tokens, positions, tables)])
