# %% [markdown]
# # 2. Streaming with Server-Sent Events
#
# The engine from notebook 1 has the first token after one prefill. A streaming server sends each token
# the moment it exists, over one long HTTP response in the Server-Sent Events (SSE) format. This
# notebook looks at those bytes, measures them on the client, and puts streaming and blocking side by
# side on the same prompt.
#
# **What you will learn**
#
# 1. The wire format of a token stream: one `data:` line per token, a summary, then `data: [DONE]`
#    (exactly what `curl -N` prints).
# 2. How a client turns a stream into measurements: TTFT, ITL, TPOT and E2E.
# 3. What streaming costs per token: the server's `step_ms` next to the gaps the client sees.
# 4. How much sooner the first token arrives than with the blocking Flask server, measured here on
#    the same engine.
#
# **Run time:** about 1 minute on 2 CPU cores.

# %% [markdown]
# ## Setup
#
# Two servers in background threads of this process, on the same engine: the FastAPI app (streaming,
# its engine on a dedicated engine thread) and the Flask baseline from notebook 1.

# %%
from labserver import Engine, EngineConfig
from labserver.lab import checks, streaming as lab
from labserver.measure import plotting
from labserver.measure.client import blocking_generate, stream_generate
from labserver.measure.stats import summarize
from labserver.serve.background import start_fastapi, start_flask, stop_all

engine = Engine.from_config(EngineConfig())
PROMPT, MAX_TOKENS, RUNS = lab.PROMPT, 32, 2
fastapi, flask = start_fastapi(engine), start_flask(engine)
print(fastapi, flask)

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

# %%
lines = lab.raw_sse(fastapi.url, PROMPT, max_tokens=6)

# %% [markdown]
# Read it line by line:
#
# - `content-type: text/event-stream`: the client keeps reading one response, event after event.
# - Each event is a `data:` line followed by a blank line. Here each `data` is one JSON object per
#   token: `token` (the text it adds), `token_id`, `index` and `step_ms` (the server's compute time for
#   it). The first one also carries `prefill_time_ms`; the others say in `batch` how many sequences
#   shared their step (this server batches concurrent streams: notebook 5).
# - After the last token, a summary event (`finish_reason`, `usage`, `timings`), then `data: [DONE]`.
# - The arrival times grow by about one decode step per token: the tokens really leave one at a time.
#
# Concatenating the `token` fields gives the text; never decode each token id alone (a character can be
# split over two tokens, and a space may depend on the next token).
#
# ## 2. The parsed stream: a `Trace`
#
# `stream_generate` parses the same stream (with `httpx-sse`) and records a `Trace`. `on_token` runs as
# each token arrives, so the text appears here piece by piece.

# %%
stream_generate(fastapi.url, PROMPT, 2, temperature=0)  # warm-up
trace = stream_generate(fastapi.url, PROMPT, MAX_TOKENS, temperature=0,
                        on_token=lambda text: print(text, end="", flush=True))
print(f"\n\nTTFT {trace.ttft_ms:.0f} ms   TPOT {trace.tpot_ms:.1f} ms   E2E {trace.e2e_ms:.0f} ms")
print("first gaps (ITL, ms):", [round(g, 1) for g in trace.itl_ms[:8]])

# %% [markdown]
# With a stream, the client-side metrics mean something different for each token:
#
# - **TTFT**: first token event received − request sent. About one prefill now, not the whole answer.
# - **ITL**: the gap before each later token. **TPOT** (time per output token) = (E2E − TTFT) / (n − 1),
#   the mean ITL.
# - **E2E**: last token received − request sent. About the same as the blocking server's TTFT: the total
#   work did not change, only when the user sees it.
#
# ## 3. What streaming costs per token
#
# If sending a token cost much, the client's gaps would be longer than the server's `step_ms`. The
# figure puts them on top of each other: the grey band is what the server computed, the blue line is
# what the client saw.

# %%
plotting.plot_token_timeline(trace)

# %%
s = summarize([trace])
print(f"client ITL p50 / server step p50 = {s['p50_itl_ms'] / s['p50_step_ms']:.3f}")
print(f"client TTFT / server prefill     = {s['p50_ttft_ms'] / s['p50_prefill_ms']:.3f}")

# %% [markdown]
# Both ratios are close to 1: framing a token as SSE and sending it takes a fraction of a millisecond
# next to a decode step of several milliseconds (the faster the engine, the more that fraction shows). (The client, the server and the engine share one
# Python process here, so a busy moment for one shows up in the others' timings too.)
#
# ## 4. Streaming vs blocking on the same prompt
#
# The same prompt and length, greedy, `RUNS` times each, one server after the other. Flask is warmed up
# first: from then on two threads of this process run the model, which slows every step a little, in
# both servers (notebook 3 measures why). Measuring both after it keeps the comparison fair.

# %%
blocking_generate(flask.url, PROMPT, 2, temperature=0)  # warm-up
streamed = [stream_generate(fastapi.url, PROMPT, MAX_TOKENS, temperature=0) for _ in range(RUNS)]
blocked = [blocking_generate(flask.url, PROMPT, MAX_TOKENS, temperature=0) for _ in range(RUNS)]
print("same text from both servers:", streamed[0].text == blocked[0].text)  # one engine, greedy
print(lab.compare_table({"FastAPI streaming": streamed, "Flask blocking": blocked}))

# %%
plotting.plot_ttft_bars({"FastAPI streaming": streamed, "Flask blocking": blocked})

# %%
plotting.plot_arrivals({"FastAPI streaming": streamed[0], "Flask blocking": blocked[0]},
                       title="What the user sees: a staircase or a cliff")

# %% [markdown]
# The total time (E2E) and the tokens per second are about the same: both servers run the same engine
# for the same number of steps. Only the TTFT changes: from the whole generation,
# `prefill + (n - 1) * step`, to about one prefill. The factor, about `1 + (n - 1) * step / prefill`, grows
# with the length of the answer: a few times for these 32 tokens (~8 ms steps against a ~100 ms
# prefill), tens of times for an answer of a few hundred tokens. That is the whole case for streaming.
#
# ## Summary
#
# - A streaming response is `text/event-stream`: one `data: {json}` event per token, a summary event,
#   then `data: [DONE]`.
# - Streaming moves the first token from the end of the generation to right after the prefill:
#   **TTFT ≈ prefill**, and each later token arrives one decode step after the previous one
#   (ITL ≈ `step_ms`).
# - Sending each token costs almost nothing: client gaps and server steps agree closely.
# - The total time does not change: streaming makes the wait *visible*, not shorter.
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


checks.check_parse_sse_line(parse_sse_line, fastapi.url)

# %% [markdown]
# **2.** From a list of token arrival times (ms after sending), return the list of ITLs and the TPOT,
# as `vllm bench serve` defines them (see section 2).

# %%
def itl_and_tpot(arrival_ms):
    """(list of gaps between consecutive arrivals, TPOT) in ms."""
    raise NotImplementedError  # your code here


checks.check_itl_tpot(itl_and_tpot, trace)

# %% [markdown]
# **3.** A streaming client with nothing but `httpx`: POST a greedy (`temperature` 0) streaming request,
# read the response line by line with `response.iter_lines()` inside `client.stream(...)`, and return a
# list of `(ms since the request was sent, token text)` for each token event. Your `parse_sse_line`
# helps. The checker compares your text with `stream_generate`'s and checks the tokens came one by one.

# %%
def my_stream(url, prompt, max_tokens):
    """[(t_ms, token_text), ...] for each token event of a greedy stream from url + "/generate"."""
    raise NotImplementedError  # your code here


checks.check_my_stream(my_stream, fastapi.url)

# %% [markdown]
# ## Clean up

# %%
stop_all()
