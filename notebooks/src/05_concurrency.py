# %% [markdown]
# # 5. Concurrency: many streams, one engine
#
# So far one user at a time. This notebook sends N streams at once (N = 1, 2, 4, 8) to two servers that
# differ only in how the engine thread shares itself: taking turns, one sequence per step, or
# *continuous batching*, all running sequences in one step. It measures what each user gets, what the
# server gets done in total, and whether it still answers `/health`; then you write one round of the
# batching scheduler yourself.
#
# **What you will learn**
#
# 1. How an engine thread that takes turns shares itself between N streams: what happens to a stream's
#    gap between tokens (ITL), and to the tokens per second of all streams together, as N grows.
# 2. What continuous batching changes: one step carries every running sequence, so a stream's gap is one
#    (bigger) step; and why such a step costs less than one step per sequence.
# 3. How the batched scheduler admits, steps and retires sequences, round by round, and what that does
#    to the first token (TTFT).
# 4. That the event loop stays free under load (`/health` answers in milliseconds at N = 8).
#
# **Run time:** about 1-2 minutes on 2 CPU cores (longer where a decode step is slow).

# %% [markdown]
# ## Setup
#
# Two FastAPI servers on one engine, one after the other: backend `"thread"` interleaves streams step by
# step (`scheduler.TurnTaking`), backend `"batched"` is the server's default (`scheduler.Batched`).
# Each has its own engine thread, so the first is stopped before the second starts: two live threads that
# both run torch would make each other's steps slower (OpenMP worker teams, appendix `09_appendix_cpu`).
#
# The length of the answers and how often `/health` is probed come from this machine's prefill and step
# times, measured first: enough decode steps that decoding is not hidden behind the prefills.
#
# With `LABSERVER_URL` set (a shared vLLM or SGLang server, see notebook 2), section 2 and the table
# measure that server instead of the batched one started here; taking turns, the batch sizes of the
# steps and section 4 need labserver's own engine and print one line saying they were skipped.

# %% tags=["nbval-ignore-output"]
import math

from labserver.lab.setup import load_engine
from labserver.lab import checks, concurrency as lab
from labserver.lab.claims import claim
from labserver.lab.target import has_engine, target
from labserver.serve.background import start_fastapi, stop
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine(prefix_caching=False)  # SmolLM2-135M-Instruct on the CPU; prints its route
prefill_ms, step_ms = lab.engine_timing(engine)
PROMPT, NS = lab.PROMPT, (1, 2, 4, 8)
MAX_TOKENS = max(24, min(64, math.ceil(prefill_ms / step_ms)))
PROBE_MS = min(50.0, max(5.0, step_ms / 2))
print(f"{engine.runner.name}, {engine.config.max_batch} cache slots; prefill {prefill_ms:.0f} ms, "
      f"step {step_ms:.1f} ms -> {MAX_TOKENS} tokens per stream, /health every {PROBE_MS:.0f} ms")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. N streams taking turns
#
# For each N: N greedy streams sent together to the `"thread"` server, while `/health` is probed.

# %% tags=["nbval-ignore-output"]
turns = []
if has_engine("taking turns is a scheduler of labserver's engine"):
    thread = start_fastapi(engine, backend="thread", name="fastapi-thread")
    turns = lab.sweep(thread.url, NS, MAX_TOKENS, PROMPT, interval_ms=PROBE_MS)
    stop("fastapi-thread")  # its engine thread ends with it
lab.plot_streams(turns[NS.index(4)], "4 streams taking turns on one engine thread") if turns else None

# %% [markdown]
# Four staircases climbing together, each with a quarter of the slope of one stream alone: the engine
# thread advances every active generation by one step in turn (round robin), so each stream gets a token
# every fourth step. The first tokens are staggered: a request's first turn is its prefill, so the
# prefills of requests that arrive together run one after another.

# %% tags=["nbval-ignore-output"]
if turns:  # empty when LABSERVER_URL is set
    last = turns[-1]
    claim(f"taking turns, a stream's gap at N={last.n} is {last.itl_p50_ms / last.step_p50_ms:.1f} server steps "
          f"(ITL p50 {last.itl_p50_ms:.1f} ms, step p50 {last.step_p50_ms:.1f} ms), within 0.6-1.6x of N",
          0.6 * last.n <= last.itl_p50_ms / last.step_p50_ms <= 1.6 * last.n)
    ttft_max, prefill = max(t.ttft_ms for t in last.traces), min(t.prefill_time_ms for t in last.traces)
    claim(f"taking turns, the last of {last.n} first tokens took {ttft_max / prefill:.1f} times one prefill "
          f"({ttft_max:.0f} ms against {prefill:.0f} ms): it waited for the prefills before it",
          ttft_max >= last.n / 2 * prefill);

# %% [markdown]
# ## 2. The same N streams, batched
#
# The batched scheduler keeps a batch of running sequences. Each forward carries **one** token of every
# decoding sequence, then as much of the newcomers' prompts as fits a budget of tokens per forward (a long
# prompt goes in chunks over several forwards): the lean llama forward takes the rows of all of them at
# once, each sequence reading and writing its own blocks of a paged KV cache, each row attending to its
# own sequence only. Sequences join and leave between forwards (finished, cancelled or new), so nobody
# waits for a batch to fill or drain: *continuous* batching, as in vLLM, SGLang and nano-vllm.

# %% tags=["nbval-ignore-output"]
server = target(lambda: start_fastapi(engine, backend="batched", name="fastapi-batched"))  # or LABSERVER_URL's
print(server)
together = lab.sweep(server, NS, MAX_TOKENS, PROMPT, interval_ms=PROBE_MS)
stop("fastapi-batched")
lab.plot_streams(together[NS.index(4)], "4 streams batched into one step")

# %% [markdown]
# The staircases now climb together, one token each per batched step. Every event of the batched server
# says what its step did (`"batch": 4` next to `step_ms`), so the per-token times stay honest: this is the
# time of one forward for four sequences (section 4 times such a step against a step of one).
#
# Which batch sizes B did the steps carry? Prompts that arrive together join in *prefill groups*: in
# arrival order, as much as fits the budget of tokens per forward after the running streams' tokens, and
# the engine thread takes in whatever has arrived between two forwards. Each group that joins makes B
# bigger; each stream that finishes makes it smaller. That is where odd sizes such as B = 3 or 6 come from.
# Did the newcomers join a batch already running, or wait for it to drain (a static batch would)?

# %% tags=["nbval-ignore-output"]
if server.has_engine("the batch sizes and step_ms that labserver's events report"):
    budget, prompt_tokens = lab.prefill_budget(), together[-1].traces[0].usage["prompt_tokens"]
    for load in together:
        print(f"N={load.n}: prefill groups (prompts, ms) {[(k, round(ms)) for k, ms in lab.prefill_forwards(load)]}; "
              f"decode steps carried B = {sorted(lab.step_ms_by_batch([load]))}")
    groups, last_first, first_last = lab.prefill_groups(together[-1]), *lab.joined_while_running(together[-1])
    claim(f"the {together[-1].n} prompts ({prompt_tokens} tokens each; a budget of {budget} tokens a forward) joined "
          f"in forwards of {groups} sequences while the others decoded: the last first token came {last_first:.0f} ms after the "
          f"request was sent, before any stream had its last token ({first_last:.0f} ms)",
          last_first < first_last)
    last = together[-1]
    claim(f"batched, a stream's gap at N={last.n} is {last.itl_p50_ms / last.step_p50_ms:.1f} server steps "
          f"(ITL p50 {last.itl_p50_ms:.1f} ms, step p50 {last.step_p50_ms:.1f} ms): one step carries them all",
          last.itl_p50_ms / last.step_p50_ms < 1.6);

# %% [markdown]
# ## 3. TTFT, ITL, throughput and `/health` against N

# %% tags=["nbval-ignore-output"]
sweeps = {"taking turns": turns, "batched" if not server.external else "the shared server": together}
for label, loads in sweeps.items():
    print(label); print(lab.sweep_table(loads) if loads else "(skipped)\n")
health = max(lab.health_p50_ms(load) for load in turns + together)
e2e = min(lab.e2e_p50_ms(loads[-1]) for loads in sweeps.values() if loads)
claim(f"/health answered in {health:.1f} ms (p50) or less at every N on every server measured, while a stream "
      f"at N=8 took {e2e:.0f} ms: the event loop only moves bytes", health < e2e / 10);

# %% tags=["nbval-ignore-output"]
lab.plot_sweep({label: loads for label, loads in sweeps.items() if loads})

# %% [markdown]
# - **ITL**, taking turns, grows with N: between two tokens of one stream the engine runs one step for
#   each of the N streams. Batched, a gap is one step of B sequences, and grows only as fast as that step
#   does (section 4).
# - **Tokens per second, all streams together**: taking turns, N users share one engine that advances
#   one stream per step. Batched, a step advances every running sequence, so it can deliver more; how much more on your machine
#   depends on what a step of B costs (section 4) and on how much of the time goes to prefills, which
#   batching does not make cheaper here. Where a prefill costs many decode steps (a slow CPU, short
#   answers), both servers spend most of their time prefilling and the two lines may lie close together.
# - **TTFT** grows with N on both. Taking turns, the prefills of requests that arrive together run one
#   after another: the first user gets a token after one prefill, the last after N. Batched, a group's
#   prompts share one forward, and everyone in the group gets the first token only when it ends. Compare
#   a group's forward with one prompt's (N=1) in section 2's output: a prompt of this length already gives
#   a CPU plenty of arithmetic for each weight it reads, so on many CPUs a group costs not much less than
#   its prompts one by one. Then the batched median TTFT can be higher than taking turns; compare the
#   worst ones in the table. (Splitting prompts into chunks that ride along with the decode steps, as vLLM
#   does, is the next refinement.)
# - **`/health`** stays in milliseconds at every N. Its odd spike comes from the shared GIL: the engine's
#   Python code, the server and this notebook's client and probe all run in one process here.
#
# ## 4. Why a batched step is cheap
#
# A decode step with B sequences, timed directly on the engine for B = 1, 2, 4 and 8 in turns (so that a
# moment when other programs use the CPU slows every size alike):

# %% tags=["nbval-ignore-output"]
steps = lab.batch_step_ms(engine, prompt="Count to ten.")
lab.print_table([{"batch B": b, "step ms": ms, "step vs B=1": ms / steps[1]} for b, ms in steps.items()])
claim(f"a decode step of 8 sequences costs less than 8 steps of one: {steps[8]:.1f} ms against 8 x "
      f"{steps[1]:.1f} ms ({steps[8] / steps[1]:.1f} steps of one)", steps[8] < 8 * steps[1]);

# %% [markdown]
# <!-- mechanism -->
# A decode step reads all of the model's weights and does a little arithmetic with each of them, per
# sequence. With B sequences the weights are read once for all of them; only the arithmetic, and the
# attention over each sequence's own KV cache, grow with B. So the "step vs B=1" column stays below B.
# How far below depends on your CPU: where reading the weights dominates (wide vector units, fast
# arithmetic), a step of 8 may cost little more than a step of one; where the arithmetic dominates, it
# costs several steps of one, but still fewer than 8. That ratio is what makes batching pay (exercise 4
# puts a number on it).
#
# ## 5. A separate engine process
#
# Here the web layer and the engine share one process, and with it one GIL: the engine thread's Python
# code (sampling, detokenizing, the scheduler) competes with the event loop for it, and on 2 cores for the
# CPU as well. That is the noise in `/health` and part of the client-side overhead. vLLM V1 splits them:
# the API server process talks over ZeroMQ sockets to an `EngineCoreProc`, a separate process whose busy
# loop only schedules, runs the model and sends back token ids, at the price of serializing every request
# and token across a process boundary. Notebook 7 measures that split.
#
# ## Summary
#
# - N streams on an engine thread that takes turns: a stream's gap is about N steps (section 1's claim;
#   exercise 3 predicts it), the last first token waits for the prefills before it, and the streams share one token a step.
# - Continuous batching runs one step for all running sequences; a stream's gap is one step of B, which
#   costs less than B steps of one, so the server can deliver more tokens per second in total (how many
#   more depends on your CPU and on how much time goes to prefills).
# - Prompts join in prefill groups and sequences leave when they finish: B changes from step to step.
# - The event loop stays free either way: `/health` answers in milliseconds at every N.
#
# ## Exercises
#
# Reference solutions: `notebooks/solutions/05_concurrency.py`.
#
# **1. Server code: one round of continuous batching.** Write `one_round(engine, waiting, running,
# free_slots)`, the decisions `scheduler.Batched` and the engine thread make between two looks at the inbox.
# `waiting` and `running` are lists of sequences (arrival order), `free_slots` the cache slots free now.
# Admit the first waiting sequences that fit the free slots and prefill them in one forward
# (`engine.prefill_steps(seqs)`); run one decode forward for every running sequence that is not finished
# (`engine.decode_step(seqs, batched=True)`; a prefill can finish a sequence that asked for one token);
# retire every finished sequence (`engine.end(seq)` frees its slot) and take it out of `running`, before
# the round ends. Update both lists. The checker drives your function on the fake runner with 3 slots.

# %%
def one_round(engine, waiting, running, free_slots):
    """Admit into free slots, prefill together, decode everyone in one step, retire the finished."""
    raise NotImplementedError  # your code here


_ = checks.check_one_round(one_round)

# %% [markdown]
# **2.** Write `aggregate_tokens_per_s(traces)`: all tokens of all streams divided by the time from the
# first request sent to the last token received, over all streams. Each `Trace` has `sent_s` (a
# `time.perf_counter()` value, in seconds) and `arrival_ms` (ms after its own `sent_s`).

# %%
def aggregate_tokens_per_s(traces):
    """Total tokens / (last arrival of any stream - first send), in tokens per second."""
    raise NotImplementedError  # your code here


_ = checks.check_aggregate_tokens_per_s(aggregate_tokens_per_s, turns + together)

# %% [markdown]
# **3.** Write `predict_itl_ms(step_ms, n)`: the gap between two tokens of one stream when `n` streams take
# turns on the engine thread (round robin) and each step takes `step_ms`. The checker feeds it the server's
# median step from section 1 and compares with the gap your clients measured, for every N.

# %%
def predict_itl_ms(step_ms, n):
    """A stream's inter-token latency with n streams taking turns, in ms."""
    raise NotImplementedError  # your code here


_ = checks.check_itl_prediction(predict_itl_ms, turns)

# %% [markdown]
# **4.** Write `batched_tokens_per_s(batch, step_ms)`: the total tokens per second of an engine that
# advances `batch` sequences in each step of `step_ms`. The checker feeds it the batched server's steps of
# N sequences from section 2 and compares with what your N clients received together while all of them
# were decoding.

# %%
def batched_tokens_per_s(batch, step_ms):
    """Total tokens per second with `batch` sequences per step."""
    raise NotImplementedError  # your code here


_ = checks.check_batched_tokens_per_s(batched_tokens_per_s, together)

# %% [markdown]
# **5. Explain your numbers.** (a) Read the round table the checker of exercise 1 printed: in which round
# did E get a slot, and why not earlier? (b) Section 4 gave a step of 8 a cost of some steps of one. If a
# step only read the weights, what would that ratio be? What does your ratio say about your CPU? (c) With
# your section 4 table and your prefill time, predict the ratio of the two servers' "tokens/s (all)" at
# N = 8, then compare with section 3. (d) From the prefill groups in section 2, list the batch sizes B
# the decode steps must have carried at N = 8, and check them against the printed ones.
#
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
