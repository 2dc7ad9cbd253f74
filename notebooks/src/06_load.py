# %% [markdown]
# # 6. Load: how many users can this server take?
#
# Notebook 5 sent N requests at once and waited for all of them. Real users do not wait for each other:
# they arrive when they like, a few per second, more at lunchtime. This notebook sends requests the way
# `vllm bench serve` and guidellm do, at a *request rate*, whatever the server is doing, and raises the
# rate until the server falls behind.
#
# **What you will learn**
#
# 1. Open-loop load: requests arriving at random times (a Poisson process) at a chosen rate, and why a
#    closed loop of N users hides the queue that an open loop shows.
# 2. The knee: the capacity measured first, then rates from well below it to past it; whether latency
#    stays flat while the server keeps up, and what happens once the arrivals outpace it.
# 3. Goodput: the requests per second that meet a service-level objective (SLO), and where it peaks.
# 4. Backpressure: a server that refuses extra requests at once (429 + `Retry-After`) against one that
#    queues them all.
#
# **Run time:** about 1-3 minutes on 2 CPU cores.

# %% [markdown]
# ## Setup
#
# One engine and the FastAPI server with the batched scheduler (the server's default). The load comes from
# `labserver.measure.load.run_load`, which speaks only HTTP: the same function measures vLLM, SGLang or
# llama.cpp's server by URL (`python -m labserver load --url ...` on the command line). Prompts are made of
# the model's own tokens, so that a prompt of 32 tokens is 32 tokens on the server; `ignore_eos` makes
# every answer exactly its asked length (16 tokens), as benchmarks do.
#
# With `LABSERVER_URL` set (a shared vLLM or SGLang server, see notebook 2) sections 1 to 3 measure that
# server, whose capacity is its own; section 4 compares two settings of labserver's own server and prints
# one line saying it was skipped.

# %% tags=["nbval-ignore-output"]
import math

from labserver.lab.setup import load_engine
from labserver.lab import checks, load as lab
from labserver.lab.claims import claim, ratio
from labserver.lab.target import has_engine, target
from labserver.measure.arrivals import arrival_times
from labserver.serve.background import start_fastapi
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine(prefix_caching=False)  # SmolLM2-135M-Instruct on the CPU; prints its route
tokenizer = engine.tokenizer
server = target(lambda: start_fastapi(engine, backend="batched", name="fastapi-load"))  # or LABSERVER_URL's
print(server, "| prompt", lab.INPUT_TOKENS, "tokens, answer", lab.OUTPUT_TOKENS, "tokens")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. One request alone
#
# Every rate below is sized from this measurement, so the notebook asks the same question on a fast and
# a slow machine. A server that served one request at a time would sustain 1 / E2E requests per second.

# %% tags=["nbval-ignore-output"]
alone = lab.measure_alone(server, tokenizer)
print(f"alone: TTFT {alone.ttft_ms:.0f} ms, TPOT (the decode step, as the client sees it) "
      f"{alone.tpot_ms:.1f} ms, E2E {alone.e2el_ms:.0f} ms -> 1 / E2E = {alone.rate:.2f} requests/s")

# %% [markdown]
# ## 2. Arrivals at a rate
#
# <!-- mechanism -->
# At rate λ, a Poisson process sends each next request after a gap drawn from an exponential distribution
# of mean 1/λ: most gaps are short, a few long, so requests come in small clumps. `vllm bench serve
# --burstiness B` draws the gaps from a gamma distribution instead: B = 1 is Poisson, B < 1 burstier,
# larger B more even.

# %%
for burstiness in (0.25, 1.0, math.inf):
    t = arrival_times(12, rate=4.0, burstiness=burstiness, seed=1)
    print(f"burstiness {burstiness:>4}: " + " ".join(f"{x:5.2f}" for x in t))

# %% [markdown]
# Each line holds 12 arrivals at 4 per second on average; only the spread differs. The generator keeps
# sending at these times however many requests are still running: that is what makes the load *open*.
# A closed loop (N users, each waiting for an answer before asking again) slows down with the server,
# so it never shows a queue.
#
# ## 3. The knee
#
# <!-- mechanism -->
# First the **capacity**: a closed loop that keeps as many requests in flight as the batch holds (16),
# each replaced as soon as it ends, measures the most requests per second this server completes. An open
# loop cannot complete more. The sweep then sends Poisson arrivals at fractions of that capacity, from a
# quarter of it to past it, each rate for a few seconds of arrivals (enough for a backlog to build), and
# stops after the first rate the server could not keep up with (if it still keeps up at 1.6 times the
# capacity, the closed loop measured low, and the rates go on rising by half until one falls behind). *Over-saturated* means it completed
# fewer than 0.9 times the requests per second that arrived (`kept up` < 0.9), or the last quarter of the
# requests waited more than twice as long as the first (the queue grew). The **knee** is the highest rate
# that kept up. The SLO for goodput: TTFT and E2E at most 4 times what a request alone gets.
#
# *Predict* before you run it: below the knee, does TTFT grow with the rate? And past it?

# %% tags=["nbval-ignore-output"]
slo = lab.slo_from(alone)
knee = lab.knee(server, alone, slo, tokenizer, concurrency=engine.config.max_batch)
print(f"capacity (closed loop of {engine.config.max_batch}): {knee.capacity:.2f} requests/s;  SLO: {slo}")
print(lab.sweep_table(knee))
lab.plot_knee(knee)

# %% [markdown]
# Below the knee the batched scheduler folds each newcomer into the running batch: a request waits for at
# most a step before its prefill. Past it, newcomers queue behind a full batch, and every second of
# arrivals adds to the backlog. How this run came out:

# %% tags=["nbval-ignore-output"]
below, past = lab.below_and_past(knee)
ttfts = [s["median_ttft_ms"] for s in below] or [math.nan]
claim(f"the sweep went past this server's capacity and saw it: it kept up at {len(below)} rates up to "
      f"{knee.knee} requests/s and fell behind at {knee.rates[-1]:.2f}", knee.saturated[-1] and len(below) >= 2)
claim(f"latency stays low below the knee: TTFT p50 from {min(ttfts):.0f} to {max(ttfts):.0f} ms over those "
      f"rates, within the SLO's {slo['ttft']:.0f} ms though the rate grew "
      f"{ratio(below[-1]['request_rate'], below[0]['request_rate'])}", max(ttfts) <= slo["ttft"])
claim(f"past the knee the queue shows: TTFT p50 {past['median_ttft_ms']:.0f} ms, above that of every rate that "
      f"kept up ({min(ttfts):.0f} to {max(ttfts):.0f} ms)", past["median_ttft_ms"] > max(ttfts))
print(f"past the knee it completed {past['request_throughput']:.2f} requests/s of {knee.rates[-1]:.2f} offered "
      f"(the closed loop measured {knee.capacity:.2f})")
best = knee.best_goodput_rate
print(f"goodput peaked at {best:.2f} requests/s, " + ("the knee" if best == knee.knee else
      "below the knee: there the server still keeps up, but not within the SLO" if best < (knee.knee or 0)
      else "past the knee: the SLO is loose enough that a short backlog still meets it"))

# %% [markdown]
# **Goodput** is the measure to size a server with: past the knee, throughput cannot pass the capacity,
# and the requests it completes finish later and later, too late to count. Capacity planning reads the knee off a sweep
# like this one and keeps the offered load below it with some margin for bursts; the line above says
# where goodput peaked on this run, and why when it was not at the knee.
#
# ## 4. Backpressure: refuse or queue?
#
# Past the knee, something has to give. The server can admit everything and let the queue grow, or it can
# admit at most `max_concurrent` generations and refuse the next one at once with **429 Too Many Requests**
# and a `Retry-After` header, so that the client (or a load balancer) can go elsewhere or come back later.
# The same burst, at double the capacity measured above so that a queue can build within two dozen
# requests, against both:

# %% tags=["nbval-ignore-output"]
burst = None
if has_engine("a limit of labserver's own server against its unbounded queue"):
    burst = lab.backpressure(engine, 2 * knee.capacity, limit=4, tokenizer=tokenizer)
    print(lab.backpressure_table(burst))
lab.plot_timelines(burst) if burst else None

# %% [markdown]
# Grey is waiting (arrival to first token), blue is streaming, red ticks are requests refused with a 429.
# With the limit, the admitted requests start almost at once and the others learn within milliseconds
# that they should retry. Without it, every request is admitted and the later ones wait behind all the
# earlier ones: their TTFT grows with their place in the queue.

# %% tags=["nbval-ignore-output"]
if burst:
    limited, unbounded = burst.values()
    claim(f"with a limit of 4 the admitted requests' p99 TTFT is {limited.summary['p99_ttft_ms']:.0f} ms against "
          f"{unbounded.summary['p99_ttft_ms']:.0f} ms for the unbounded queue, and "
          f"{limited.summary['failed_429']} requests were refused with a 429",
          limited.summary["p99_ttft_ms"] < unbounded.summary["p99_ttft_ms"] and limited.summary["failed_429"] > 0);

# %% [markdown]
# Neither is free: the 429s are users turned away (or retrying), the queue is users waiting longer than
# they would wait. Production servers combine both: a bounded queue, a limit that refuses beyond it, and
# autoscaling or load balancing that watches the queue.
#
# ## Summary
#
# - Open-loop load sends requests at their arrival times (Poisson, or gamma with a burstiness) whatever
#   the server does; only an open loop shows the queue a server builds when it falls behind.
# - A server's capacity is measured by a closed loop at its concurrency limit; the knee by an open loop at
#   rates from well below that capacity to past it, each long enough for a backlog to show.
# - Goodput counts the requests within an SLO; past the knee, throughput stays but goodput falls.
# - A concurrency limit with 429 + `Retry-After` keeps the admitted requests fast and tells the others at
#   once; an unbounded queue admits everyone and makes the late ones wait.
#
# ## Exercises
#
# Reference solutions: `notebooks/solutions/06_load.py`.
#
# **1.** Write `poisson_arrivals(n, rate, seed)`: the send times (seconds) of `n` requests, the first at 0,
# with exponential gaps of mean `1 / rate` (`numpy.random.default_rng(seed).exponential`). The checker
# tests the mean gap and its spread: evenly spaced times have the right mean but not the spread.

# %%
import numpy as np


def poisson_arrivals(n, rate, seed=0):
    """n arrival times in seconds, the first at 0, Poisson at `rate` per second."""
    raise NotImplementedError  # your code here


_ = checks.check_poisson_arrivals(poisson_arrivals)

# %% [markdown]
# **2.** One request runs at a time (`max_concurrency=1`), requests arrive every `interval_ms`, and each
# takes `prefill_ms + (tokens - 1) * step_ms` of the server. Write `predict_queue_ms(k, prefill_ms,
# step_ms, tokens, interval_ms)`: how long request `k` (counted from 0, the queue empty at the start)
# waits on the client before it is sent. The checker compares your prediction with a run against the fake
# engine, whose steps take a known time.

# %%
def predict_queue_ms(k, prefill_ms, step_ms, tokens, interval_ms):
    """The client-side queue time of request k, in ms."""
    raise NotImplementedError  # your code here


_ = checks.check_queue_prediction(predict_queue_ms)

# %% [markdown]
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
