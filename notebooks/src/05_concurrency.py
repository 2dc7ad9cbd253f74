# %% [markdown]
# # 5. Concurrency: many streams, one engine
#
# So far one user at a time. This notebook sends N streams at once (N = 1, 2, 4, 8) to the streaming
# server and measures what each user gets, what the server gets done in total, and whether it still
# answers `/health`. Then it measures what the next step, batching, would change.
#
# **What you will learn**
#
# 1. How one engine thread shares itself between N streams: one step each, in turn, so every stream's
#    gap between tokens (ITL) grows about N times.
# 2. Why the total tokens per second does not grow with N here, and what TTFT does.
# 3. That the event loop stays free under load: `/health` answers in milliseconds at N = 8.
# 4. What batching and a separate engine process (vLLM V1's `EngineCoreProc`) would change, with a
#    measurement of batched forward passes.
#
# **Run time:** about 1-2 minutes on 2 CPU cores.

# %% [markdown]
# ## Setup
#
# `run_concurrent` (used inside `lab.sweep`) sends N requests at once from an `httpx.AsyncClient`. It
# needs no `nest_asyncio`: the kernel's event loop is already running on this thread, so it runs its own
# loop on a helper thread. (In a cell you could also write `await arun_concurrent(...)` directly.)

# %%
from labserver import Engine, EngineConfig, checks, lab
from labserver.serving import start_fastapi, stop_all

engine = Engine.from_config(EngineConfig())
PROMPT, MAX_TOKENS, NS = lab.PROMPT, 24, (1, 2, 4, 8)
fastapi = start_fastapi(engine)
print(fastapi, "at most", fastapi.app.state.limits.max_concurrent, "generations at once")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. N streams at once
#
# For each N: N greedy streams of 24 tokens sent together, while `/health` is probed every 20 ms.

# %%
loads = lab.sweep(fastapi.url, NS, MAX_TOKENS, PROMPT)
lab.plot_streams(loads[NS.index(4)])

# %% [markdown]
# Four staircases climbing together: the engine thread advances every active generation by one step in
# turn (round robin), so each stream gets a token every fourth step. The first tokens are staggered: a
# request's first turn is its prefill, so the prefills of requests that arrive together run one after
# another.
#
# ## 2. TTFT, ITL, throughput and `/health` against N

# %%
print(lab.sweep_table(loads))

# %%
batched = lab.batched_step_ms(engine, NS)  # used in the throughput panel; see section 3
lab.plot_sweep(loads, batched)

# %% [markdown]
# - **ITL** grows about N times: between two tokens of one stream, the engine runs one step for each of
#   the N streams. The server's `step_ms` stays about the same: each step is still one sequence.
# - **TTFT** grows with N: the last request in a round waits for the prefills (and steps) of the
#   requests ahead of it.
# - **Tokens per second, all streams together**, stays flat (blue): the engine does one token per step
#   whatever N is, so N users split the same ~20-30 tokens/s. More users, same total, everyone slower.
# - **`/health`** stays in milliseconds at every N: the event loop only moves bytes. (Its few ms and the
#   odd spike come from the shared GIL: the engine's Python code, the server and this notebook's client
#   and probe run in one process here.)
#
# ## 3. The next step: batching
#
# A decode step of this model is limited by reading its weights (~540 MB in fp32) from memory, not by
# arithmetic. A step that advances B sequences at once (input `[B, 1]` instead of `[1, 1]`) reads the
# weights once for all of them. `lab.batched_step_ms` measured exactly that, with plain forward passes
# (no server), in the cell above:

# %%
lab.print_table([{"batch B": b, "step ms": ms, "step vs B=1": ms / batched[1], "tokens/s": 1000 * b / ms}
                 for b, ms in batched.items()])

# %% [markdown]
# A step of 8 sequences costs much less than 8 steps of one (compare the "step vs B=1" column with B),
# so the total tokens per second grows with B: that is the green line in the throughput panel. That is
# what every production server does: *continuous batching*. The scheduler keeps a batch of running
# sequences, adds new requests to it between steps and removes finished (or cancelled) ones, and runs
# one forward pass for the whole batch. It needs a KV cache per sequence (vLLM pages it in blocks:
# PagedAttention) and attention over sequences of different lengths.
#
# ## 4. A separate engine process
#
# Here the web layer and the engine share one process, and with it one GIL: the engine thread's Python
# code (the model's modules, sampling, detokenizing) competes with the event loop for it. That is the
# noise in `/health` and part of the client-side overhead. vLLM V1 splits them: the API server process
# (HTTP, tokenizing, detokenizing, streaming) talks over ZeroMQ sockets to an `EngineCoreProc`, a
# separate process whose busy loop only schedules, runs the model and sends back new token ids. The
# engine never waits for the web layer's GIL, and the web layer never waits for the engine, at the price
# of serializing every request and token across a process boundary.
#
# That is where this lab ends: a streaming server with the engine on its own thread is the right shape;
# batching is what makes it fast, and a process boundary is what keeps it fast under load.
#
# ## Summary
#
# - N streams on one unbatched engine thread take turns: ITL ≈ N × step, TTFT grows with N.
# - The total tokens per second stays the same; each user gets 1/N of it.
# - The event loop stays free: `/health` answers in milliseconds at every N.
# - Batching turns "one sequence per step" into "B sequences per step" for little more than the cost of
#   one, which is where throughput comes from. A separate engine process removes the GIL from between
#   the web layer and the model.
#
# ## Exercises
#
# Reference solutions: `notebooks/solutions/05_concurrency.py`.
#
# **1.** Write `aggregate_tokens_per_s(traces)`: all tokens of all streams divided by the time from the
# first request sent to the last token received, over all streams. Each `Trace` has `sent_s` (a
# `time.perf_counter()` value, in seconds) and `arrival_ms` (ms after its own `sent_s`).

# %%
def aggregate_tokens_per_s(traces):
    """Total tokens / (last arrival of any stream - first send), in tokens per second."""
    raise NotImplementedError  # your code here


checks.check_aggregate_tokens_per_s(aggregate_tokens_per_s, loads)

# %% [markdown]
# **2.** Write `predict_itl_ms(step_ms, n)`: the gap between two tokens of one stream when `n` streams
# share the engine thread round robin and each step takes `step_ms`. The checker prints your prediction
# next to the measured ITL for every N.

# %%
def predict_itl_ms(step_ms, n):
    """A stream's inter-token latency with n streams taking turns, in ms."""
    raise NotImplementedError  # your code here


checks.check_itl_prediction(predict_itl_ms, loads)

# %% [markdown]
# **3.** Write `batched_tokens_per_s(batch, step_ms)`: the total tokens per second of an engine that
# advances `batch` sequences in each step of `step_ms`. The checker applies it to the batched steps
# measured in section 3: compare with the flat throughput of section 2.

# %%
def batched_tokens_per_s(batch, step_ms):
    """Total tokens per second with `batch` sequences per step."""
    raise NotImplementedError  # your code here


checks.check_batched_tokens_per_s(batched_tokens_per_s, batched)

# %% [markdown]
# ## Clean up

# %%
stop_all()
