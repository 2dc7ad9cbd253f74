"""A lean llama forward in plain PyTorch: the weights of a transformers model, none of its machinery.

A decode step of SmolLM2-135M spends more time in Python and small ops than in reading weights. This
module keeps only what a llama needs: fused projections (one matmul for q, k and v; one for gate and up),
a preallocated KV cache with one slot per sequence (``cache.py``), rotary tables computed once, and its
matrices in one weight format of the registry (``formats.py``: dense float32 or bfloat16, float16, int8,
int4, GGUF blocks). When every matrix is in blocks the decode step runs as one C call
(``fused.FusedDecode``). It builds from any object with a transformers-style ``config`` and
``state_dict()``: a transformers model, or a memory-mapped ``checkpoint.Checkpoint``.

``decode`` advances B sequences by one token in one forward call, each at its own position in its own
cache slot: the shape continuous batching needs. ``prefill`` fills one slot from position 0,
``prefill_many`` several prompts' slots in one call.

Left out on purpose: other architectures (``supports`` says no and the caller keeps transformers),
attention or MLP biases, sliding windows, rope scalings other than linear and llama3, prefill that
continues a filled slot, a paged cache (all slots share one position axis that grows as the longest
sequence does), and training.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from . import formats as registry
from .blocks import BlockStore
from .cache import KVCache
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
    """Llama inference: ``prefill(ids, slot) -> logits [V]``, ``decode(tokens, slots) -> logits [B, V]``.

    ``model`` is anything with a transformers-style ``config`` and ``state_dict()``: a transformers model
    or a ``checkpoint.Checkpoint``. The weights are copied into this class's own layouts, in the format
    ``quant`` names in ``formats.FORMATS`` ("none": ``dtype`` itself).

    Public parts, what ``fused.FusedDecode`` reads: ``layers`` (per layer a dict of ``ln1``, ``qkv``,
    ``o``, ``ln2``, ``gate_up``, ``down``: norms as float32 tensors, matrices as ``linear.Linear``),
    ``lm_head``, ``norm``, ``embed [V, D]``, ``cos`` and ``sin [max_len, Dh]`` (``sin`` carrying
    rotate_half's signs), ``cache``, and the sizes ``eps``, ``heads``, ``kv_heads``, ``head_dim``,
    ``intermediate``, ``vocab``.
    """

    FUSED_PREFILL_MAX = 512  # prompt tokens per C call; beyond, each prompt goes through torch's attention

    def __init__(self, model, dtype=torch.float32, quant="none", max_batch=1, max_len=2048, blocks_file=None):
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

        # Packing (fbgemm's float16 layout, the int4 layout) runs on one core per matrix: spread the
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
        self.cos = cos
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], -1)  # signs of rotate_half
        self.new_cache(max_batch)
        # The whole decode step as one C call, when every matrix is in GGUF blocks.
        self.fused = FusedDecode(self) if fmt.blocks and FusedDecode.usable(self) else None

    def new_cache(self, max_batch: int) -> None:
        """An empty cache of ``max_batch`` slots (the positions this model was built for), replacing the old."""
        self.cache = KVCache(len(self.layers), max_batch, self.kv_heads, self.cos.shape[0], self.head_dim,
                             torch.float32)

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

    def prefill(self, ids: list[int], slot: int = 0) -> torch.Tensor:
        """Fill cache ``slot`` with the prompt ``ids`` (from position 0); return the last logits ``[V]``."""
        return self.prefill_many([ids], [slot])[0]

    @torch.inference_mode()
    def prefill_many(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Prefill each prompt into its slot; return each prompt's last logits ``[len(prompts), V]``.

        With the fused step, prompts whose tokens add up to at most ``FUSED_PREFILL_MAX`` run as one C call:
        their positions are rows of one product, which keeps the weights busier than one prompt's rows.
        """
        lengths = [len(ids) for ids in prompts]
        if max(lengths) > self.cache.max_len:
            raise ValueError(f"prompt of {max(lengths)} tokens exceeds the cache's {self.cache.max_len}")
        self.cache.reserve(max(lengths))
        # A prompt's attention is a plain loop there, so long prompts go to torch's fused attention instead.
        if self.fused is None or sum(lengths) > self.FUSED_PREFILL_MAX:
            return torch.stack([self._prefill_one(ids, slot) for ids, slot in zip(prompts, slots)])
        pos = torch.cat([torch.arange(n) for n in lengths])
        rows = torch.tensor(lengths).cumsum(0) - 1  # each prompt's last position
        logits = self.fused(torch.tensor([t for ids in prompts for t in ids]), pos,
                            torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths)), max(lengths), rows)
        for slot, n in zip(slots, lengths):
            self.cache.lengths[slot] = n
        return logits

    def _prefill_one(self, ids: list[int], slot: int) -> torch.Tensor:
        """One prompt through torch's attention around the layers' products."""
        s = len(ids)
        kc, vc = self.cache.k, self.cache.v

        def attend(i, q, k, v):  # q [S, H, Dh]; k, v [S, Hkv, Dh]
            kc[i, slot, :, :s], vc[i, slot, :, :s] = k.transpose(0, 1), v.transpose(0, 1)
            out = F.scaled_dot_product_attention(  # [1, H, S, Dh]
                q.transpose(0, 1)[None], kc[i, slot:slot + 1, :, :s], vc[i, slot:slot + 1, :, :s],
                is_causal=True, enable_gqa=True)
            return out[0].transpose(0, 1).reshape(s, -1)

        x = self._forward(self.embed[torch.tensor(ids)], torch.arange(s), attend)
        self.cache.lengths[slot] = s
        return self._logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        """Append ``tokens[b]`` to sequence ``slots[b]`` for each b; return next-token logits ``[B, V]``.

        Sequences may sit at different positions. Consecutive slots are read as a view; any other
        set is gathered (a copy), so a scheduler should keep running sequences in a block of slots.
        """
        b, lengths = len(slots), self.cache.lengths
        pos = [lengths[s] for s in slots]
        if max(pos) >= self.cache.max_len:
            raise ValueError(f"a sequence reached the cache's {self.cache.max_len} tokens")
        self.cache.reserve(max(pos) + 1)
        consecutive = slots == list(range(slots[0], slots[0] + b))
        rows = slice(slots[0], slots[0] + b) if consecutive else torch.tensor(slots)
        logits = self.decode_step(torch.tensor(tokens), torch.tensor(pos), torch.tensor(slots), rows, max(pos) + 1)
        for s in slots:
            lengths[s] += 1
        return logits

    def decode_step(self, tokens, pos, slots, rows, t):
        """The tensor part of ``decode``: tokens, pos, slots ``[B]``; keys up to position ``t`` are read."""
        if self.fused is not None:
            return self.fused(tokens, pos, slots, t)
        b, kc, vc = tokens.shape[0], self.cache.k, self.cache.v
        # Keys past a sequence's own length belong to nobody (or to a longer neighbour): mask them.
        mask = None if b == 1 else torch.zeros(b, 1, 1, t).masked_fill_(
            torch.arange(t) > pos.view(b, 1, 1, 1), float("-inf"))
        group = self.heads // self.kv_heads
        # Where each new key lands in the cache seen as rows of head_dim, for every layer at once:
        # one index_copy_ per layer instead of an advanced-indexing assignment (measured faster).
        layers, n_slots, kv_heads, length, _ = kc.shape
        rows_of = ((slots[:, None] * kv_heads + torch.arange(kv_heads)) * length + pos[:, None]).view(-1)
        rows_of = rows_of + torch.arange(layers)[:, None] * (n_slots * kv_heads * length)  # [L, B * Hkv]
        k_rows, v_rows = kc.view(-1, self.head_dim), vc.view(-1, self.head_dim)

        def attend(i, q, k, v):  # q [B, H, Dh]; k, v [B, Hkv, Dh]
            k_rows.index_copy_(0, rows_of[i], k.reshape(-1, self.head_dim))
            v_rows.index_copy_(0, rows_of[i], v.reshape(-1, self.head_dim))
            # The `group` query heads that share a kv head act as a query "sequence" of that length.
            out = F.scaled_dot_product_attention(  # [B, Hkv, group, Dh]
                q.reshape(b, self.kv_heads, group, self.head_dim), kc[i, rows, :, :t], vc[i, rows, :, :t],
                attn_mask=mask)
            return out.reshape(b, -1)

        return self._logits(self._forward(self.embed[tokens], pos, attend))
