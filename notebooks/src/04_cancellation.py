# %% [markdown]
# # 4. Cancellation: when the user stops reading
#
# People close tabs, press "stop generating", or give up on a slow answer. Every token the server
# computes after that is work for nobody, taken from the users who are still waiting. This notebook
# closes a stream early and watches the engine, then does the same to servers that answer in one piece,
# and ends with you writing the piece of a handler that lets such a server notice too.
#
# **What you will learn**
#
# 1. How a streaming server learns that its client has gone: the next send fails, and that signal has to
#    travel all the way to the engine thread.
# 2. How to show it stopped: the engine's counters (generations running, tokens generated) sampled while
#    the client leaves.
# 3. What a server that answers in one piece does instead: it computes the whole answer for a client that
#    is gone, unless its handler listens for `http.disconnect` while it waits.
#
# **Run time:** about 1 minute on 2 CPU cores (longer where a decode step is slow: the demos size
# themselves from your machine's step time).

# %% [markdown]
# ## Setup
#
# The streaming FastAPI server (engine thread) and the Flask baseline, on one engine. Both run in this
# process, so the notebook can read the engine's own counters: `engine.running` (generations in
# progress) and `engine.tokens_generated` (a running total).

# %% tags=["nbval-ignore-output"]
from labserver.lab.setup import load_engine
from labserver.lab import checks, cancellation as lab
from labserver.lab.claims import claim
from labserver.measure.client import blocking_generate, stream_generate
from labserver.serve.background import start_fastapi, start_flask
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine(prefix_caching=False)  # SmolLM2-135M-Instruct on the CPU; prints its route
PROMPT = lab.PROMPT
fastapi, flask = start_fastapi(engine), start_flask(engine)
stream_generate(fastapi.url, PROMPT, 2, temperature=0)  # warm-up on each server
blocking_generate(flask.url, PROMPT, 2, temperature=0)
print(fastapi, flask, "running:", engine.running, "tokens so far:", engine.tokens_generated)

# %% [markdown]
# How long does this machine take to prefill the prompt and to run one decode step? The demos below are
# sized from these numbers, so that they show the same thing on a fast laptop and on a slow one.
# `blocking_plan` picks a request that takes over a second and a client that gives up after a third of
# it. It plans with the faster of the step measured now and the one the engine's route calibration
# measured when it first started on this machine: if other programs slow the machine down now, the
# client leaves earlier in the answer, never after it.

# %% tags=["nbval-ignore-output"]
timing = lab.measure_timing(fastapi.url, engine)
n_block, give_up_s = lab.blocking_plan(timing)
print(f"now: prefill {timing.prefill_ms:.0f} ms, step {timing.step_ms:.1f} ms; "
      f"calibration's step: {timing.quiet_step_ms} ms")
print(f"blocking demo: {n_block} tokens, {timing.fastest().generation_ms(n_block) / 1000:.1f} s of work "
      f"at the fastest; the client gives up after {give_up_s:.2f} s")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. Close a stream after 5 tokens
#
# `lab.hang_up` asks for 128 tokens (`ignore_eos`, so the model cannot end early), reads 5 token events
# and closes the connection. A watcher thread samples the engine's counters meanwhile, and keeps watching
# until the engine is idle and a little longer.

# %% tags=["nbval-ignore-output"]
watch_ms = min(20.0, max(1.0, timing.step_ms / 3))  # a few samples per step
stream_left = lab.hang_up(engine, fastapi.url, after_tokens=5, max_tokens=128, label="FastAPI, stream",
                          interval_ms=watch_ms)
lab.print_table([stream_left.row()])
claim(f"the engine computed {stream_left.generated} tokens for a client that read {stream_left.received} "
      f"of the 128 it asked for: at most 3 more than it read", stream_left.wasted <= 3,
      why="the cancel flag reached the engine late; a very busy machine can delay the event loop");

# %% [markdown]
# The engine stopped within a step or two of the client leaving, instead of running the remaining
# ~120 steps. The chain that made it happen:
#
# 1. The client closes the TCP connection.
# 2. Starlette notices on its next send of a token (or when the server reads `http.disconnect`) and
#    closes the response's async generator.
# 3. Closing it sets the request's `cancel` event; the engine thread checks that event before every step
#    and retires the generation, so `engine.running` drops at once.
#
# Step 3 is why the engine runs on a thread with a cancel flag: a generator that is in the middle of a
# step on another thread cannot be closed from the outside, it can only be asked to stop.
#
# ## 2. The same with servers that answer in one piece
#
# A client of a non-streaming request can only leave by giving up: here an `httpx` timeout after a third
# of the generation it asked for. Once with the Flask baseline, once with a small async server
# (`lab.start_json_app`) whose handler does what most handlers do: `await` the answer, listening for
# nobody (`lab.just_wait`).

# %% tags=["nbval-ignore-output"]
naive = lab.start_json_app(engine, lab.just_wait)
blocking = [lab.hang_up(engine, server.url, stream=False, after_s=give_up_s, max_tokens=n_block, label=label,
                        interval_ms=watch_ms)
            for server, label in ((flask, "Flask"), (naive, "async, just_wait"))]
runs = [stream_left, *blocking]
lab.print_table([run.row() for run in runs])
claim("both clients gave up: their timeouts fired after "
      + " and ".join(f"{run.hangup_ms:.0f} ms" for run in blocking), all(run.timed_out for run in blocking),
      why="an answer came before the timeout: the machine ran faster than measured at the top")
for run in blocking:
    claim(f"{run.label}: the engine computed all {run.generated} of {n_block} tokens, {run.after_left} of "
          "them after the client had left", run.generated == n_block and run.after_left > n_block / 2)

# %% tags=["nbval-ignore-output"]
lab.plot_cancel(runs)

# %% [markdown]
# The grey line is the engine's work, the blue steps what the client received, the red line when the
# client left. With a stream, the work stops at the red line. Without one, it goes on to the last token.
#
# Why the servers that answer in one piece keep going: nothing is sent before the answer is complete,
# so there is no failed send to notice. A WSGI app cannot learn about the disconnect at all; an ASGI app
# can, if its handler listens for `http.disconnect` while it waits, and `just_wait` does not. Meanwhile
# the Flask server, one request at a time, makes everyone else wait for an answer that nobody will read.
#
# ## 3. What the wasted tokens cost
#
# Each token computed after the client left is one decode step that another user's request could have
# used. In engine time, with the step measured at the top:

# %% tags=["nbval-ignore-output"]
for run in runs:
    print(f"{run.label:18s} {run.after_left:4d} tokens after the client left = "
          f"{run.after_left * timing.step_ms / 1000:.2f} s of engine time")
wasted_s = sum(run.after_left for run in blocking) * timing.step_ms / 1000
claim(f"the two answers in one piece cost {wasted_s:.2f} s of engine time for nobody, over 10 times what "
      f"the stream cost (tokens beyond what it read: {stream_left.wasted})",
      wasted_s > 10 * max(stream_left.wasted, 1) * timing.step_ms / 1000);

# %% [markdown]
# ## Summary
#
# - A streaming server learns that its client left on the next send; the signal must reach the engine
#   (a cancel flag checked between steps) to stop the work within a step or two.
# - Show it with the engine's counters: running generations and tokens generated, before and after.
# - A server that answers in one piece notices nothing unless its handler listens for `http.disconnect`
#   while it waits; otherwise it finishes the answer for nobody, and a one-request-at-a-time server makes
#   everyone else wait meanwhile.
# - Streaming is therefore not only about the first token: it is also what makes cancellation work.
#
# ## Exercises
#
# Reference solutions: `notebooks/solutions/04_cancellation.py`.
#
# **1.** Write `hang_up_after(url, n)`: start a greedy stream of up to 200 tokens, read `n` token events
# (with `httpx_sse.connect_sse` or your `my_stream` from notebook 2), close the connection and return the
# number of token events read. The checker reads the engine's counters to see whether it stopped.

# %%
def hang_up_after(url, n):
    """Read n token events of a long greedy stream, then close it. Returns the number read."""
    raise NotImplementedError  # your code here


_ = checks.check_hang_up(hang_up_after, engine, fastapi.url)

# %% [markdown]
# **2.** A client-side stop string: write `stream_until(url, prompt, stop)` that streams a greedy
# answer (up to 64 tokens), hangs up as soon as the text received so far contains `stop`, and returns
# that text cut right after the first `stop`. The checker picks a `stop` from the model's own answer,
# compares your text with the full answer and checks that the engine did not keep going.

# %%
def stream_until(url, prompt, stop):
    """The greedy answer up to and including the first `stop`; stops the server's work there."""
    raise NotImplementedError  # your code here


_ = checks.check_stop_string(stream_until, engine, fastapi.url)

# %% [markdown]
# **3. Server code: cancel an answer in one piece.** Write the part of a non-streaming handler that waits:
# `async def wait_or_cancel(request, work)` gets the Starlette `request` and `work`, the coroutine that
# produces the answer. Return its result; but if the client leaves first, cancel `work` and return `None`.
# After the body has been read, `await request.receive()` returns `{"type": "http.disconnect"}` when the
# client goes (the way vLLM's `with_cancellation` notices). Cancelling the task that runs `work` closes the
# engine's stream, which sets the generation's cancel flag. The checker serves your function as the
# handler of `lab.json_app` on `fake_engine` and counts the tokens the engine computes after a client
# gives up.

# %%
async def wait_or_cancel(request, work):
    """The result of `work`, or None (with `work` cancelled) if the client disconnects first."""
    raise NotImplementedError  # your code here


_ = checks.check_wait_or_cancel(wait_or_cancel)

# %% [markdown]
# **4. Explain your numbers.** (a) In section 1 the engine computed a few tokens more than the client read,
# or none: from your step time and the three links of the chain, say which link takes the time. (b) Before
# looking at section 2's table again, predict from `timing` how many tokens the blocking engine computed
# after its client left, and compare. (c) Once exercise 3 passes, run section 2 again with
# `lab.start_json_app(engine, wait_or_cancel)` on the real model: how many tokens after the client left
# now? (d) Send `lab.hang_up(engine, fastapi.url, stream=False, ...)` to the lab's own server: does its
# non-streaming path listen? Explain from the counts.
#
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
