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
# **Run time:** about a minute on a 2-core laptop CPU; a few minutes on a slow one.
#
# Everything here is measured on this machine with the default model, SmolLM2-135M-Instruct, decoding
# greedily (temperature 0). The timings are noisy: other programs on the machine slow some steps down.
# Sentences that depend on this machine's numbers are printed by the run itself, as `CLAIM holds: ...`
# with the numbers measured here (or `CLAIM FAILS: ...` with the reason, if this run contradicts them).

# %% [markdown]
# ## Setup
#
# The engine is the model, its tokenizer and a generation loop, in this Python process. `measure_speed`
# times one short generation; the demos below choose their length from it, so that a generation lasts
# long enough to see on a fast CPU and not forever on a slow one. Its prefix cache stays off until
# notebook 8: these notebooks send the same prompt again and again to measure a prefill, and the cache
# would answer a repeated prompt from memory.

# %% tags=["nbval-ignore-output"]
from labserver import SamplingParams
from labserver.lab.setup import load_engine
from labserver.lab import checks, baseline as lab
from labserver.lab.claims import claim, ratio
from labserver.measure import plotting
from labserver.measure.client import blocking_generate, run_concurrent
from labserver.measure.probes import HealthProbe
from labserver.serve.background import start_flask
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine(prefix_caching=False)  # SmolLM2-135M-Instruct on the CPU; prints its route
speed = lab.measure_speed(engine)
MAX_TOKENS = lab.tokens_for(1000, speed.prefill_ms, speed.step_ms)  # about a second of generation here
params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)  # greedy: the same text every run
print(f"{speed}; the demos generate {MAX_TOKENS} tokens")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. The engine on its own
#
# `engine.generate_stream(prompt, params)` is a Python generator. Each `next()` runs the model once and
# yields a `TokenEvent`: the text this token adds, its id, its position, and `step_ms`, how long that
# step took. The first step is the *prefill*: the whole prompt (inside the model's chat template) goes
# through the model in one forward pass, and the first token comes out of it.

# %% tags=["nbval-ignore-output"]
for event in engine.generate_stream(lab.PROMPT, params):
    print(event)
    if event.index == 3:
        break  # leaving the loop closes the generator: the engine stops here

# %% [markdown]
# Now the whole answer, one bar per token. The first (orange) bar is the prefill; every later bar is one
# decode step: one token in, the cached keys and values of all earlier tokens reused, one token out.

# %% tags=["nbval-ignore-output"]
completion = engine.generate(lab.PROMPT, params)
print(repr(completion.text))
prefill, step = completion.events[0].step_ms, lab.median(e.step_ms for e in completion.events[1:])
claim(f"the prefill of {completion.finish.usage['prompt_tokens']} prompt tokens ({prefill:.1f} ms) costs more "
      f"than a decode step ({step:.1f} ms, median): {ratio(prefill, step)}", prefill > step)
lab.plot_engine_steps(completion)

# %% [markdown]
# Each decode step reads all 135M weights once, whatever the token, so the steps are alike by design; the
# spikes are moments when other programs took the CPU. The first token comes out of the prefill, every later one out of a step:
# whoever waits for the complete answer waits for the sum of all these bars.
#
# ## 2. The same engine behind Flask
#
# `start_flask` serves the engine with the Flask app in a background thread, one request at a time (as
# WSGI does). Re-running the cell replaces the server instead of starting a second one.

# %% tags=["nbval-ignore-output"]
flask = start_flask(engine)
blocking_generate(flask.url, lab.PROMPT, 2, temperature=0)  # warm-up: first connection, first steps
trace = blocking_generate(flask.url, lab.PROMPT, MAX_TOKENS, temperature=0)
computed = sum(trace.step_ms)
print(f"TTFT {trace.ttft_ms:.0f} ms   E2E {trace.e2e_ms:.0f} ms   {trace.n_tokens} tokens")
claim(f"a blocking client sees its first token only after the whole generation: TTFT {trace.ttft_ms:.0f} ms, "
      f"the server computed for {computed:.0f} ms", trace.ttft_ms >= computed)
claim(f"all {trace.n_tokens} tokens arrived in the same instant: the longest gap between two was "
      f"{max(trace.itl_ms):.1f} ms", max(trace.itl_ms) < 1.0);

# %% [markdown]
# The client records a `Trace`: when each token arrived, in ms after the request was sent, and what the
# server says it spent on it (`step_ms`, from the JSON body). The names follow `vllm bench serve`:
#
# - **TTFT** (time to first token): the first token's arrival. For a blocking server: the whole response.
# - **ITL** (inter-token latency): the gaps between consecutive tokens' arrivals. Here all zero.
# - **E2E** (end to end): the last token's arrival.
#
# The steps behind Flask ran on the server's thread, not this one. Compare their median with the
# engine's own in section 1; whether they differ, and why, is the subject of the appendix notebook
# (`09_appendix_cpu`): a second thread running the model can change the step time, in either direction,
# depending on the CPU and how busy it is.

# %% tags=["nbval-ignore-output"]
print(f"engine alone (this thread):    step p50 {step:.1f} ms")
print(f"behind Flask (its own thread): step p50 {lab.median(trace.decode_step_ms):.1f} ms")
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
# answer in time. `HealthProbe` asks about once per decode step from its own thread and records how long
# each answer took, while the main thread sends one generation.

# %% tags=["nbval-ignore-output"]
with HealthProbe(flask.url, interval_ms=lab.probe_interval_ms(step)) as probe:
    trace = blocking_generate(flask.url, lab.PROMPT, MAX_TOKENS, temperature=0)
longest = max(latency for _, latency in probe.samples)
claim(f"while Flask generated for {trace.e2e_ms:.0f} ms, one /health probe waited {longest:.0f} ms, more than "
      f"half of it", longest > 0.5 * trace.e2e_ms)
plotting.plot_health({"Flask": probe})

# %% [markdown]
# A probe sent while the generation runs waits in the listen queue until the generation is over: one
# sample about as long as the whole generation (note the log scale). The server is alive but looks dead.
#
# ## 4. Two users at once
#
# `run_concurrent` sends both requests at the same instant.

# %% tags=["nbval-ignore-output"]
first, second = sorted(run_concurrent(flask.url, 2, prompt=lab.PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                      stream=False), key=lambda t: t.ttft_ms)
own = second.timings["total_ms"]  # the server's time for the second answer alone
print(f"served first: TTFT {first.ttft_ms:.0f} ms;  served second: TTFT {second.ttft_ms:.0f} ms")
# Half of its own generation: the client's and the server's clocks differ by HTTP and thread wake-ups.
claim(f"the second user waited for the first user's answer, then for their own: {second.ttft_ms:.0f} ms, "
      f"{ratio(second.ttft_ms, first.ttft_ms)} the first user's TTFT",
      second.ttft_ms > first.ttft_ms + 0.5 * own);

# %% [markdown]
# Production WSGI servers (gunicorn) run several worker *processes* for this, and each one needs its own
# copy of the model.
#
# ## Summary
#
# - The engine produces tokens one by one: a prefill over the whole prompt, then one decode step per
#   token (section 1's claim printed what each cost here; the medians printed in the setup, in section 1
#   and behind Flask are separate runs, on different threads, so they need not agree to the millisecond).
# - A blocking server sends nothing until the last token: **TTFT = E2E**, the prefill and every step
#   summed (exercise 1 writes it down), and all ITLs are 0. The user stares at nothing for the whole generation.
# - While it generates, a one-request-at-a-time server answers nothing: `/health` and a second user wait
#   for the whole generation.
#
# Notebook 2 streams the same tokens as they are made.
#
# ## Exercises
#
# Each coding exercise ends with a checker that prints PASS or FAIL with the numbers it compared.
# Reference solutions are in `notebooks/solutions/01_blocking_baseline.py`.
#
# **1.** From the server's numbers alone (the prefill time, the mean decode step and the number of
# tokens), predict when a blocking client gets its first token. The checker tries a case by hand, then
# compares your prediction for the last trace with the TTFT the client measured.

# %%
def predict_blocking_ttft_ms(prefill_ms, step_ms, n_tokens):
    """TTFT of a blocking request of n_tokens tokens, in ms."""
    raise NotImplementedError  # your code here


_ = checks.check_blocking_prediction(predict_blocking_ttft_ms, trace)

# %% [markdown]
# **2.** *Explain your number.* Your TTFT in section 2 was a little longer than the server's own
# compute time (the sum of `step_ms`). Print the difference for your trace. Which work does it contain
# that no `step_ms` counts? Would it grow with the number of tokens? Check with a longer request.
#
# **3.** Write `queued(url, n, max_tokens)` without `run_concurrent`: send `n` greedy blocking requests
# at the same time from `n` threads (`concurrent.futures.ThreadPoolExecutor` and `blocking_generate`),
# and return their `Trace`s sorted from the first served to the last (by TTFT). If the server serves one
# request at a time, each answer arrives at least its own generation time (`trace.timings["total_ms"]`,
# measured by the server) after the one before it. The checker checks that.

# %%
def queued(url, n, max_tokens):
    """Traces of n blocking requests sent at once, first served first."""
    raise NotImplementedError  # your code here


_ = checks.check_queued(queued, flask.url)

# %% [markdown]
# **4.** *Explain your number.* In section 3, count the `/health` probes that were sent while the
# generation ran (`probe.samples` holds `(sent at ms, latency ms)`). Why so few, when the probe asks
# about once per decode step? What would a load balancer that allows a health check one second conclude
# about this server with an answer of 500 tokens on your machine?
#
# ## Clean up
#
# Stop the servers this notebook started (re-running the notebook starts fresh ones); the last line is
# the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
