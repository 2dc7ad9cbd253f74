# %% [markdown]
# # 3. The event loop: why inference must leave it, and where it should go
#
# An async server (FastAPI on uvicorn) serves every connection from one thread, the *event loop*. It can
# interleave thousands of requests because each one only ever waits with `await`, and while one waits
# the loop runs another. A model step is not a wait: it is tens of milliseconds of computation. This
# notebook measures four places to put that computation.
#
# **What you will learn**
#
# 1. Four ways to run the engine behind a server, side by side: `/health` latency during a generation and
#    per-token `step_ms` for Flask, a naive `async def`, the `run_in_executor(next)` loop of this
#    server's first streaming version, and the dedicated engine thread.
# 2. What "blocking the event loop" means, seen from `/health` and from a heartbeat coroutine.
# 3. Two traps in that first version's `run_in_executor(next)` loop: the `StopIteration` hang (shown
#    safely, with a timeout) and `inference_mode` lost when a step changes threads.
# 4. How to write the bridge from the engine's blocking generator to the event loop yourself.
#
# **Run time:** about a minute on a 2-core laptop CPU; a few minutes on a slow one.

# %% [markdown]
# ## Setup
#
# Four servers on one engine. `ThreadRecorder` wraps the engine and notes which thread ran each step of
# each generation; everything else passes straight through to the engine. The demos' lengths come from
# the engine's speed, measured first.

# %% tags=["nbval-ignore-output"]
import time

from labserver import SamplingParams
from labserver.lab.setup import load_engine
from labserver.lab import checks, event_loop as lab
from labserver.lab.claims import claim
from labserver.serve.background import start_fastapi, start_flask
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine(prefix_caching=False)  # SmolLM2-135M-Instruct on the CPU; prints its route
speed = lab.measure_speed(engine)
recorder = lab.ThreadRecorder(engine)
PROMPT, MAX_TOKENS = lab.PROMPT, lab.tokens_for(1000, speed.prefill_ms, speed.step_ms)
servers = {"flask": start_flask(recorder)}
for kind in ("blocking", "executor", "thread"):  # the FastAPI app with each backend
    servers[kind] = start_fastapi(recorder, backend=kind, name=f"fastapi-{kind}")
print(f"{speed}; the demos generate {MAX_TOKENS} tokens")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. Four variants, side by side
#
# The same FastAPI app with three backends, and the Flask baseline. What each does with a request:
#
# | variant | where `next(generator)` runs | sketch |
# |---|---|---|
# | Flask (WSGI) | the server's only thread | `return engine.generate(...)` |
# | async, engine on the loop | the event loop | `async def ...: for item in gen: yield item` |
# | `run_in_executor(next)` (the first streaming version) | whichever pool thread is free | each `next(gen)` sent to the default thread pool |
# | engine thread (this server) | one long-lived thread that owns all torch calls | `queue.put(request)`; tokens come back with `loop.call_soon_threadsafe` |
#
# `lab.measure` warms a server up, then sends one greedy request while `/health` is probed about once per
# decode step.

# %% tags=["nbval-ignore-output"]
order, every = ("thread", "blocking", "executor", "flask"), lab.probe_interval_ms(speed.step_ms)
runs = {kind: lab.measure(servers[kind].url, PROMPT, MAX_TOKENS, stream=kind != "flask", interval_ms=every,
                          label=lab.LABELS[kind], recorder=recorder) for kind in order}
print(lab.runs_table(runs))
worst = {kind: run.probe.summary()["max_ms"] for kind, run in runs.items()}
claim(f"Flask held /health for most of its generation: longest answer {worst['flask']:.0f} ms of "
      f"{runs['flask'].trace.e2e_ms:.0f} ms", worst["flask"] > 0.5 * runs["flask"].trace.e2e_ms)
claim(f"with the engine on the loop a probe waited longer than a decode step: {worst['blocking']:.0f} ms "
      f"against a step of {runs['blocking'].step_p50_ms:.0f} ms", worst["blocking"] > runs["blocking"].step_p50_ms)
typical = {kind: run.probe.summary()["p50_ms"] for kind, run in runs.items()}  # the median: spikes aside
claim(f"the engine thread kept the loop free: /health p50 {typical['thread']:.1f} ms, against "
      f"{typical['blocking']:.1f} ms with the engine on the loop", typical["thread"] < typical["blocking"]);

# %% tags=["nbval-ignore-output"]
lab.plot_runs(runs)

# %% [markdown]
# Read the left panel (log scale) from the top:
#
# - **Flask**: a probe that arrives during the generation waits for all of it: one point as high as the
#   generation is long.
# - **async, engine on the loop**: tokens do stream (its TTFT is short), but every model step holds the
#   loop. The loop gets one turn between two steps, and answering a request takes it several turns
#   (accept the connection, read the request, run the handler, send the answer), so a probe waits for
#   one step or several. `/health` is late by steps, not by the whole generation.
# - **`run_in_executor(next)`** and **engine thread**: the loop only moves bytes, and `/health` answers in
#   a few ms during the whole generation.
#
# The right panel is the server's own `step_ms` per token. The column "step threads" counts the threads
# that ran this request's steps: the executor hands each `next()` to whichever pool thread is free. The
# last column counts the threads of this process that had run the model before each request (its own
# warm-up included).
#
# The "step p50" column differs between the variants too. How fast a step runs depends on which thread
# runs it and on how many threads of the process have run the model: the optional appendix notebook
# (`09_appendix_cpu`) measures that. E2E follows the steps: whichever variant's steps ran slowest on this
# run has the longest E2E, the engine thread this server uses included, and which one that is may change
# from CPU to CPU and from run to run. This notebook is about the event loop, whose measure is `/health`.
#
# ## 2. A closer look at the event loop: a heartbeat
#
# A coroutine that wakes every 5 ms and notes the time is a heartbeat: while the loop is free, the beats
# are 5 ms apart. `lab.heartbeat_gaps` runs one on a fresh event loop while the loop also runs a short
# generation (sized to last many beats here), either called directly inside a coroutine or sent to a
# thread with `asyncio.to_thread`. (It uses a loop of its own on a helper thread: the notebook's kernel is already
# running a loop on this one.)

# %% tags=["nbval-ignore-output"]
tokens, took = lab.tokens_for(300, speed.prefill_ms, speed.step_ms, lo=8), []


def work():  # a short greedy generation that notes how long it ran
    start = time.perf_counter()
    engine.generate(PROMPT, SamplingParams(max_tokens=tokens, temperature=0))
    took.append((time.perf_counter() - start) * 1000)


on_loop, in_thread = lab.heartbeat_gaps(work, offload=False), lab.heartbeat_gaps(work, offload=True)
print(f"engine on the loop: {len(on_loop):3d} beats;  in a thread: {len(in_thread):3d} beats")
claim(f"on the loop the heartbeat stopped for {max(on_loop):.0f} ms, as long as the generation ran ({took[0]:.0f} ms); "
      f"in a thread its longest gap was {max(in_thread):.0f} ms", max(on_loop) >= took[0] > max(in_thread));

# %% [markdown]
# Called on the loop, the generation stops the heartbeat for its whole duration: no other coroutine
# (no other request, no `/health`) runs meanwhile. In a thread the heartbeat keeps going. If its gaps are
# not all 5 ms, it is because both threads share the interpreter's lock (the GIL), and the engine's Python
# code (sampling, detokenizing; the default model's forward itself runs in C and lets go of it) holds it
# now and then: the claim above compares its longest gap with the whole generation.
#
# ## 3. Trap 1: the first version's loop never ends
#
# This is how the first streaming version consumed the engine's generator from an async endpoint:

# %% tags=["nbval-ignore-output"]
lab.show_source(lab.stop_iteration_stream)

# %% [markdown]
# It looks right, and it streams every token. Then, after the last one, `next` raises `StopIteration`
# in the pool thread, and asyncio refuses to put a `StopIteration` into a Future (coroutines are built on
# generators, where `StopIteration` means "this generator has returned"). The `TypeError` it raises
# instead happens inside a callback where nobody awaits it, and the `await` never returns: the request
# hangs forever after its last token.
#
# `lab.try_stream` runs such a loop on its own event loop in a helper thread, gives up after `timeout_s`
# and reports what asyncio logged, so this notebook cannot hang. Three real tokens from the engine:

# %% tags=["nbval-ignore-output"]
def three_tokens():
    return engine.generate_stream(PROMPT, SamplingParams(max_tokens=3, temperature=0))


wait_s = 2 + 5 * (speed.prefill_ms + 2 * speed.step_ms) / 1000  # several times what 3 tokens take here
trap = lab.try_stream(lab.stop_iteration_stream, three_tokens, timeout_s=wait_s)
print("StopIteration:", trap)
claim(f"the loop received all {len(trap.items)} items (3 tokens and the Finish) and then never returned: "
      f"{trap.outcome} after {trap.elapsed_s:.1f} s", trap.outcome == "hung" and len(trap.items) == 4);

# %% [markdown]
# It received the three tokens and the `Finish`, and then waited until the timeout. A server with this
# loop keeps every finished request open forever (and a client that waits for the end of the stream
# waits with it). Exercise 1 asks you to write a loop that ends; the engine thread never has the
# problem, because it hands items to the event loop through a queue, on its own thread.
#
# ## 4. Trap 2: `inference_mode` stays behind on the thread
#
# The first version's generator wrapped its whole loop in `with torch.inference_mode():`. Grad mode is
# *thread-local* state: entering the `with` switches it on for the thread that runs that line, not for
# the generator. `lab.inference_mode_steps` drives such a generator (the real model) with `next()` calls
# sent to worker threads, as `run_in_executor` does, and records the mode in each step.

# %% tags=["nbval-ignore-output"]
demo = lab.inference_mode_steps(engine, steps=6, hop=True)
lab.print_table(demo.steps)
print("in inference mode while the generator waits:", demo.left_in_inference_mode)
hopped = [row for row in demo.steps if row.get("thread", "").startswith("pool-1")]
claim(f"every one of the {len(hopped)} steps run on the other pool thread ran with autograd on and recorded "
      f"a graph", bool(hopped) and all(row["grad_enabled"] and row["graph_recorded"] for row in hopped));

# %% [markdown]
# Every step that lands on the other thread runs with autograd on: it records a graph for the logits
# (`graph_recorded`), which costs time and memory, and would fail outright on an operation that must save
# an inference tensor for backward. And the mode leaks the other way: while the generator waits between
# steps, the thread that entered the `with` block stays in inference mode, so whatever else that pool
# thread runs meanwhile inherits it (and which thread finally leaves the block is up to the pool). With
# every step on one thread, the mode is what the code says:

# %% tags=["nbval-ignore-output"]
steady = lab.inference_mode_steps(engine, steps=6, hop=False).steps
lab.print_table(steady)
claim("with every step on one thread, no step recorded a graph",
      all(row.get("inference_mode") and not row.get("graph_recorded") for row in steady));

# %% [markdown]
# <!-- mechanism -->
# This engine avoids the trap twice: each phase (`prefill`, `decode_one_token`) enters
# `inference_mode` itself, and all its steps run on one thread anyway.
#
# ## 5. Where the engine should run
#
# Put together: the model must not run on the event loop (sections 1 and 2), and its steps must not be
# spread over several threads (section 4, and the appendix on CPU threads). So this server gives the
# engine **one long-lived thread** that owns every torch call. Requests reach it through a thread-safe queue; it advances each active generation
# by one step in turn and hands each token back to the event loop with `loop.call_soon_threadsafe` into
# a per-request `asyncio.Queue`. SGLang runs its scheduler in its own thread for the same reasons; vLLM
# V1 goes one step further and runs it in a separate process (notebook 7).
#
# ## Summary
#
# - The event loop runs everything else only while the current coroutine `await`s. Model steps never
#   await: called on the loop, they stall every other request while they run: step by step when the
#   loop gets a turn between two steps, for the whole generation when it gets none.
# - Flask stalls `/health` for a whole generation; the naive async variant holds it whenever a step runs
#   on the loop (how long on your run: its table above); the executor and the engine thread keep the loop
#   free.
# - The first version's `except StopIteration` loop hangs after the last token: asyncio cannot carry
#   `StopIteration` through a Future.
# - Grad mode is thread-local: it follows the thread, not the generator. One dedicated engine thread
#   that owns every torch call keeps it right (and keeps the CPU's thread teams stable: appendix).
#
# ## Exercises
#
# The checkers here use `fake_engine` (fixed sleeps instead of the model), so their verdict does not
# depend on how busy the machine is. Reference solutions: `notebooks/solutions/03_event_loop.py`.
#
# **1.** Write the bridge from the engine's blocking generator to the event loop: `stream_tokens(gen)`,
# an async generator that yields every item of the (synchronous) generator `gen`, running each `next`
# in a thread pool, and that *finishes* after the last item. The checker runs it on small iterators (a
# bridge that hangs at the end fails after a timeout), then serves it in a FastAPI app on `fake_engine`
# and probes `/health` during a stream: a bridge that runs the steps on the loop fails there.

# %%
async def stream_tokens(gen):
    """Yield every item of gen; each next() runs in a thread, never on the event loop."""
    raise NotImplementedError  # your code here
    yield


_ = checks.check_stream_tokens(stream_tokens)

# %% [markdown]
# **2.** Write `stream_on_one_thread(gen)`: the same, but every step of every stream runs on the *same*
# thread, which is not the event loop's (the heart of the engine thread, without its queue). The
# checker runs two streams at once, records the thread of every step and watches a heartbeat on the
# loop. (Hint: what does `loop.run_in_executor(None, ...)` do when two streams ask at once?)

# %%
async def stream_on_one_thread(gen):
    """Yield every item of gen; all next() calls of all streams run on one dedicated thread."""
    raise NotImplementedError  # your code here
    yield


_ = checks.check_one_thread(stream_on_one_thread)

# %% [markdown]
# **3.** *Explain your number.* In section 1, how many `/health` probes did the "engine on the loop"
# variant answer during its generation, and how many did the engine thread answer? Explain both counts
# from the probe interval, this run's step time and the number of loop turns a request needs.
#
# **4.** *Explain your number.* In section 2, the heartbeat in a thread still had gaps longer than 5 ms.
# Which work of the generation holds the GIL? Would a faster model make those gaps shorter or longer?

# %% [markdown]
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
