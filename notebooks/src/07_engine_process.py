# %% [markdown]
# # 7. The engine in its own process
#
# Since notebook 3 the engine has run on a thread of the server's process: the event loop moves bytes,
# the engine thread runs the model, and both share one process and one GIL. vLLM V1 splits them: the API
# server process tokenizes, detokenizes and streams, and talks over ZeroMQ to an `EngineCoreProc`, a
# separate process whose busy loop only schedules and runs the model. This notebook runs the same server
# both ways, side by side, on the same model: while the API process works hard, token by token, and when
# the engine dies.
#
# **What you will learn**
#
# 1. What moves where when the engine has its own process: the API process tokenizes, turns token ids
#    back into text and applies stop strings; only ids and step times cross the boundary.
# 2. What the split protects and what it does not while the API process is busy with many clients and
#    large request bodies: the engine's steps, and the API's own `/health`.
# 3. What the boundary costs per token: the client's gap between tokens against the server's step.
# 4. What clients see when the engine dies in each design, and how a supervisor brings a process back.
#
# **Run time:** about 1-2 minutes on 2 CPU cores (the engine process loads the model once more, and again
# after it is killed).

# %% [markdown]
# ## Setup
#
# Two FastAPI servers on one model. Backend `"batched"` is the server's default (notebook 5): the batched
# scheduler on an engine thread of this kernel's process. Backend `"process"` runs the same scheduler in
# an engine process that loads the same weights (the route measured here) and listens on a ZMQ socket;
# the server keeps only the tokenizer (`serve/process/frontend.py`) and an `EngineClient`
# (`serve/process/client.py`), and a supervisor (`serve/process/supervisor.py`) watches the process.
# `/health` says which process runs each engine.

# %% tags=["nbval-ignore-output"]
import os

from labserver.lab.setup import load_engine
from labserver.lab import checks, process as lab
from labserver.lab.claims import claim
from labserver.measure.client import stream_generate
from labserver.serve.background import start_fastapi, stop
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine(prefix_caching=False)  # SmolLM2-135M-Instruct on the CPU; prints its route
thread = start_fastapi(engine, backend="batched", name="engine-thread")
process = start_fastapi(engine, backend="process", name="engine-process")
pids = {"this kernel": os.getpid(), "engine thread": lab.engine_pid(thread.url),
        "engine process": lab.engine_pid(process.url)}
claim(f"the engine thread runs in this kernel's process (pid {pids['engine thread']}), the engine process in "
      f"another one (pid {pids['engine process']})", pids["engine thread"] == os.getpid() != pids["engine process"]);

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. What crosses the boundary
#
# The same greedy request to both servers. With the engine in its own process, the engine never makes
# text: for each token it sends the API process a token id, its index and the step's time, and the API
# process turns ids into text with an incremental detokenizer (as vLLM's `OutputProcessor` does), then
# into the same SSE events as before. A client cannot tell the two apart.

# %% tags=["nbval-ignore-output"]
a, b = (stream_generate(server.url, lab.PROMPT, 24, 0.0) for server in (thread, process))
print(repr(b.text))
claim(f"both designs sent the same {b.n_tokens} greedy tokens, ids and text alike",
      a.n_tokens > 0 and a.token_ids == b.token_ids and a.text == b.text)
print("bytes per token:", lab.boundary_bytes())
step_ms = lab.median(a.decode_step_ms)
MAX_TOKENS = lab.stream_tokens(step_ms)  # streams of about 2 s below (24 to 64 tokens)
print(f"decode step {step_ms:.1f} ms: streams of {MAX_TOKENS} tokens below")

# %% [markdown]
# On the wire from the engine process a token is an array of numbers (request id, token id, index, step
# time) packed with msgpack, and a step's tokens for all requests travel in one message. The SSE event
# the API process makes of it carries the text and field names in JSON, several times as many bytes.
# Keeping text out of the engine process is also what lets several API processes share one engine
# (`--api-servers`, vLLM's `--api-server-count`): each one detokenizes its own streams.
#
# ## 2. The per-token cost of the boundary
#
# One stream on each server, nothing else running, `/health` probed every 20 ms (`lab.measure`, as in
# notebook 3). The server's `step_ms` is measured where the engine runs; the client's gap between two
# tokens (ITL) includes everything after it: for the process, a ZMQ message, the API process's receiving
# thread, the detokenizer, the event loop and the socket.

# %% tags=["nbval-ignore-output"]
quiet = {kind: lab.measure(server.url, max_tokens=MAX_TOKENS, label=kind)
         for kind, server in (("batched", thread), ("process", process))}
rows = {kind: lab.loaded_row(kind, "quiet", run) for kind, run in quiet.items()}
lab.print_table(list(rows.values()))
hop = {kind: row["ITL p50 ms"] - row["step p50 ms"] for kind, row in rows.items()}
claim(f"the process boundary added less than half a step per token: client ITL p50 minus server step p50 "
      f"{hop['process']:+.2f} ms (engine thread: {hop['batched']:+.2f} ms), a step {rows['process']['step p50 ms']:.1f} ms",
      hop["process"] < 0.5 * rows["process"]["step p50 ms"]);

# %% [markdown]
# What a token pays at the boundary: packing a few numbers, one message through a local socket, and a
# detokenizer step that the engine thread did before anyway; the claim above bounds it by this run's step. (The `ITL/step p50`
# column, the client's gap over the server's step, is what `make bench` calls P1: its figures are
# numbered P0 to P6, e.g. P0 is the server's step while streaming over the engine's step alone, and
# `labserver/measure/bench.py` lists them all.) The steps themselves
# may differ a little between the two columns: the engine process runs its own OpenMP team, and on a
# busy machine it competes with other processes for the cores.
#
# ## 3. The API process under load
#
# Now the API process gets real work: 8 clients send, again and again, the longest prompt the server
# reads (`max_prompt_chars`). The server parses each body and tokenizes it, finds it too many tokens and
# answers 400: only the API process works, the engine never sees them. First what one of them costs.
# The stream measured meanwhile gives up after five times the quiet stream's time (once it has three
# tokens), as a client would: on some machines the engine thread's steps stretch a hundredfold here.

# %% tags=["nbval-ignore-output"]
big = lab.big_prompt(engine)
cost_ms = lab.api_cost_ms(thread.url, big)
print(f"reading, tokenizing and refusing one {len(big):,}-character prompt: {cost_ms:.0f} ms of the API process")
loaded = {}
for kind, server in (("batched", thread), ("process", process)):
    with lab.ApiLoad(server.url, big, clients=8) as load:
        loaded[kind] = lab.measure(server.url, max_tokens=MAX_TOKENS, label=kind,
                                   budget_s=5 * quiet[kind].trace.e2e_ms / 1000)
    rows[kind + " loaded"] = lab.loaded_row(kind, "8 clients", loaded[kind], load)
lab.print_table([rows[k] for k in ("batched", "batched loaded", "process", "process loaded")])

# %% tags=["nbval-ignore-output"]
worst = min(rows["batched loaded"]["/health p99 ms"], rows["process loaded"]["/health p99 ms"])
claim(f"under the load /health p99 rose to {rows['batched loaded']['/health p99 ms']:.0f} ms with the engine "
      f"thread and {rows['process loaded']['/health p99 ms']:.0f} ms with the engine process: both at least half "
      f"of one refused request ({cost_ms:.0f} ms)", worst >= 0.5 * cost_ms)
lab.plot_isolation({**{(k, "quiet"): r for k, r in quiet.items()}, **{(k, "loaded"): r for k, r in loaded.items()}})

# %% [markdown]
# Read the table and the plot in two parts.
#
# - **`/health`** slows down with either design. It is answered by the API process's event loop, and that
#   loop now parses and tokenizes large prompts: a probe waits for the work ahead of it. Moving the engine
#   out does not help here; more API processes would (`--api-servers`), or tokenizing off the loop.
# - **The engine's steps and the client's gaps.** Both designs lose CPU to the API process: on 2 cores,
#   a core busy parsing and tokenizing is a core the model's OpenMP team waits for. With the engine on a
#   thread they also share the GIL: the model's C code runs without it, but the Python around every step
#   (sampling, the scheduler, detokenizing, handing events to the loop) needs it back, and a thread that
#   wants the GIL from one that runs Python without pause waits up to 5 ms for it
#   (`sys.getswitchinterval()`), which can happen several times a step. The engine process has a GIL of its own. Do the
#   engine thread's steps then stretch further under the same load than the engine process's? The GIL
#   says they should. On a
#   machine shared with other busy programs (a hub, a laptop compiling something) the steps of both vary
#   a lot from run to run, and one run can show the opposite: compare the quiet rows first, and run the
#   cell again before you conclude. The client's gaps (ITL) carry the API process's delays too, whatever
#   the design: each token still leaves through that busy event loop.
#
# ## 4. When the engine dies
#
# <!-- mechanism -->
# Two long streams run on each server; after a few tokens the engine dies. On the engine thread a fault
# is injected into its loop (its scheduler raises: a bug, not one failed request). The engine process is
# killed with `kill -9`, as the kernel's out-of-memory killer would. Meanwhile `/health` is asked every
# 20 ms, and once the streams have ended a new request is sent.

# %% tags=["nbval-ignore-output"]
thread = start_fastapi(engine, backend="batched", name="engine-thread")  # a fresh one: this cell can run again
deaths = [lab.kill_engine(thread, "batched", step_ms), lab.kill_engine(process, "process", step_ms)]
lab.print_table([d.row() for d in deaths])
lab.plot_death(deaths)

# %% tags=["nbval-ignore-output"]
for d in deaths:
    claim(f"{d.backend}: each of the {len(d.streams)} open streams got an error event and then [DONE], the last "
          f"{d.last_end_ms:.0f} ms after the {d.how}, and a new request got a {d.during_status}",
          all(s.error_then_done for s in d.streams) and d.last_end_ms < 2000 and d.during_status == 503)
dead_thread, dead_process = deaths
claim(f"the supervisor started a new engine process (pid {dead_process.pid_before} -> {dead_process.pid_after}): "
      f"/health said 503 until it was ready, {(dead_process.back_ms or float('nan')) / 1000:.1f} s after the kill",
      dead_process.back_ms is not None and 503 in dead_process.statuses_after())
claim("nothing restarts an engine thread: its server still answers /health with 503",
      dead_thread.statuses_after()[-1] == 503 and dead_thread.back_ms is None)
stop("engine-thread")

# %% [markdown]
# Both designs tell their clients: the open streams end with an error event and `[DONE]` (so no client
# waits for ever), `/health` answers 503 with the reason, and new requests get a 503 instead of hanging.
# What differs is what comes next. A thread that died took the engine with it, inside a process that may
# now be in any state: only restarting the whole server helps, and every client of it sees that. A
# process that died left the API process untouched: the supervisor starts a new engine process (a
# bounded number of times, exercise 2), the API process says `Hello` again, and the same server, on the
# same port, serves again. The requests that were running are lost either way (the client may retry
# them). vLLM fails them too, and rather than restart its engine core it shuts the server down and leaves
# the restart to whatever runs it (Kubernetes, systemd).
#
# ## Summary
#
# - With the engine in its own process, the API process keeps the text: it tokenizes, detokenizes and
#   applies stop strings; the engine process sends token ids and step times, a few bytes a token.
# - Per token the boundary adds a message of a few numbers; the run bounds its cost by its own step.
# - Busy work in the API process slows its own `/health` whatever the design; with the engine in its own
#   process the engine keeps its own GIL, so its steps lose only CPU, not turns at the GIL.
# - When the engine dies, both designs end open streams with an error and `[DONE]` and answer 503; only
#   the engine process can be restarted under a running server.
#
# ## Exercises
#
# Reference solutions: `notebooks/solutions/07_engine_process.py`.
#
# **1.** The API process's loop for one request, in three parts. The engine process sends token ids,
# never text: `{"token_id": 9, "index": 0, "step_ms": 6.1, ...}` per token, then one
# `{"finish_reason": ..., "usage": ..., "timings": ...}`. The checkers use byte tokens
# (`"Grüße aus 東京 🙂"`, one id per UTF-8 byte) and the real engine's ids on the fake runner.
#
# **1a.** Write `new_text(tokenizer, ids, prefix, read) -> (text, prefix, read)`: the text that the last id
# of `ids` adds. Never decode an id alone: decode the window `ids[prefix:read]` (what was sent) and
# `ids[prefix:]`, and return the difference with the window moved on, or `""` and the window unchanged
# while the last character is incomplete (its decoding ends in `"\ufffd"`).

# %%
def new_text(tokenizer, ids, prefix, read):
    """The text the last of `ids` adds, and the new (prefix, read) window."""
    raise NotImplementedError  # your code here


_ = checks.check_new_text(new_text)

# %% [markdown]
# **1b.** Write `hold_back(text, stop) -> (send, held, stopped)`: `text` is what is not sent yet. If a stop
# string occurs in it, send the text before the first one and stop. Otherwise hold back the longest tail
# that could still become a stop string (`"wor"` of `"world"`) and send the rest.

# %%
def hold_back(text, stop):
    """What to send now, what to hold back, and whether a stop string was found."""
    raise NotImplementedError  # your code here


_ = checks.check_hold_back(hold_back)

# %% [markdown]
# **1c.** Write `sse_from_ids(outputs, tokenizer, stop)` with the two: for each token yield `data: {JSON}`
# and a blank line, with the token's fields and `"token"`, the text to send. On a stop string, send the
# summary `{"finish_reason": "stop"}` and read no further. Text still held back when the finish arrives
# goes out in one more `{"token": ...}` event before it. End with `data: [DONE]`. (The server's own loop
# is split between `engine/output.py`, `serve/stop_strings.py` and `serve/pipeline.py`: read them
# afterwards.)

# %%
def sse_from_ids(outputs, tokenizer, stop):
    """Yield the SSE frames for one request from the engine process's outputs."""
    raise NotImplementedError  # your code here


_ = checks.check_sse_from_ids(sse_from_ids)

# %% [markdown]
# **2.** The supervisor restarts a dead engine process, but not for ever: an engine that dies again at
# once (a corrupt weights file, too little memory) would restart in a loop and keep `/health` flapping.
# Write `should_restart(deaths_s, now_s, max_restarts, window_s)`: `deaths_s` are the times of every
# death so far (the newest is `now_s`); restart unless more than `max_restarts` of them fall within the
# last `window_s` seconds (`now_s - t < window_s`).

# %%
def should_restart(deaths_s, now_s, max_restarts, window_s):
    """True to start a new engine process, False to give up (and answer 503 until someone steps in)."""
    raise NotImplementedError  # your code here


_ = checks.check_should_restart(should_restart)

# %% [markdown]
# **3.** Explain your numbers from section 3: by how many times did the engine thread's step p50 grow
# under the load, and the engine process's? Run `sys.setswitchinterval(0.001)` (the GIL changes hands
# every 1 ms instead of 5), run section 3 again, and explain what changes for each design and why.
#
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
