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
# 3. Why the step time depends on how many threads run the model (OpenMP thread teams).
# 4. Two traps in that first version's `run_in_executor(next)` loop: the `StopIteration` hang (shown safely, with a
#    timeout) and `inference_mode` lost when a step changes threads.
#
# **Run time:** about 1-2 minutes on 2 CPU cores.

# %% [markdown]
# ## Setup
#
# Four servers on one engine. `ThreadRecorder` wraps the engine and notes which thread ran each step of
# each generation; everything else passes straight through to the engine.
#
# This notebook runs the model's float32 weights through PyTorch (`quant="none"`), the path any model
# takes: a decode step is a few hundred PyTorch operations. (The server's default for this model runs
# the whole step as one call into a C kernel; section 2 says why that one is spared the effect measured
# there.)

# %%
from labserver import Engine, EngineConfig, SamplingParams
from labserver.lab import checks, event_loop as lab
from labserver.serve.background import start_fastapi, start_flask, stop_all

engine = Engine.from_config(EngineConfig(quant="none"))
recorder = lab.ThreadRecorder(engine)
PROMPT, MAX_TOKENS = lab.PROMPT, 32
servers = {"flask": start_flask(recorder)}
for kind in ("blocking", "executor", "thread"):  # the FastAPI app with each backend
    servers[kind] = start_fastapi(recorder, backend=kind, name=f"fastapi-{kind}")
servers

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
# | `run_in_executor(next)` (the first streaming version) | whichever pool thread is free | `await loop.run_in_executor(None, next, gen, DONE)` |
# | engine thread (this server) | one long-lived thread that owns all torch calls | `queue.put(request)`; tokens come back with `loop.call_soon_threadsafe` |
#
# `lab.measure` warms a server up, then sends one greedy request of 32 tokens while `/health` is probed
# every 20 ms. The engine thread goes first: so far, no thread of this process has run the model.

# %%
order = ("thread", "blocking", "executor", "flask")
runs = {kind: lab.measure(servers[kind].url, PROMPT, MAX_TOKENS, stream=kind != "flask",
                          label=lab.LABELS[kind], recorder=recorder) for kind in order}
print(lab.runs_table(runs))

# %%
lab.plot_runs(runs)

# %% [markdown]
# Read the left panel (log scale) from the top:
#
# - **Flask**: a probe that arrives during the generation waits for all of it: one point as high as the
#   generation is long.
# - **async, engine on the loop**: tokens do stream (its TTFT is short), but every model step holds the
#   loop. The loop gets one turn between two steps, and answering a request takes it several turns
#   (accept the connection, read the request, run the handler, send the answer), so each probe waits
#   several steps. `/health` is never dead, always late.
# - **`run_in_executor(next)`** and **engine thread**: the loop only moves bytes, and `/health` answers in
#   a few ms during the whole generation.
#
# The right panel is the server's own `step_ms` per token. The column "step threads" counts the threads
# that ran this request's steps: the executor hands each `next()` to whichever pool thread is free. The
# last column counts the threads of this process that had run the model before each request (its own
# warm-up included).
#
# ## 2. Why do the steps take longer?
#
# Compare the engine thread's "step p50" with the others'. Is the engine thread simply better code?
# Measure it again, now that three other threads have run the model:

# %%
again = lab.measure(servers["thread"].url, PROMPT, MAX_TOKENS, label="engine thread, again", recorder=recorder)
print(f"engine thread, first: step p50 {runs['thread'].step_p50_ms:.1f} ms")
print(f"engine thread, again: step p50 {again.step_p50_ms:.1f} ms  "
      f"({again.torch_threads_before} threads had run the model before it)")

# %% [markdown]
# Same thread, same code: on a quiet 2-core machine its steps take ~33 ms the first time and ~50 ms
# now (on a busy one the noise can hide part of it). On the CPU, PyTorch parallelizes each operation with
# OpenMP, and OpenMP keeps one team of worker threads *per calling thread*. One team of 2 threads fits
# the 2 cores, and its workers wait for the next operation by spinning, so the hundreds of small
# operations of a decode step start at once. Once a second thread has run the model there are more OpenMP threads
# than cores, and libgomp (the OpenMP runtime in PyTorch's CPU wheels) then spins only briefly before
# putting its workers to sleep (see `GOMP_SPINCOUNT` in its manual). From then on every operation pays
# to wake them up, in every thread, for the rest of the process's life.
#
# The default route's C kernel (`labserver/kernels.c`) is built around this: its whole decode step is
# *one* OpenMP parallel region, whose threads meet at barriers that spin instead of sleeping, so it wakes
# the team once per step instead of once per operation.
#
# If other programs were busy on the same cores while this ran, your numbers may show the opposite:
# the first measurement many times *slower*. Spinning is fast only while the team has the cores to
# itself. When another process needs them, a spinning thread burns its time slice waiting for a teammate
# that the OS has paused, and each of the step's hundreds of operations can cost milliseconds. Sleeping
# workers are slower but steady. Production servers avoid both by giving the engine cores of its own.
#
# So the rule is stronger than "don't hop threads": **one thread in the process runs every torch call**.
# The first streaming version's executor breaks it with its pool threads, even with a pool of one; the Flask baseline and
# the naive variant break it as soon as they share a process with another user of the model, as in this
# notebook. The server's engine thread keeps it, as long as nothing else in the process runs the model.
# A thread that ends takes its team with it, which is why `Engine.from_config` loads and converts the
# weights on a short-lived thread: done on this notebook's own (long-lived) thread, that work alone
# would leave a second team behind and slow every step of the engine thread that follows.
#
# ## 3. A closer look at the event loop: a heartbeat
#
# A coroutine that wakes every 5 ms and notes the time is a heartbeat: while the loop is free, the beats
# are 5 ms apart. `lab.heartbeat_gaps` runs one on a fresh event loop while the loop also runs 8 tokens
# of generation, either called directly inside a coroutine or sent to a thread with
# `asyncio.to_thread`. (It uses a loop of its own on a helper thread: the notebook's kernel is already
# running a loop on this one.)

# %%
def work():
    return engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))


on_loop = lab.heartbeat_gaps(work, offload=False)
in_thread = lab.heartbeat_gaps(work, offload=True)
print(f"engine on the loop:    {len(on_loop):3d} beats, longest gap {max(on_loop):6.0f} ms")
print(f"engine in a thread:    {len(in_thread):3d} beats, longest gap {max(in_thread):6.0f} ms")

# %% [markdown]
# Called on the loop, the generation stops the heartbeat for its whole duration: no other coroutine
# (no other request, no `/health`) runs meanwhile. In a thread the heartbeat keeps going. Its gaps are
# not all 5 ms: both threads share the interpreter's lock (the GIL), and the engine's Python code
# (sampling, detokenizing; the default model's forward itself runs in C and lets go of it) holds it now
# and then. That costs milliseconds, not whole generations.
#
# ## 4. Trap 1: the first version's loop never ends
#
# This is how the first streaming version consumed the engine's generator from an async endpoint:

# %%
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

# %%
def three_tokens():
    return engine.generate_stream(PROMPT, SamplingParams(max_tokens=3, temperature=0))


print("StopIteration:", lab.try_stream(lab.stop_iteration_stream, three_tokens, timeout_s=3))

# %% [markdown]
# It received the three tokens and the `Finish`, and then waited until the timeout. The fix is a
# sentinel: `next(gen, DONE)` returns `DONE` at the end instead of raising.

# %%
lab.show_source(lab.sentinel_stream)
print("sentinel:     ", lab.try_stream(lab.sentinel_stream, three_tokens, timeout_s=30))

# %% [markdown]
# (Starlette's `iterate_in_threadpool` does the same for you. The engine thread never has this problem:
# it calls `next(gen, DONE)` on its own thread and hands items over through a queue.)
#
# ## 5. Trap 2: `inference_mode` stays behind on the thread
#
# The first version's generator wrapped its whole loop in `with torch.inference_mode():`. Grad mode is
# *thread-local* state: entering the `with` switches it on for the thread that runs that line, not for
# the generator. `lab.inference_mode_steps` drives such a generator (the real model) with `next()` calls
# sent to worker threads, as `run_in_executor` does, and records the mode in each step.

# %%
demo = lab.inference_mode_steps(engine, steps=6, hop=True)
lab.print_table(demo.steps)
print("in inference mode while the generator waits:", demo.left_in_inference_mode)

# %% [markdown]
# Every step that lands on the other thread runs with autograd on: it records a graph for the logits
# (`graph_recorded`), which costs time and memory, and would fail outright on an operation that must save
# an inference tensor for backward. And the mode leaks the other way: while the generator waits between
# steps, the thread that entered the `with` block stays in inference mode, so whatever else that pool
# thread runs meanwhile inherits it (and which thread finally leaves the block is up to the pool). With
# every step on one thread, the mode is what the code says:

# %%
lab.print_table(lab.inference_mode_steps(engine, steps=6, hop=False).steps)

# %% [markdown]
# This engine avoids the trap twice: each phase (`prefill`, `decode_one_token`) enters
# `inference_mode` itself, and all its steps run on one thread anyway.
#
# ## 6. Where the engine should run
#
# Put together: the model must not run on the event loop (sections 1 and 3), and its steps must not be
# spread over several threads (sections 2 and 5). So this server gives the engine **one long-lived thread** that owns
# every torch call. Requests reach it through a thread-safe queue; it advances each active generation
# by one step in turn and hands each token back to the event loop with `loop.call_soon_threadsafe` into
# a per-request `asyncio.Queue`. SGLang runs its scheduler in its own thread for the same reasons; vLLM
# V1 goes one step further and runs it in a separate process (notebook 5).
#
# ## Summary
#
# - The event loop runs everything else only while the current coroutine `await`s. Model steps never
#   await: called on the loop, they stall every other request for a step at a time.
# - Flask stalls `/health` for a whole generation, the naive async variant for one step at a time; the
#   executor and the engine thread keep it at milliseconds.
# - The first version's `except StopIteration` loop hangs after the last token: use a sentinel,
#   `next(gen, DONE)`.
# - Every thread that runs the model gets its own OpenMP team; more teams than cores make every step
#   slower, in every thread. Grad mode is thread-local too and follows the thread, not the generator.
#   One dedicated engine thread that owns every torch call keeps both right.
#
# ## Exercises
#
# The checkers here use `fake_engine` (fixed sleeps instead of the model), so their verdict does not
# depend on how busy the machine is. Reference solutions: `notebooks/solutions/03_event_loop.py`.
#
# **1.** Write `stream_tokens(gen)`, an async generator that yields every item of the (synchronous)
# generator `gen`, running each `next` in a thread pool, and that *finishes* after the last item.

# %%
async def stream_tokens(gen):
    """Yield every item of gen; each next() runs in a thread, never on the event loop."""
    raise NotImplementedError  # your code here
    yield


checks.check_stream_tokens(stream_tokens)

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


checks.check_one_thread(stream_on_one_thread)

# %% [markdown]
# ## Clean up

# %%
stop_all()
