# %% [markdown]
# # 5. Concurrency: many streams, one engine
#
# So far one user at a time. This notebook sends N streams at once (N = 1, 2, 4, 8) to two servers that
# differ only in how the engine thread shares itself: taking turns, one sequence per step, or
# *continuous batching*, all running sequences in one step. It measures what each user gets, what the
# server gets done in total, and whether it still answers `/health`.
#
# **What you will learn**
#
# 1. How an engine thread that takes turns shares itself between N streams: every stream's gap between
#    tokens (ITL) grows about N times, and the total tokens per second does not grow at all.
# 2. Why a step that carries 8 sequences costs far less than 8 steps: a decode step reads all the
#    weights, whatever the batch.
# 3. What continuous batching does to ITL, TTFT and throughput, measured on the same model.
# 4. That the event loop stays free under load (`/health` in milliseconds at N = 8), and what a separate
#    engine process (vLLM V1's `EngineCoreProc`) would change next.
#
# **Run time:** about 1-2 minutes on 2 CPU cores.

# %% [markdown]
# ## Setup
#
# Two FastAPI servers on one engine, one after the other: backend `"thread"` interleaves streams step by
# step (`policies.TurnTaking`), backend `"batched"` is the server's default (`policies.Batched`).
# Each has its own engine thread, so the first is stopped before the second starts: two live threads that
# both run torch would make each other's steps slower (OpenMP worker teams, notebook 3).
#
# `run_concurrent` (used inside `lab.sweep`) sends N requests at once from an `httpx.AsyncClient`. It
# needs no `nest_asyncio`: the kernel's event loop is already running on this thread, so it runs its own
# loop on a helper thread. (In a cell you could also write `await arun_concurrent(...)` directly.)

# %%
from labserver import Engine, EngineConfig
from labserver.lab import checks, concurrency as lab
from labserver.serve.background import start_fastapi, stop, stop_all

engine = Engine.from_config(EngineConfig())
PROMPT, MAX_TOKENS, NS = lab.PROMPT, 24, (1, 2, 4, 8)
print("engine:", engine.runner.name, "with", engine.config.max_batch, "cache slots")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. N streams taking turns
#
# For each N: N greedy streams of 24 tokens sent together to the `"thread"` server, while `/health` is
# probed every 20 ms.

# %%
thread = start_fastapi(engine, backend="thread", name="fastapi-thread")
turns = lab.sweep(thread.url, NS, MAX_TOKENS, PROMPT)
stop("fastapi-thread")  # its engine thread ends with it
lab.plot_streams(turns[NS.index(4)], "4 streams taking turns on one engine thread")

# %% [markdown]
# Four staircases climbing together: the engine thread advances every active generation by one step in
# turn (round robin), so each stream gets a token every fourth step. The first tokens are staggered: a
# request's first turn is its prefill, so the prefills of requests that arrive together run one after
# another.
#
# ## 2. The same N streams, batched
#
# The batched scheduler keeps a batch of running sequences. Each round it prefills the newcomers together
# (as many as fit a budget of 256 prompt tokens, in one forward), then runs **one** decode step for every
# running sequence: the lean llama forward takes input `[B, 1]`,
# each sequence in its own slot of a preallocated KV cache, attention masked to each one's length.
# Sequences join and leave between steps (finished, cancelled or new), so nobody waits for a batch to
# fill or drain: *continuous* batching, as in vLLM, SGLang and nano-vllm.

# %%
batched = start_fastapi(engine, backend="batched", name="fastapi-batched")
together = lab.sweep(batched.url, NS, MAX_TOKENS, PROMPT)
lab.plot_streams(together[NS.index(4)], "4 streams batched into one step")

# %% [markdown]
# Now the staircases climb at nearly the speed of one stream. Every event of the batched server says
# what its step did (`"batch": 4` next to `step_ms`), so the per-token times stay honest: this is the
# time of one forward for four sequences.
#
# ## 3. TTFT, ITL, throughput and `/health` against N

# %%
print("taking turns"); print(lab.sweep_table(turns))
print("\nbatched"); print(lab.sweep_table(together))

# %%
lab.plot_sweep({"taking turns": turns, "batched": together})

# %% [markdown]
# - **ITL**, taking turns, grows about N times: between two tokens of one stream the engine runs one step
#   for each of the N streams. Batched, it grows only as fast as the batched step does.
# - **Tokens per second, all streams together**, stays flat when taking turns (N users split the same
#   ~100 tokens/s) and climbs with N when batched.
# - **TTFT** grows with N on both. Taking turns, requests that arrive together are prefilled one after
#   another; batched, in one forward, which costs less than their prefills one by one but more than one
#   prefill, and all their first tokens come after it. (Splitting long prompts into chunks that ride
#   along with the decode steps, as vLLM does, is the next refinement.)
# - **`/health`** stays in milliseconds at every N: the event loop only moves bytes. (Its few ms and the
#   odd spike come from the shared GIL: the engine's Python code, the server and this notebook's client
#   and probe run in one process here.)
#
# ## 4. Why a batched step is cheap
#
# The server's events tell how long the steps with B sequences took:

# %%
steps = lab.step_ms_by_batch(together)
lab.print_table([{"batch B": b, "step ms": ms, "step vs B=1": ms / steps[1], "tokens/s": 1000 * b / ms}
                 for b, ms in steps.items()])

# %% [markdown]
# A step of 8 sequences costs much less than 8 steps of one (compare the "step vs B=1" column with B).
# A decode step of this model reads all its weights (~110 MB: the server keeps the GGUF file's 4-bit
# blocks) and does little arithmetic per byte; with B sequences the weights are read once for all of
# them, and only attention, which reads each sequence's own KV cache, grows with B. The arithmetic does
# grow with B, though: the multiply-adds run in float32, and on a 2-core CPU 8 rows of them cost
# several times the reading of the weights, so a step of 8 costs ~3-4 steps of one: still half of 8.
# Rounding the activations to 8 bits (`EngineConfig(quant="w4a8")`, what llama.cpp does with these
# weights) turns the multiply-adds into integer dot products, 64 per instruction instead of 16, and a
# step of 8 then costs less than 2 steps of one; but the logits move by ~1% and some greedy tokens change
# (`make bench` prints both routes side by side). Production servers add a paged KV cache (vLLM's
# PagedAttention) so that memory is allocated in blocks as sequences grow, not reserved up front.
#
# ## 5. A separate engine process
#
# Here the web layer and the engine share one process, and with it one GIL: the engine thread's Python
# code (sampling, detokenizing, the scheduler; the default model's forward runs in C and lets go of the
# GIL) competes with the event loop for it, and on 2 cores for the CPU as well. That is the
# noise in `/health` and part of the client-side overhead. vLLM V1 splits them: the API server process
# (HTTP, tokenizing, detokenizing, streaming) talks over ZeroMQ sockets to an `EngineCoreProc`, a
# separate process whose busy loop only schedules, runs the model and sends back new token ids. The
# engine never waits for the web layer's GIL, and the web layer never waits for the engine, at the price
# of serializing every request and token across a process boundary.
#
# That is where this lab ends: a streaming server with the engine on its own thread is the right shape,
# batching is what makes it fast, and a process boundary is what keeps it fast under load.
#
# ## Summary
#
# - N streams on an engine thread that takes turns: ITL ≈ N × step, TTFT grows with N, and the total
#   tokens per second stays the same; each user gets 1/N of it.
# - Continuous batching runs one step for all running sequences; the step costs little more than one
#   sequence's, so total throughput grows with N and each stream keeps most of its speed.
# - The event loop stays free either way: `/health` answers in milliseconds at every N.
# - A separate engine process removes the GIL from between the web layer and the model.
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


checks.check_aggregate_tokens_per_s(aggregate_tokens_per_s, turns + together)

# %% [markdown]
# **2.** Write `predict_itl_ms(step_ms, n)`: the gap between two tokens of one stream when `n` streams
# take turns on the engine thread (round robin) and each step takes `step_ms`. The checker prints your
# prediction next to the ITL measured in section 1 for every N.

# %%
def predict_itl_ms(step_ms, n):
    """A stream's inter-token latency with n streams taking turns, in ms."""
    raise NotImplementedError  # your code here


checks.check_itl_prediction(predict_itl_ms, turns)

# %% [markdown]
# **3.** Write `batched_tokens_per_s(batch, step_ms)`: the total tokens per second of an engine that
# advances `batch` sequences in each step of `step_ms`. The checker applies it to the batched steps
# measured in section 4: compare with the flat throughput of the servers taking turns.

# %%
def batched_tokens_per_s(batch, step_ms):
    """Total tokens per second with `batch` sequences per step."""
    raise NotImplementedError  # your code here


checks.check_batched_tokens_per_s(batched_tokens_per_s, steps)

# %% [markdown]
# ## Clean up

# %%
stop_all()
