# %% [markdown]
# # 8. The KV cache: memory, prefix caching, chunked prefill
#
# Every token a model has read leaves a key and a value vector (K/V) in every layer, and every later
# token's attention reads them all. Notebooks 1-7 took that cache for granted. This one looks at it as
# memory: how much a request takes, how a server avoids computing the same prompt twice, and how it keeps
# a long new prompt from freezing everyone else's stream. The server keeps K/V in a pool of fixed-size
# blocks (*paging*, as vLLM's PagedAttention does), names full blocks by their tokens so that later
# requests share them (*prefix caching*), and feeds long prompts in chunks between the running streams'
# steps (*chunked prefill*). Then you write the three decisions behind it.
#
# **What you will learn**
#
# 1. What one request's K/V costs, from the model's shape, and why one cache slot per sequence, sized for
#    the longest one, holds many times what a pool of blocks holds for the same request.
# 2. How prefix caching works (full blocks named by a chain of their tokens, shared while they are read,
#    kept until their memory is needed) and what it does to TTFT for a shared system prompt and a chat.
# 3. Why a long prompt stops every running stream for its whole prefill, and how a budget of tokens per
#    forward bounds that gap to one chunk's forward.
# 4. How to write the block allocator with reference counts, the prefix lookup, and the scheduler's
#    choice of what goes into the next forward.
#
# **Run time:** about 1-2 minutes on 2 CPU cores (longer where a prefill is slow).

# %% [markdown]
# ## Setup
#
# One engine with the server's defaults: blocks of 16 tokens, prefix caching on, at most 256 tokens in a
# forward (`max_num_batched_tokens`). Sections 2 and 3 compare it with engines on the same weights that
# differ in one setting each. The demos size themselves from two measurements made first: a decode step,
# and one forward of 256 new prompt tokens (what a prompt costs per token here).
#
# With `LABSERVER_URL` set (a shared vLLM or SGLang server, see notebook 2), section 2 sends its requests
# to that server and compares its first request with the later ones (most such servers keep a prefix
# cache; llama-server keeps each slot's last prompt); sections 1 and 3 measure labserver's own KV pool
# and its scheduler, and print one line saying they were skipped.

# %% tags=["nbval-ignore-output"]
import dataclasses
from statistics import median

from labserver import Engine
from labserver.lab.setup import load_engine
from labserver.lab import checks, kv_cache as lab
from labserver.lab.claims import claim, ratio
from labserver.lab.target import has_engine, target
from labserver.serve.background import start_fastapi, stop
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine()  # SmolLM2-135M-Instruct on the CPU; prints the route it chose
CHUNK = engine.config.max_num_batched_tokens
sizes = lab.measure_sizes(engine, CHUNK)
print(f"{engine.runner.name}: decode step {sizes.step_ms:.1f} ms, a forward of {CHUNK} prompt tokens "
      f"{sizes.chunk_ms:.0f} ms -> a long prompt of {sizes.long_tokens} tokens, a system prompt of "
      f"{sizes.system_tokens}, chat answers of {sizes.answer_tokens}")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. The memory of one long request, before and after paging
#
# For every token, each layer keeps one key and one value vector per KV head (SmolLM2 has fewer KV heads
# than query heads: grouped-query attention). In float32:

# %% tags=["nbval-ignore-output"]
shape = engine.source.config
head_dim = getattr(shape, "head_dim", None) or shape.hidden_size // shape.num_attention_heads
per_token = lab.bytes_per_token(shape)
print(f"{shape.num_hidden_layers} layers x 2 (K and V) x {shape.num_key_value_heads} KV heads x {head_dim} x 4 bytes "
      f"= {per_token:,} bytes a token (the server's pool: {engine.runner.lean.cache.bytes_per_token:,})")

# %% [markdown]
# <!-- mechanism -->
# Until this version the server kept one *slot* per sequence, and all its slots shared one position axis
# that grew with the longest sequence: one long request made every slot that long. A server that sets
# its slots up front must size each for the longest request it accepts. Both hold `max_batch` times the
# K/V of a request that long, whoever uses them.
#
# <!-- mechanism -->
# Now the K/V live in a pool of blocks of 16 tokens. A sequence's *block table* lists its blocks: token
# `p` is in block `table[p // 16]` at slot `p % 16`, so blocks need not be adjacent, and a sequence takes
# blocks as its tokens need them: its prompt's when it is admitted, one more whenever its answer crosses
# into a new block. The pool is sized for the worst case too (the startup line says
# how many GiB at most), but it is fresh memory that the operating system maps only where it is first
# written: memory follows the blocks in use. Here is one request of the long prompt's length, prefilled
# in chunks on this thread, with the process's resident memory (RSS) read before and after.

# %% tags=["nbval-ignore-output"]
mem = None
if has_engine("the memory of labserver's KV pool"):
    mem = lab.memory_of_long_request(engine, sizes.long_tokens, CHUNK, per_token)
    print(lab.memory_table(mem))
    print("\nengine.kv_report() while it held its blocks:", mem.kv)

# %% tags=["nbval-ignore-output"]
if mem:
    growth, own, noise = mem.rss_growth, mem.own_kv, mem.rss_noise
    claim(f"one request of {mem.tokens} tokens grew this process by {growth / lab.MB:.1f} MiB, {growth / own:.2f}x its "
          f"own K/V ({own / lab.MB:.1f} MiB), within 1.5x of it and the noise ({noise / lab.MB:.2f} MiB); slots "
          f"grown to it would hold {mem.max_batch * own / lab.MB:.0f} MiB", growth <= 1.5 * own + noise);

# %% [markdown]
# Besides its K/V a request may leave behind buffers whose size follows its length (attention over a
# longer context); half of its K/V is room for those. The noise is what RSS did across a request of one
# block beyond that block's K/V. A pool sized for the worst case costs nothing until it is written; a slot
# cache grown for one long request costs `max_batch` times that request at once. (This request's prompt
# is made of ids from a small part of the vocabulary: each id reads a row of the embedding table, and ids
# from all over it would page in more of that table, which RSS would count too.)
#
# ## 2. A shared system prompt and a multi-turn chat, with and without prefix caching
#
# A token's K/V depend on every token before it. So once a block is full and its K/V written, the server
# gives it a *name*: its own tokens chained to the name of the block before it. Equal names mean equal
# prefixes, hence equal K/V. A new request walks its prompt block by block and takes every named block it
# finds (the block's *reference count* goes up: several sequences read it, none writes it); it stops at
# the first block it does not find, and it always computes its last prompt token itself, whose logits give
# the first output token. A block that nobody holds any more keeps its name in a free queue, least
# recently used first in line to be reused, so a later request may still find it. Where the first block it
# does not find is a named block's near twin (the prompts part ways inside it), the server copies that
# block's rows up to the parting token into the request's own block, which the request then writes on:
# the prefix is reused to the token, as llama.cpp and SGLang do (vLLM stops at the last whole block).
#
# Two servers, one after the other: the engine above, and one that differs only in `prefix_caching=False`.
# Each answers four questions after the same system prompt, then one chat of five turns that opens with
# it; each turn sends the whole history, as every chat client does. Their `/v1` answers say how many
# prompt tokens were found cached (`usage.prompt_tokens_details.cached_tokens`).

# %% tags=["nbval-ignore-output"]
system = lab.system_prompt(engine.tokenizer, sizes.system_tokens)
runs = {}
if has_engine("the same engine without prefix caching, to compare with"):
    no_prefix = Engine(engine.source, engine.tokenizer, dataclasses.replace(engine.config, prefix_caching=False))
    for label, served in (("prefix caching", engine), ("none", no_prefix)):
        server = start_fastapi(served, name="kv-prefix")
        runs[label] = lab.prefix_demo(server.url, system, sizes.answer_tokens)
        stop("kv-prefix")
else:
    runs["the shared server"] = lab.prefix_demo(target(), system, sizes.answer_tokens)
print(lab.prefix_table(runs, "shared"), "\n")
print(lab.prefix_table(runs, "chat"))
lab.plot_prefix(runs)

# %% [markdown]
# The first request finds nothing: it computes the system prompt and leaves its full blocks named. Every
# later one finds them, copies the rows its prompt shares with the block where the prompts part, and
# computes only its own question. In the
# chat, each turn also finds the turns before it, the earlier answers included: the server named the
# blocks of the answer's tokens as it generated them. Without prefix caching every request computes its
# whole prompt again, and a chat's TTFT grows with its history. The later requests of the first part all
# do the same work, so their spread without the cache shows how much TTFT moves by itself here.

# %% tags=["nbval-ignore-output"]
if "none" in runs:  # both of our servers
    later = {label: [t.ttft_ms for t in run["shared"][1:]] for label, run in runs.items()}
    cached, uncached = later.values()
    spread = max(uncached) - min(uncached)
    hit = runs["prefix caching"]["shared"][-1]
    claim(f"after the first request, a shared system prompt gave a median TTFT of {median(cached):.0f} ms with prefix "
          f"caching ({lab.cached_tokens(hit)} of {hit.usage['prompt_tokens']} prompt tokens cached) against "
          f"{median(uncached):.0f} ms without: lower by more than the spread of the uncached ones ({spread:.0f} ms)",
          median(cached) + spread < median(uncached))
    on, off = (run["chat"][-1] for run in runs.values())
    claim(f"at turn {len(lab.CHAT)} of the chat ({off.usage['prompt_tokens']} prompt tokens) TTFT was {on.ttft_ms:.0f} ms "
          f"with prefix caching ({lab.cached_tokens(on)} cached) against {off.ttft_ms:.0f} ms without: lower by more "
          f"than that spread", on.ttft_ms + spread < off.ttft_ms);

# %% tags=["nbval-ignore-output"]
if "none" not in runs:  # the shared server: its first request computed the system prompt, the later ones?
    first, later, spread = lab.prefix_reuse(runs["the shared server"]["shared"])
    claim(f"after the first request ({first:.0f} ms), the shared server answered the same system prompt with a "
          f"median TTFT of {later:.0f} ms: lower by more than the later ones' spread ({spread:.0f} ms)",
          later + spread < first)

# %% [markdown]
# ## 3. The running streams' gaps when a long prompt arrives, with and without chunking
#
# Three streams are decoding when a long prompt arrives (the length sized in the setup). A scheduler
# without a budget puts the whole prompt into the next forward, beside the streams' decode tokens: each
# stream waits for that forward, the whole prefill, before its next token. With a budget of
# `max_num_batched_tokens` tokens a forward, the batched scheduler fills each forward with one token for
# every decoding stream first, then a chunk of the prompt in what is left; the prompt is done after a few
# forwards, and the streams get a token from each. Two servers, one after the other: the engine above
# (chunks of `max_num_batched_tokens`, printed in the table), and one whose budget takes any prompt the server accepts in one forward.

# %% tags=["nbval-ignore-output"]
arrivals = {}
if has_engine("two settings of labserver's scheduler"):
    whole = Engine(engine.source, engine.tokenizer,
                   dataclasses.replace(engine.config, max_num_batched_tokens=engine.config.max_prompt_tokens))
    for seed, (label, served) in enumerate(((f"chunks of {CHUNK} tokens", engine), ("whole prompt at once", whole))):
        server = start_fastapi(served, name="kv-chunks")
        arrivals[label] = lab.long_prompt_arrives(server.url, engine.tokenizer, sizes.long_tokens, seed,
                                                  sizes.stream_tokens)
        stop("kv-chunks")
    print(lab.arrival_table(arrivals))
lab.plot_arrivals(arrivals) if arrivals else None

# %% [markdown]
# The grey band runs from sending the long prompt (the black line) to its first token. With the whole
# prompt in one forward, the staircases stop for the whole band: the streams receive a few tokens at its
# start (the steps the engine ran while the server read and tokenized the request) and nothing more until
# the prompt's forward ends. In chunks they keep climbing, one step per forward, each step as long as one
# chunk's forward.

# %% tags=["nbval-ignore-output"]
if arrivals:
    chunked, at_once = arrivals.values()
    noise = max(a.quiet_gap_ms for a in arrivals.values())
    claim(f"in chunks of {CHUNK}, a running stream's longest gap was {chunked.longest_gap_ms:.0f} ms, against "
          f"{at_once.longest_gap_ms:.0f} ms with the whole prompt at once: less than half of it, with room for the "
          f"noise ({noise:.0f} ms, the longest gap before the prompt arrived)",
          chunked.longest_gap_ms + noise < at_once.longest_gap_ms / 2)
    print(f"the long prompt's own TTFT in chunks: {ratio(chunked.long.ttft_ms, at_once.long.ttft_ms)} of its TTFT "
          f"at once (a forward of {CHUNK} prompt tokens took {sizes.chunk_ms:.0f} ms in the setup)")

# %% [markdown]
# <!-- mechanism -->
# What chunking costs the long prompt itself depends on the machine, and the last line says how it came
# out here. Each chunk's forward reads all the weights again and carries the streams' tokens too, which
# makes the prompt slower; but a CPU may run a forward of a few hundred tokens more efficiently than one
# of thousands, which makes it faster. The budget is the knob between the two: a smaller one bounds the
# streams' gaps more tightly, with more forwards for the prompt.
#
# ## Summary
#
# <!-- mechanism -->
# - One token's K/V is layers × 2 × KV heads × head dim × 4 bytes in float32. A cache of one slot per
#   sequence holds `max_batch` times the longest request; a pool of blocks holds the blocks in use, so
#   memory grows with the tokens, not with the slots.
# - Prefix caching names each full block by its tokens and everything before them; later requests take
#   the named blocks they find, so a shared system prompt and a chat's history are computed once, and
#   section 2's claims compare their TTFT with and without the cache.
# - A long prompt in one forward stops every running stream for its whole prefill; a budget of tokens per
#   forward (decode tokens first, then a chunk of the prompt) bounds their gap to one chunk's forward.
#
# ## Exercises
#
# Reference solutions: `notebooks/solutions/08_kv_cache.py`. The server's own versions, with eviction,
# statistics and preemption, are in `labserver/engine/kv_cache.py` and `labserver/engine/scheduler.py`:
# read them afterwards.
#
# **1. The block allocator.** `BlockAllocator(num_blocks)` keeps a list of free blocks and, for every
# block, how many sequences hold it. `allocate()` gives a free block to a new holder (None when no block is
# free), `share(block_id)` records one more holder of a block (a sequence that found it in the prefix
# cache), `free(block_id)` one holder fewer (a sequence that ended). The checker lets two sequences hold
# one block, then runs 400 random operations.

# %%
class BlockAllocator:
    def __init__(self, num_blocks):
        self.free_list = list(range(num_blocks))  # the next block to hand out first
        self.ref_count = [0] * num_blocks  # how many sequences hold each block

    def allocate(self):
        raise NotImplementedError  # your code here

    def share(self, block_id):
        raise NotImplementedError  # your code here

    def free(self, block_id):
        raise NotImplementedError  # your code here


_ = checks.check_block_allocator(BlockAllocator)

# %% [markdown]
# **2. The prefix lookup.** Write `commit(cached, token_ids, table, block_size)`: a sequence has the K/V of
# `token_ids` written in the blocks of `table`; put a name for each of its blocks that a later prompt may
# share into the dict `cached` (name -> block id). And `lookup(cached, token_ids, block_size)`: the ids of
# the blocks a new prompt `token_ids` takes from `cached`, as section 2 describes. Names are yours to
# choose (anything a dict takes as a key); a name must stand for exactly the K/V in its block. The checker
# commits three sequences in blocks of 4 tokens and looks up 8 prompts.

# %%
def commit(cached, token_ids, table, block_size):
    """Name the blocks of a sequence whose K/V are written: cached[name] = block id."""
    raise NotImplementedError  # your code here


def lookup(cached, token_ids, block_size):
    """The block ids of the longest cached prefix a new prompt can take."""
    raise NotImplementedError  # your code here


_ = checks.check_prefix_lookup(commit, lookup)

# %% [markdown]
# **3. The chunk scheduler's choice.** Write `next_forward(decoding, prompt, budget)`: `decoding` lists the
# sequences that each feed one token in the next forward (their last one), `prompt` is `(name, tokens
# still to prefill)` or None, `budget` the most tokens one forward may carry. Return the `(sequence,
# tokens)` pairs of the next forward, in the order the scheduler of section 3 fills it. The checker tries
# six situations, then prefills a prompt of 1000 tokens beside three streams, forward by forward.

# %%
def next_forward(decoding, prompt, budget):
    """[(sequence, tokens), ...] for the next forward."""
    raise NotImplementedError  # your code here


_ = checks.check_chunk_choice(next_forward)

# %% [markdown]
# **4. Explain your numbers.** (a) How many token slots of section 1's last block are empty, and what
# would blocks of 256 tokens waste on average per request? Why not blocks of one token? (b) Run section
# 1's cell again: RSS grows again by about the request's K/V, although the first request's blocks are
# free. Why? (Where do the next request's blocks come from, and what does that say about a server's RSS
# after a day of different prompts?) (c) From section 2's table, compute each turn's cached tokens from
# the turn before: how many came from the previous turn's answer, and why fewer than the previous turn's
# prompt plus its answer? (Which token of an answer is sampled but never fed through the model, and what
# does the chat template put after the answer's text?)
# (d) From your setup's forward of 256 tokens, predict a stream's longest gap and the long prompt's TTFT
# with a budget of 64; what stops you from making the budget very small?
#
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
