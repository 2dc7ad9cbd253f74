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
# 2. The knee: latency stays flat while the server keeps up, then climbs without bound once the arrivals
#    outpace it; where that happens on this machine, measured.
# 3. Goodput: the requests per second that meet a service-level objective (SLO), which peaks at the knee
#    while throughput keeps rising.
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

# %% tags=["nbval-ignore-output"]
import math

from labserver import Engine, EngineConfig
from labserver.lab import checks, load as lab
from labserver.lab.claims import claim, ratio
from labserver.measure.arrivals import arrival_times
from labserver.serve.background import start_fastapi, stop_all

engine = Engine.from_config(EngineConfig())
tokenizer = engine.tokenizer
server = start_fastapi(engine, backend="batched", name="fastapi-load")
print(server, "| prompt", lab.INPUT_TOKENS, "tokens, answer", lab.OUTPUT_TOKENS, "tokens")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. One request alone
#
# Every rate below is sized from this measurement, so the notebook asks the same question on a fast and
# a slow machine. A server that served one request at a time would sustain 1 / E2E requests per second.

# %% tags=["nbval-ignore-output"]
alone = lab.measure_alone(server.url, tokenizer)
print(f"alone: TTFT {alone.ttft_ms:.0f} ms, TPOT (the decode step, as the client sees it) "
      f"{alone.tpot_ms:.1f} ms, E2E {alone.e2el_ms:.0f} ms -> 1 / E2E = {alone.rate:.2f} requests/s")

# %% [markdown]
# ## 2. Arrivals at a rate
#
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
# The sweep sends 16 requests at each rate, from twice what one request alone sustains upward, doubling,
# and stops once the server is *over-saturated*: the run lasted more than twice the time from the first
# to the last arrival plus one request alone. A server that keeps up finishes about one request time
# after the last arrival; one that falls behind has a backlog left to drain. The SLO for goodput: TTFT and
# E2E at most 4 times what a request alone gets.

# %% tags=["nbval-ignore-output"]
slo = lab.slo_from(alone)
knee = lab.knee(server.url, alone, slo, tokenizer)
print("SLO:", slo)
print(lab.sweep_table(knee))
lab.plot_knee(knee)

# %% [markdown]
# Read the table from the top. While the server keeps up, the run ends soon after the last arrival and
# the requests completed per second follow the offered rate: the batched scheduler folds each newcomer
# into the running batch. Past the knee the completed rate stops following the offered one, the run
# outlasts its arrivals by far, and TTFT jumps: newcomers wait for the batch's steps, which get slower as
# the batch grows, and for their own prefill. In the left plot, latency climbs steeply against a throughput that barely grows: the
# server is already giving all it has. The claims below are this run's numbers:

# %% tags=["nbval-ignore-output"]
last = knee.summaries[-1]
claim(f"the sweep drove this server past its knee: over-saturated at {knee.rates[-1]:.2f} requests/s, "
      f"knee {knee.knee} requests/s", knee.saturated[-1])
claim(f"past the knee p99 TTFT is {ratio(last['p99_ttft_ms'], alone.ttft_ms)} that of a request alone "
      f"({last['p99_ttft_ms']:.0f} against {alone.ttft_ms:.0f} ms)", last["p99_ttft_ms"] > 2 * alone.ttft_ms)
best = knee.summaries[knee.rates.index(knee.best_goodput_rate)]
claim(f"goodput peaks before the last rate: {best['request_goodput']:.2f} requests/s within the SLO at "
      f"{knee.best_goodput_rate:.2f}, {last['request_goodput']:.2f} at {knee.rates[-1]:.2f}",
      last["request_goodput"] < best["request_goodput"]);

# %% [markdown]
# **Goodput** is the measure to size a server with: throughput keeps rising a little past the knee, but
# the requests it adds finish too late to count. With a tight SLO, goodput may peak well below the knee:
# the server still keeps up there, just not fast enough for the objective. Capacity planning reads the knee off a sweep like this
# one, then runs the server below it with some margin for bursts.
#
# ## 4. Backpressure: refuse or queue?
#
# Past the knee, something has to give. The server can admit everything and let the queue grow, or it can
# admit at most `max_concurrent` generations and refuse the next one at once with **429 Too Many Requests**
# and a `Retry-After` header, so that the client (or a load balancer) can go elsewhere or come back later.
# The same burst at the over-saturating rate, against both:

# %% tags=["nbval-ignore-output"]
burst = lab.backpressure(engine, knee.rates[-1], limit=4, tokenizer=tokenizer)
print(lab.backpressure_table(burst))
lab.plot_timelines(burst)

# %% [markdown]
# Grey is waiting (arrival to first token), blue is streaming, red ticks are requests refused with a 429.
# With the limit, the admitted requests start almost at once and the others learn within milliseconds
# that they should retry. Without it, every request is admitted and the later ones wait behind all the
# earlier ones: their TTFT grows with their place in the queue.

# %% tags=["nbval-ignore-output"]
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
# - Latency is flat below the knee and grows without bound past it; the knee is found by a sweep of rates
#   sized from one request's measured time.
# - Goodput counts the requests within an SLO: it peaks near the knee, where throughput does not.
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

# %%
stop_all()
