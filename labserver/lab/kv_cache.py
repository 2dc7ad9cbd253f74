"""Notebook 8's experiments (the KV cache): the memory one long request takes, prefix caching as a client
sees it (a shared system prompt, a multi-turn chat), and the running streams' gaps when a long prompt
arrives, with and without chunked prefill. Every length comes from the speed measured at the top:

    >>> s = Sizes(step_ms=4.0, chunk_ms=360.0, chunk=256)   # 1.4 ms a prompt token, a fast CPU
    >>> s.long_tokens, s.system_tokens, s.answer_tokens, s.stream_tokens
    (1072, 432, 48, 29)
    >>> Sizes(step_ms=80.0, chunk_ms=7200.0, chunk=256).long_tokens    # a slow one: four chunks at least
    1024

Left out: the block manager itself (``engine/kv_cache.py``) and the scheduler (``engine/scheduler.py``).
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import httpx
import numpy as np

from ..config import SamplingParams
from ..measure.client import astream_generate, run_sync, stream_generate
from ..measure.datasets import token_text
from ..measure.plotting import LabFigure, draw_arrivals
from ..measure.tables import format_table
from ..measure.trace import Trace
from .display import PROMPT
from .sizing import measure_speed
from .target import Target, as_target

LONG_MS, SYSTEM_MS, ANSWER_MS = 1500.0, 600.0, 200.0  # how long each demo's prompt or answer should take
STREAMS, AFTER = 3, 8  # streams decoding when the long prompt arrives, and their tokens before it does
SYSTEM = ("You are a patient teacher of computer science. Answer in one short paragraph with a concrete "
          "example. Explain every technical word the first time you use it, and say so when you are unsure. ")
QUESTIONS = ["What is a hash table?", "Why do CPUs have caches?", "What does a compiler do?",
             "What is a race condition?"]
CHAT = ["What is a KV cache in a language model?", "Why does it grow with every token?",
        "How much memory does a long chat need?", "What does paging change?", "Sum it up in one sentence."]
MB = 2**20


@dataclass
class Sizes:
    """Demo lengths from a decode step and one forward of ``chunk`` new prompt tokens, measured here."""
    step_ms: float
    chunk_ms: float
    chunk: int  # the server's budget of tokens a forward (max_num_batched_tokens)

    def __post_init__(self):
        def tokens(ms: float, lo: int, hi: int) -> int:  # whole blocks of 16 that take about ``ms``
            return max(lo, min(hi, 16 * math.ceil(ms * self.chunk / self.chunk_ms / 16)))

        self.long_tokens = tokens(LONG_MS, 4 * self.chunk, 3072)  # four chunks at least
        self.system_tokens = tokens(SYSTEM_MS, 128, 1024)
        self.answer_tokens = max(16, min(48, round(ANSWER_MS / self.step_ms)))
        # Enough for a stream to decode before, through and after the long prompt's prefill in chunks.
        self.stream_tokens = AFTER + math.ceil(self.long_tokens / (self.chunk - STREAMS)) + 16


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    """``n`` ids drawn from 2048 of the vocabulary's (not all of it: each id reads its row of the embedding
    table, and rows from all over it would bring new pages of the table into memory every time)."""
    low = min(1000, vocab // 2)
    return np.random.default_rng(seed).integers(low, min(vocab, low + 2048), size=n).tolist()


# -- 1. memory ---------------------------------------------------------------------------------------------
def bytes_per_token(config, dtype_bytes: int = 4) -> int:
    """K and V of one token: layers x 2 x kv_heads x head_dim x bytes (float32: 4)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * dtype_bytes


def rss_bytes() -> int:
    import psutil  # a dependency of Jupyter's kernel

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The most memory this process has held at once (`memory.process_peak_mb`)."""
    from .memory import process_peak_mb

    peak = process_peak_mb()
    return max(int((peak or 0) * 2**20), rss_bytes())  # the OS may update its mark lazily


@dataclass
class Memory:
    tokens: int
    bytes_per_token: int
    kv: dict  # engine.kv_report() while the long request held its blocks
    rss_growth: int  # bytes, across the long request
    rss_noise: int  # bytes RSS moved across a request of one block, beyond that block's K/V
    max_batch: int
    max_context: int  # the longest request the limits allow

    @property
    def own_kv(self) -> int:
        return self.tokens * self.bytes_per_token

    def rows(self) -> dict[str, int]:
        blocks, size, n = self.kv["blocks_used"], self.kv["block_size"], self.max_batch
        return {"its own K/V (tokens x bytes per token)": self.own_kv,
                f"paged: {blocks} blocks of {size} tokens": blocks * size * self.bytes_per_token,
                "RSS growth, measured": self.rss_growth,
                f"slots grown to it: {n} x {self.tokens} tokens": n * self.own_kv,
                f"slots for the worst case: {n} x {self.max_context} tokens":
                    n * self.max_context * self.bytes_per_token}


def _held(engine, ids: list[int], chunk: int) -> tuple[dict, int, float]:
    """A new prompt ``ids`` fed in chunks on the calling thread: the KV report while it holds its blocks,
    the growth of RSS, and the time of its forwards (ms)."""
    seq = engine.begin(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    before = rss_bytes()
    try:
        while not seq.finished:
            engine.step([(seq, min(chunk, seq.remaining))])
        return engine.kv_report(), rss_bytes() - before, seq.step_ms[0]
    finally:
        engine.end(seq)


def measure_sizes(engine, chunk: int) -> Sizes:
    """The median decode step, and one forward of ``chunk`` new prompt tokens (the second of two)."""
    step_ms = measure_speed(engine).step_ms
    chunk_ms = [_held(engine, random_ids(chunk, len(engine.tokenizer), seed), chunk)[2] for seed in (1, 2)][-1]
    return Sizes(step_ms, chunk_ms, chunk)


def memory_of_long_request(engine, tokens: int, chunk: int, per_token: int, seed: int = 7) -> Memory:
    """One request of ``tokens`` new prompt tokens, prefilled in chunks, after one of a chunk (a warm-up)
    and one of a block: what RSS did beyond that block's K/V is the noise."""
    vocab, block = len(engine.tokenizer), engine.kv_report()["block_size"]
    _held(engine, random_ids(chunk, vocab, seed), chunk)
    _, growth, _ = _held(engine, random_ids(block, vocab, seed + 1), chunk)
    kv, long_growth, _ = _held(engine, random_ids(tokens, vocab, seed + 2), chunk)
    context = min(engine.context_len, engine.config.max_prompt_tokens + engine.config.max_tokens_limit)
    return Memory(tokens, per_token, kv, long_growth, abs(growth - block * per_token), engine.config.max_batch,
                  context)


def memory_table(mem: Memory) -> str:
    return format_table(["K/V of one request", "MiB"], [[k, v / MB] for k, v in mem.rows().items()])


# -- 2. prefix caching -------------------------------------------------------------------------------------
def system_prompt(tokenizer, tokens: int) -> str:
    """``SYSTEM`` repeated until it has ``tokens`` tokens or more."""
    return SYSTEM * math.ceil(tokens / len(tokenizer(SYSTEM)["input_ids"]))


def _ok(*traces: Trace) -> Trace:
    failed = [t.error for t in traces if not t.ok]
    if failed:
        raise RuntimeError(f"a request failed: {failed[0]}")
    return traces[0]


def prefix_demo(server: Target | str, system: str, answer_tokens: int) -> dict[str, list[Trace]]:
    """``QUESTIONS`` one after another after the same system prompt (answers of 8 tokens); then a chat of
    ``CHAT`` turns that opens with it, each turn sending the whole history, as chat clients do.
    ``server``: a ``Target`` (ours or a shared one) or our server's URL."""
    server = as_target(server)
    protocol = server.chat()

    def ask(messages: list[dict], max_tokens: int) -> Trace:
        return _ok(stream_generate(server.url, "", max_tokens, 0.0, protocol=protocol, messages=messages))

    head = [{"role": "system", "content": system}]
    shared = [ask(head + [{"role": "user", "content": q}], 8) for q in QUESTIONS]
    history, chat = list(head), []
    for question in CHAT:
        history.append({"role": "user", "content": question})
        chat.append(ask(history, answer_tokens))
        history.append({"role": "assistant", "content": chat[-1].text})
    return {"shared": shared, "chat": chat}


def prefix_reuse(traces: list[Trace]) -> tuple[float, float, float]:
    """TTFT of the first request, and the median and spread (max - min) of the later ones' TTFT, in ms."""
    later = [t.ttft_ms for t in traces[1:]]
    return traces[0].ttft_ms, float(np.median(later)), max(later) - min(later)


def cached_tokens(trace: Trace) -> int:
    return (trace.usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def prefix_table(runs: dict[str, dict[str, list[Trace]]], part: str) -> str:
    rows = [[i + 1, ts[0].usage["prompt_tokens"], *(x for t in ts for x in (cached_tokens(t), t.ttft_ms))]
            for i, ts in enumerate(zip(*(run[part] for run in runs.values())))]
    heads = [h for label in runs for h in (f"cached ({label})", f"TTFT ms ({label})")]
    return format_table(["request" if part == "shared" else "turn", "prompt tokens", *heads], rows)


def plot_prefix(runs: dict[str, dict[str, list[Trace]]]) -> LabFigure:
    fig = LabFigure(figsize=(11, 3.6), layout="constrained")
    titles = {"shared": "The same system prompt, a new question each", "chat": "One chat, its history resent each turn"}
    for ax, (part, title) in zip(fig.subplots(1, 2), titles.items()):
        for label, run in runs.items():
            x = list(range(1, len(run[part]) + 1))
            ax.plot(x, [t.ttft_ms for t in run[part]], "o-", label=label)
            for i, t in zip(x, run[part]):
                ax.annotate(cached_tokens(t), (i, t.ttft_ms), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=title, xlabel="request" if part == "shared" else "turn", ylabel="TTFT ms", ylim=(0, None),
               xticks=x)
        ax.legend(fontsize=8, title="numbers: cached tokens", title_fontsize=7)
    return fig


# -- 3. a long prompt arrives -------------------------------------------------------------------------------
@dataclass
class Arrival:
    """Streams that were decoding when a long prompt was sent, and that prompt (``Trace.sent_s`` is one clock)."""
    streams: list[Trace]
    long: Trace

    @staticmethod
    def times(trace: Trace) -> list[float]:
        return [trace.sent_s + ms / 1000 for ms in trace.arrival_ms]

    @property
    def prefill_s(self) -> tuple[float, float]:
        """When the long prompt was sent and when its first token arrived."""
        return self.long.sent_s, self.times(self.long)[0]

    @property
    def longest_gap_ms(self) -> float:
        return max(max(t.itl_ms) for t in self.streams)

    @property
    def quiet_gap_ms(self) -> float:
        """The longest gap of any stream between the last stream's first token and the long prompt: the noise."""
        start = max(self.times(t)[0] for t in self.streams)
        return max(((b - a) * 1000 for t in self.streams for a, b in zip(self.times(t), self.times(t)[1:])
                    if start <= a and b < self.long.sent_s), default=0.0)

    def tokens_during_prefill(self) -> list[int]:
        start, end = self.prefill_s
        return [sum(start < a < end for a in self.times(t)) for t in self.streams]


async def _arrive(url: str, long_prompt: str, stream_tokens: int) -> Arrival:
    received = [[] for _ in range(STREAMS)]  # each stream's tokens so far
    async with httpx.AsyncClient(timeout=300.0) as http:
        streams = asyncio.gather(*(astream_generate(url, PROMPT, stream_tokens, 0.0, client=http, ignore_eos=True,
                                                    on_token=tokens.append) for tokens in received))
        while min(map(len, received)) < AFTER and not streams.done():  # all decoding: now the long prompt comes
            await asyncio.sleep(0.002)
        long = await astream_generate(url, long_prompt, 4, 0.0, client=http, ignore_eos=True)
        return Arrival(await streams, long)


def long_prompt_arrives(url: str, tokenizer, tokens: int, seed: int, stream_tokens: int) -> Arrival:
    """``STREAMS`` greedy streams; once each has ``AFTER`` tokens, a prompt of about ``tokens`` tokens of random
    text is sent (new for every seed: the server has none of it cached), for 4 tokens."""
    text = token_text(tokens, tokenizer, np.random.default_rng(seed))[0]
    arrival = run_sync(lambda: _arrive(url, text, stream_tokens))
    _ok(arrival.long, *arrival.streams)
    return arrival


def arrival_table(arrivals: dict[str, Arrival]) -> str:
    rows = [[label, a.long.usage.get("prompt_tokens"), a.long.ttft_ms, a.longest_gap_ms, a.quiet_gap_ms,
             ", ".join(map(str, a.tokens_during_prefill()))] for label, a in arrivals.items()]
    return format_table(["server", "long prompt tokens", "its TTFT ms", "longest gap ms", "longest gap before ms",
                         "tokens per stream meanwhile"], rows)


def plot_arrivals(arrivals: dict[str, Arrival]) -> LabFigure:
    fig = LabFigure(figsize=(11, 3.6), layout="constrained")
    for ax, (label, a) in zip(fig.subplots(1, len(arrivals), sharey=True), arrivals.items()):
        draw_arrivals(ax, {f"request {i + 1}": t for i, t in enumerate(a.streams)}, label, common_start=True)
        sent, first = (x - min(t.sent_s for t in a.streams) for x in a.prefill_s)
        ax.axvspan(sent, first, color="tab:gray", alpha=0.2, label="long prompt: sent to first token")
        ax.axvline(sent, color="black")
        ax.legend(fontsize=7, loc="upper left")
    return fig
