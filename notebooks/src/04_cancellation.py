# %% [markdown]
# # 4. Cancellation: when the user stops reading
#
# People close tabs, press "stop generating", or give up on a slow answer. Every token the server
# computes after that is work for nobody, taken from the users who are still waiting. This notebook
# closes a stream early and watches the engine, then does the same to the blocking servers.
#
# **What you will learn**
#
# 1. How a streaming server learns that its client has gone: the next send fails, and that signal has to
#    travel all the way to the engine thread.
# 2. How to show it stopped: the engine's counters (generations running, tokens generated) sampled while
#    the client leaves.
# 3. What a blocking server does instead: it computes the whole answer for a client that is gone.
# 4. What the wasted tokens cost everyone else.
#
# **Run time:** about 1 minute on 2 CPU cores.

# %% [markdown]
# ## Setup
#
# The streaming FastAPI server (engine thread) and the Flask baseline, on one engine. Both run in this
# process, so the notebook can read the engine's own counters: `engine.running` (generations in
# progress) and `engine.tokens_generated` (a running total).

# %%
import httpx

from labserver import Engine, EngineConfig
from labserver.lab import checks, cancellation as lab
from labserver.measure.client import blocking_generate, stream_generate
from labserver.serve.background import start_fastapi, start_flask, stop_all

engine = Engine.from_config(EngineConfig())
PROMPT = lab.PROMPT
fastapi, flask = start_fastapi(engine), start_flask(engine)
stream_generate(fastapi.url, PROMPT, 2, temperature=0)  # warm-up on each server
blocking_generate(flask.url, PROMPT, 2, temperature=0)
print(fastapi, flask, "running:", engine.running, "tokens so far:", engine.tokens_generated)

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. Close a stream after 5 tokens
#
# `lab.hang_up` asks for up to 128 tokens (several seconds of work), reads 5 token events and closes
# the connection. A watcher thread samples the engine's counters every 5 ms meanwhile, and keeps
# watching until the engine is idle and a little longer.

# %%
stream_left = lab.hang_up(engine, fastapi.url, after_tokens=5, max_tokens=128, label="FastAPI, stream")
lab.print_table([stream_left.row()])
print("/health now:", httpx.get(fastapi.url + "/health").json())

# %% [markdown]
# The engine computed at most one or two tokens more than the client read, and was idle about one step
# after the client left, instead of running the remaining ~120 steps. The chain that
# made it happen:
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
# ## 2. The same with the blocking servers
#
# A blocking client can only leave by giving up: here an `httpx` timeout of 0.5 s on a request of 48
# tokens. Once with the Flask baseline, once with the FastAPI server without streaming (`stream=false`).

# %%
flask_left = lab.hang_up(engine, flask.url, stream=False, after_s=0.5, max_tokens=48, label="Flask")
json_left = lab.hang_up(engine, fastapi.url, stream=False, after_s=0.5, max_tokens=48,
                        label="FastAPI, stream=false")
runs = [stream_left, json_left, flask_left]
lab.print_table([run.row() for run in runs])

# %%
lab.plot_cancel(runs)

# %% [markdown]
# The grey line is the engine's work, the blue steps what the client received, the red line when the
# client left. With a stream, the work stops at the red line. Without one, it goes on to the last token.
#
# Why the blocking servers keep going: nothing is sent before the answer is complete, so there is no
# failed send to notice. A WSGI app cannot learn about the disconnect at all; an ASGI app could listen
# for `http.disconnect` while it waits, but the non-streaming path of this server does not. Meanwhile the
# Flask server, one request at a time, makes everyone else wait for an answer that nobody will read.
#
# ## 3. What the wasted tokens cost
#
# Each wasted token is one decode step that another user's request could have used.

# %%
step_ms = lab.measure(fastapi.url, PROMPT, 16).step_p50_ms
for run in runs:
    print(f"{run.label:24s} {run.wasted:3d} tokens for nobody = {run.wasted * step_ms / 1000:.1f} s of engine time")

# %% [markdown]
# ## Summary
#
# - A streaming server learns that its client left on the next send; the signal must reach the engine
#   (a cancel flag checked between steps) to stop the work within a step or two.
# - Show it with the engine's counters: running generations and tokens generated, before and after.
# - A blocking server cannot notice: it finishes the answer for nobody, and a one-request-at-a-time server
#   makes everyone else wait meanwhile.
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


checks.check_hang_up(hang_up_after, engine, fastapi.url)

# %% [markdown]
# **2.** A client-side stop string: write `stream_until(url, prompt, stop)` that streams a greedy
# answer (up to 64 tokens), hangs up as soon as the text received so far contains `stop`, and returns
# that text cut right after the first `stop`. The checker compares with the full answer and checks that
# the engine did not keep going.

# %%
def stream_until(url, prompt, stop):
    """The greedy answer up to and including the first `stop`; stops the server's work there."""
    raise NotImplementedError  # your code here


checks.check_stop_string(stream_until, engine, fastapi.url)

# %% [markdown]
# ## Clean up

# %%
stop_all()
