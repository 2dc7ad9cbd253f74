# %% [markdown]
# # 2. Streaming with Server-Sent Events
#
# The engine from notebook 1 has the first token after one prefill. A streaming server sends each token
# the moment it exists, over one long HTTP response in the Server-Sent Events (SSE) format. This
# notebook looks at those bytes, measures them on the client, puts streaming and blocking side by side
# on the same prompt, and ends with you writing the streaming endpoint.
#
# **What you will learn**
#
# 1. The wire format of a token stream: one `data:` line per token, a summary, then `data: [DONE]`
#    (exactly what `curl -N` prints).
# 2. How a client turns a stream into measurements: TTFT, ITL, TPOT and E2E.
# 3. What streaming costs per token: the server's `step_ms` next to the gaps the client sees.
# 4. How much sooner the first token arrives than with the blocking Flask server, and why the factor
#    depends on the answer's length and on this machine's prefill and step.
#
# **Run time:** about a minute on a 2-core laptop CPU; a few minutes on a slow one.

# %% [markdown]
# ## Setup
#
# Two servers in background threads of this process, on the same engine: the FastAPI app (streaming,
# its engine on a dedicated engine thread) and the Flask baseline from notebook 1. The demos' length
# comes from the engine's speed, measured first.
#
# A class that shares one server (vLLM or SGLang on a GPU box) sets `LABSERVER_URL` to its address
# before starting Jupyter: `target` then returns that server, with the model it lists at `/v1/models`,
# and the experiments measure it through `/v1/completions`; the parts that need labserver's own engine
# (its `step_ms`, its prefill time) print one line saying they were skipped. Unset, `target` returns the
# FastAPI server started here.

# %% tags=["nbval-ignore-output"]
from labserver.lab.setup import load_engine
from labserver.lab import checks, streaming as lab
from labserver.lab.claims import claim, ratio
from labserver.lab.target import ours, target
from labserver.measure import plotting
from labserver.measure.stats import summarize
from labserver.serve.background import start_fastapi, start_flask
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine(prefix_caching=False)  # SmolLM2-135M-Instruct on the CPU; prints its route
speed = lab.measure_speed(engine)
PROMPT, MAX_TOKENS, RUNS = lab.PROMPT, lab.tokens_for(1000, speed.prefill_ms, speed.step_ms), 3
fastapi, flask = start_fastapi(engine), start_flask(engine)  # the exercises use fastapi in any case
server = target(fastapi)  # LABSERVER_URL's server if it is set
blocking = server if server.external else ours(flask)  # there: the same server asked with stream=false
print(f"{speed}; the demos generate {MAX_TOKENS} tokens\n{server}\n{flask}")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. The raw stream
#
# `lab.raw_sse` sends `{"prompt": ..., "max_tokens": 6, "stream": true}` and prints every line of the
# response as it arrives, with its arrival time. It is what this command shows in a terminal:
#
# ```bash
# curl -N http://127.0.0.1:PORT/generate -H 'Content-Type: application/json' \
#      -d '{"prompt": "Write a short story about a robot who learns to paint.", "max_tokens": 6, "stream": true}'
# ```

# %% tags=["nbval-ignore-output"]
lines = lab.raw_sse(server, PROMPT, max_tokens=6)
if server.has_engine("the server's step_ms between the tokens"):
    spread, stepped = lab.raw_spread(lines)
    claim(f"the tokens left one at a time: the last arrived {spread:.0f} ms after the first, and the server "
          f"computed for {stepped:.0f} ms between them", spread >= 0.5 * stepped);

# %% [markdown]
# Read it line by line:
#
# - `content-type: text/event-stream`: the client keeps reading one response, event after event.
# - Each event is a `data:` line followed by a blank line. Here each `data` is one JSON object per
#   token: `token` (the text it adds), `token_id`, `index` and `step_ms` (the server's compute time for
#   it). The first one also carries `prefill_time_ms`.
# - After the last token, a summary event (`finish_reason`, `usage`, `timings`), then `data: [DONE]`.
# - The arrival times step by the server's decode steps: the claim above puts the spread of the token
#   lines next to the `step_ms` the server reported between them. (The claim allows the first token to be
#   late by up to half the computing time between first and last: a busy machine delays some lines.)
# - A shared server (`LABSERVER_URL`) speaks OpenAI's format instead: each `data:` is a chunk whose
#   `choices[0].text` holds the new text, with no `step_ms`; the last chunk carries `usage`.
#
# Concatenating the `token` fields gives the text; never decode each token id alone (a character can be
# split over two tokens, and a space may depend on the next token).
#
# ## 2. The parsed stream: a `Trace`
#
# `server.stream` (`measure.client.stream_generate`) parses the same stream (with `httpx-sse`) and records a `Trace`. `on_token` runs as
# each token arrives, so the text appears here piece by piece.

# %% tags=["nbval-ignore-output"]
server.stream(PROMPT, 2)  # warm-up
trace = server.stream(PROMPT, MAX_TOKENS, on_token=lambda text: print(text, end="", flush=True))
print(f"\n\nTTFT {trace.ttft_ms:.0f} ms   TPOT {trace.tpot_ms:.1f} ms   E2E {trace.e2e_ms:.0f} ms")
print("first gaps (ITL, ms):", [round(g, 1) for g in trace.itl_ms[:8]])

# %% [markdown]
# With a stream, the client-side metrics mean something different for each token:
#
# - **TTFT**: first token event received − request sent. About one prefill now, not the whole answer.
# - **ITL**: the gap before each later token. **TPOT** (time per output token) = (E2E − TTFT) / (n − 1),
#   the mean ITL.
# - **E2E**: last token received − request sent. The total work did not change, only when the user sees
#   it: section 4 compares the E2E with the blocking server's.
#
# ## 3. What streaming costs per token
#
# If sending a token cost much, the client's gaps would be longer than the server's `step_ms`. The
# figure puts them on top of each other: the grey band is what the server computed, the blue line is
# what the client saw.

# %% tags=["nbval-ignore-output"]
plotting.plot_token_timeline(trace)

# %% tags=["nbval-ignore-output"]
s = summarize([trace])
itl, step = s["p50_itl_ms"], s["p50_step_ms"]
if server.has_engine("the client's times against the server's prefill_time_ms and step_ms"):
    claim(f"the client's first token came after the server's prefill: TTFT {trace.ttft_ms:.1f} ms, prefill "
          f"{trace.prefill_time_ms:.1f} ms", trace.ttft_ms >= trace.prefill_time_ms)
    # Within half a step (and 1 ms for the clock): framing and sending a token is small next to computing it.
    claim(f"the client's gaps follow the server's steps: ITL p50 {itl:.2f} ms, step p50 {step:.2f} ms "
          f"(ratio {itl / step:.3f})", abs(itl - step) <= 0.5 * step + 1.0);

# %% [markdown]
# Framing a token as SSE and sending it takes a fraction of a millisecond; how large a fraction of a
# step that is depends on how fast this machine steps (the faster the engine, the more it shows). The
# client, the server and the engine share one Python process here, so a busy moment for one shows up in
# the others' timings too.
#
# ## 4. Streaming vs blocking on the same prompt
#
# The same prompt and length, greedy, `RUNS` times each, one server after the other. Flask is warmed up
# first, so that both servers are measured with the same threads of this process running the model.
# (A shared server is asked both ways: streamed, and with `"stream": false`.)

# %% tags=["nbval-ignore-output"]
blocking.blocking(PROMPT, 2)  # warm-up
streamed = [server.stream(PROMPT, MAX_TOKENS) for _ in range(RUNS)]
blocked = [blocking.blocking(PROMPT, MAX_TOKENS) for _ in range(RUNS)]
print("same text from both servers:", streamed[0].text == blocked[0].text)  # one engine, greedy
print(lab.compare_table({"FastAPI streaming": streamed, "Flask blocking": blocked}))

# %% tags=["nbval-ignore-output"]
plotting.plot_ttft_bars({"FastAPI streaming": streamed, "Flask blocking": blocked})

# %% tags=["nbval-ignore-output"]
plotting.plot_arrivals({"FastAPI streaming": streamed[0], "Flask blocking": blocked[0]},
                       title="What the user sees: a staircase or a cliff")

# %% [markdown]
# Only the TTFT changes: from the whole generation, `prefill + (n - 1) * step`, to about one prefill.
# The factor, about `1 + (n - 1) * step / prefill`, grows with the length of the answer and depends on
# this machine's ratio of step to prefill (a CPU with a slow prefill gains less on a short answer). The
# run computes it from the server's own numbers and compares:

# %% tags=["nbval-ignore-output"]
st, bl = summarize(streamed), summarize(blocked)
predicted = lab.predicted_gain(streamed, blocked, MAX_TOKENS)  # a shared server: from the client's times
gain = bl["p50_ttft_ms"] / st["p50_ttft_ms"]
claim(f"streaming showed the first token {gain:.1f}x sooner ({st['p50_ttft_ms']:.0f} against "
      f"{bl['p50_ttft_ms']:.0f} ms); the formula predicts {predicted:.1f}x from this run's prefill and step",
      gain > 1 and predicted / 2 < gain < 2 * predicted)
claim(f"the whole answer took about as long either way: E2E {st['p50_e2e_ms']:.0f} ms streaming, "
      f"{bl['p50_e2e_ms']:.0f} ms blocking ({ratio(st['p50_e2e_ms'], bl['p50_e2e_ms'])})",
      2 / 3 < st["p50_e2e_ms"] / bl["p50_e2e_ms"] < 3 / 2);

# %% [markdown]
# (The claims allow a factor of two around the formula, and E2E within half again either way: on a busy
# machine a few slow steps land in one run and not the other. If they fail on your machine, look at the
# table above for the run that was hit.) Streaming does not make the answer shorter; it makes the wait
# *visible*. That is the whole case for streaming.
#
# ## Summary
#
# - A streaming response is `text/event-stream`: one `data: {json}` event per token, a summary event,
#   then `data: [DONE]`.
# - Streaming moves the first token from the end of the generation to right after the prefill:
#   **TTFT ≈ prefill**, and each later token arrives one decode step after the previous one
#   (ITL ≈ `step_ms`).
# - Sending each token costs little next to computing it: client gaps and server steps agree closely.
# - The total work does not change (section 4's second claim compares the E2E of both): streaming makes
#   the wait *visible*.
#
# ## Exercises
#
# Reference solutions: `notebooks/solutions/02_streaming_sse.py`.
#
# **1.** Write `parse_sse_line(line)`: for a `data:` line whose data is a JSON object, return that object
# as a dict; for anything else (the blank separator line, `data: [DONE]`, a `:` comment line) return
# `None`. The space after `data:` is optional. The checker tries hand-made lines and a live stream.

# %%
def parse_sse_line(line):
    """The JSON payload of one SSE `data:` line as a dict, or None."""
    raise NotImplementedError  # your code here


_ = checks.check_parse_sse_line(parse_sse_line, fastapi.url)

# %% [markdown]
# **2.** A streaming client with nothing but `httpx`: POST a greedy (`temperature` 0) streaming request,
# read the response line by line with `response.iter_lines()` inside `client.stream(...)`, and return a
# list of `(ms since the request was sent, token text)` for each token event. Your `parse_sse_line`
# helps. The checker compares your text with `stream_generate`'s, then runs your client against a fake
# engine whose steps are sleeps of a known length: the tokens must arrive as they are made.

# %%
def my_stream(url, prompt, max_tokens):
    """[(t_ms, token_text), ...] for each token event of a greedy stream from url + "/generate"."""
    raise NotImplementedError  # your code here


_ = checks.check_my_stream(my_stream, fastapi.url)

# %% [markdown]
# **3.** Now the server side. Write `make_sse_app(engine)`: a FastAPI app whose `POST /generate` takes a
# JSON body `{"prompt": ..., "max_tokens": ...}` and answers with `Content-Type: text/event-stream`: one
# `data: {"token": "<text>"}` event per token (each event ends with a blank line), then `data: [DONE]`.
# `engine.generate_stream(prompt, SamplingParams(max_tokens=..., temperature=0))` yields a `TokenEvent`
# (its text is `.token`) per token, then a `Finish`. Starlette's `StreamingResponse` sends whatever an
# iterator yields, as it yields it (FastAPI's own `fastapi.sse.EventSourceResponse` writes the frames
# for you: either way is fine). The checker serves your app on `fake_engine` and fails it if the tokens
# all arrive at the end, if an event lacks its blank line, if `[DONE]` is missing, or if the content
# type is wrong. Notebook 3 is about what a blocking `generate_stream` does to the event loop: the
# steps must not run on it.

# %%
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from labserver import SamplingParams, TokenEvent


def make_sse_app(engine):
    """A FastAPI app: POST /generate streams one SSE `data:` event per token, then `data: [DONE]`."""
    raise NotImplementedError  # your code here


_ = checks.check_sse_endpoint(make_sse_app)

# %% [markdown]
# **4.** *Explain your number.* In section 3 your client's TTFT was longer than the server's
# `prefill_time_ms`, and the ITL a little longer than `step_ms`. Print both differences for your trace.
# Which steps of a request happen outside the engine's clock? Why does the first token pay more of them
# than the later ones?
#
# **5.** *Explain your number.* Using this run's prefill and step, how long must an answer be for
# streaming's first token to come 10 times sooner than blocking's? Check it with one request of each.
#
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
