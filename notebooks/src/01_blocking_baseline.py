# %% [markdown]
# # 1. The blocking baseline: the whole answer, all at once
#
# A language model writes its answer one token at a time. A classic web server (Flask on WSGI) waits for
# the last token and then sends everything in one response. This notebook measures what that costs the
# person waiting and the server itself.
#
# **What you will learn**
#
# 1. What one answer costs inside the engine: one *prefill* over the prompt, then one *decode step* per
#    token, each measured as `step_ms`.
# 2. Why the time to first token (TTFT) of a blocking server is the whole generation time.
# 3. Why a blocking server answers nothing else while it generates: `/health` waits, and so does a
#    second user.
# 4. The names the rest of the lab uses: TTFT, ITL, E2E and `step_ms`.
#
# **Run time:** about 1 minute on 2 CPU cores (a few short generations of 32 tokens).
#
# Everything here is measured on this machine with the default model, SmolLM2-135M-Instruct, decoding
# greedily (temperature 0) so the text is the same on every run. The timings are not: other programs on
# the machine make them noisy. Read the shapes and the rough sizes, not the last digit.

# %% [markdown]
# ## Setup
#
# The engine is the model, its tokenizer and a generation loop, in this Python process. Loading takes
# about a second (the very first time ~15 s, to convert the model file once).

# %%
from labserver import Engine, EngineConfig, SamplingParams
from labserver.lab import checks, baseline as lab
from labserver.measure import plotting
from labserver.measure.client import blocking_generate, run_concurrent
from labserver.measure.probes import HealthProbe
from labserver.serve.background import start_flask, stop_all

engine = Engine.from_config(EngineConfig())  # SmolLM2-135M-Instruct on the CPU, 2 threads
PROMPT, MAX_TOKENS = lab.PROMPT, 32
params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)  # greedy: the same text every run
print(PROMPT)

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. The engine on its own
#
# `engine.generate_stream(prompt, params)` is a Python generator. Each `next()` runs the model once and
# yields a `TokenEvent`: the text this token adds, its id, its position, and `step_ms`, how long that
# step took. The first step is the *prefill*: the whole prompt (here ~40 tokens, inside the chat
# template) goes through the model in one forward pass, and the first token comes out of it.

# %%
for event in engine.generate_stream(PROMPT, params):
    print(event)
    if event.index == 3:
        break  # leaving the loop closes the generator: the engine stops here

# %% [markdown]
# Now the whole answer, one bar per token. The first (orange) bar is the prefill; every later bar is one
# decode step: one token in, the cached keys and values of all earlier tokens reused, one token out.

# %%
completion = engine.generate(PROMPT, params)
print(repr(completion.text))
print(completion.finish.timings)
lab.plot_engine_steps(completion)

# %% [markdown]
# The decode steps are all about the same size: each one reads all 135M weights once, whatever the
# token. So an answer of *n* tokens costs about `prefill + (n - 1) * step`. Whoever waits for the
# complete answer waits for the sum of all these bars.
#
# ## 2. The same engine behind Flask
#
# `start_flask` serves the engine with the Flask app in a background thread, one request at a time (as
# WSGI does). Re-running the cell replaces the server instead of starting a second one.

# %%
flask = start_flask(engine)
blocking_generate(flask.url, PROMPT, 2, temperature=0)  # warm-up: first connection, first steps
trace = blocking_generate(flask.url, PROMPT, MAX_TOKENS, temperature=0)
print(flask)
print(f"TTFT {trace.ttft_ms:.0f} ms   E2E {trace.e2e_ms:.0f} ms   {trace.n_tokens} tokens")
print(repr(trace.text))

# %% [markdown]
# Compare the median decode step with the engine's own in section 1:

# %%
print(f"engine alone (this thread):   step p50 {lab.median(e.step_ms for e in completion.events[1:]):.1f} ms")
print(f"behind Flask (its own thread): step p50 {lab.median(trace.decode_step_ms):.1f} ms")

# %% [markdown]
# The steps behind Flask take about as long as alone (a few ms either way is noise), though a second
# thread of this process now runs the model. With PyTorch's own path (`EngineConfig(quant="none")`)
# that alone would make every step slower, in both threads; this model's default route runs each
# decode step as one call into a C kernel built to be spared it. Notebook 3 measures the effect and
# why; here it would only change how long the wait is.
#
# The client records a `Trace`: when each token arrived, in ms after the request was sent, and what the
# server says it spent on it (`step_ms`, from the JSON body). The names follow `vllm bench serve`:
#
# - **TTFT** (time to first token): the first token's arrival. For a blocking server: the whole response.
# - **ITL** (inter-token latency): the gaps between consecutive tokens' arrivals.
# - **E2E** (end to end): the last token's arrival.
#
# Every token of a blocking response arrives in the same instant, so all the gaps are zero:

# %%
print("arrival (ms) of the first 5 tokens:", [round(t) for t in trace.arrival_ms[:5]])
print("gaps between them (ITL, ms):       ", [round(g) for g in trace.itl_ms[:4]])
plotting.plot_arrivals({"ready on the server (running sum of step_ms)": lab.produced_trace(trace),
                        "received by the client (Flask)": trace},
                       title="The server had the first token long before the client saw it")

# %% [markdown]
# The staircase is when the server had each token; the vertical cliff is when the client got them. The
# area between the two is waiting that buys the user nothing.
#
# ## 3. Is the server still there? Probing `/health`
#
# A load balancer asks `/health` every few seconds and takes a server out of rotation when it does not
# answer in time. `HealthProbe` asks every 20 ms from its own thread and records how long each answer
# took, while the main thread sends one generation.

# %%
with HealthProbe(flask.url, interval_ms=20) as probe:
    trace = blocking_generate(flask.url, PROMPT, MAX_TOKENS, temperature=0)
print(f"generation: {trace.e2e_ms:.0f} ms;  /health: {probe.summary()}")
plotting.plot_health({"Flask": probe})

# %% [markdown]
# A probe sent while the generation runs waits in the listen queue until the generation is over: one
# sample as long as the whole generation (note the log scale). The server is alive but looks dead.
#
# ## 4. Two users at once
#
# `run_concurrent` sends both requests at the same instant.

# %%
traces = run_concurrent(flask.url, 2, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=False)
for i, t in enumerate(sorted(traces, key=lambda t: t.ttft_ms)):
    print(f"served {'first ' if i == 0 else 'second'}: TTFT {t.ttft_ms:.0f} ms")

# %% [markdown]
# The second user waits for the first user's whole answer, then for their own: about twice the TTFT.
# Production WSGI servers (gunicorn) run several worker *processes* for this, and each one needs its own
# copy of the model.
#
# ## Summary
#
# - The engine produces tokens one by one: a prefill (here ~50 ms), then a decode step of several ms
#   per token (~7-10 ms here).
# - A blocking server sends nothing until the last token: **TTFT = E2E ≈ prefill + (n - 1) × step**, and
#   all ITLs are 0. The user stares at nothing for the whole generation.
# - While it generates, a one-request-at-a-time server answers nothing: `/health` and a second user wait
#   for the whole generation.
#
# Notebook 2 streams the same tokens as they are made.
#
# ## Exercises
#
# Each exercise ends with a checker that prints PASS or FAIL with the numbers it compared. Reference
# solutions are in `notebooks/solutions/01_blocking_baseline.py`.
#
# **1.** From the server's numbers alone (the prefill time, the mean decode step and the number of
# tokens), predict when a blocking client gets its first token. The checker compares your formula on
# the last trace with the TTFT that trace measured.

# %%
def predict_blocking_ttft_ms(prefill_ms, step_ms, n_tokens):
    """TTFT of a blocking request of n_tokens tokens, in ms."""
    raise NotImplementedError  # your code here


checks.check_blocking_prediction(predict_blocking_ttft_ms, trace)

# %% [markdown]
# **2.** Send `n` greedy blocking requests of `max_tokens` tokens at the same time and return their
# `Trace`s, sorted from the first served to the last (by TTFT). (Hint: `run_concurrent(..., stream=False)`.)
# If the server really serves one request at a time, each answer arrives at least its own generation time
# (`trace.timings["total_ms"]`, measured by the server) after the one before it. The checker checks that.

# %%
def queued(url, n, max_tokens):
    """Traces of n blocking requests sent at once, first served first."""
    raise NotImplementedError  # your code here


checks.check_queued(queued, flask.url)

# %% [markdown]
# ## Clean up
#
# Stop the servers this notebook started (re-running the notebook starts fresh ones).

# %%
stop_all()
