# %% [markdown]
# # Appendix: what the CPU does under a decode step
#
# Optional reading, after the main notebooks. Nothing in the lab needs it: the server runs as it is on
# any CPU. This notebook looks underneath, at three things that decide how long a decode step takes on
# your machine and that notebooks 3 and 5 only mention.
#
# **What you will learn**
#
# 1. Why every thread that runs the model brings a team of worker threads (OpenMP), and why a server
#    runs the model on one thread only.
# 2. How the model file stores its weights: GGUF's 4-bit blocks, and how to undo one by hand.
# 3. What the CPU's vector width means for those blocks, and when a product of 8 rows costs little
#    more than one.
#
# **Run time:** under a minute on a 2-core laptop CPU.
#
# As in the main notebooks, every sentence that depends on this machine is printed by the run as
# `CLAIM holds: ...` (or `CLAIM FAILS: ...` with the reason).

# %% [markdown]
# ## Setup

# %% tags=["nbval-ignore-output"]
import sys

from labserver import EngineConfig
from labserver.lab.setup import load_engine
from labserver.lab import cpu, sizing
from labserver.lab.claims import claim
from labserver.lab.display import print_table
from labserver.model import kernels
from labserver.model.blocks import lossless
from labserver.lab.memory import stop_all  # stops the servers, then prints the peak memory

engine = load_engine()  # SmolLM2-135M-Instruct on the CPU; prints the route it chose
print(sizing.measure_speed(engine))
print(f"kernels: {kernels.path()} vector code, {kernels.features()}")

# %% [markdown]
# **Setup ends here.** Every cell below runs an experiment.
#
# ## 1. Thread teams
#
# On the CPU, PyTorch and this lab's C kernels parallelize their work with OpenMP, and OpenMP keeps one
# team of worker threads *per calling thread*. `cpu.second_thread_team` starts a new thread, lets it
# idle, counts the threads of this process, has the new thread generate a few tokens, and counts again;
# then it ends the thread and counts a third time.

# %% tags=["nbval-ignore-output"]
team = cpu.second_thread_team(engine)
print(team)
if "openmp" in (kernels.features() or ""):
    claim(f"running the model on a second thread added {team['after'] - team['before']} OS thread(s) to the "
          f"process: that thread's own OpenMP team", team["after"] > team["before"])
# libgomp (PyTorch's Linux wheels) ends a team with its thread; other runtimes may keep it for reuse.
if "openmp" in (kernels.features() or "") and sys.platform == "linux":
    claim(f"when the thread ended, its team went with it: {team['ended']} threads, fewer than the "
          f"{team['before']} there were before it ran the model", team["ended"] < team["before"]);

# %% [markdown]
# One team of 2 threads fits 2 cores, and its workers wait for the next parallel region by *spinning*,
# so the hundreds of small operations of a step on PyTorch's own path start at once. Once a second
# thread has run the model there are more OpenMP threads than cores, and libgomp (the OpenMP runtime in
# PyTorch's Linux CPU wheels) then spins only briefly before putting its workers to sleep (see
# `GOMP_SPINCOUNT` in its manual): from then on an operation may have to wake them up, in every thread.
# This lab's C kernel is built around that: a whole decode step is *one* parallel region, so it wakes its
# team once per step instead of once per operation.
#
# <!-- mechanism -->
# Spinning is fast only while the team has the cores to itself. On a machine where other programs are
# busy, a spinning thread burns its time slice waiting for a teammate the OS has paused, and sleeping
# workers can be the faster ones: the same experiment can go either way. That is why the main notebooks
# never claim which is faster, and why their tests run with OpenMP's defaults, as you do. Compare the
# step time of this notebook's thread now, with a second team alive beside it:

# %% tags=["nbval-ignore-output"]
from concurrent.futures import ThreadPoolExecutor

other = ThreadPoolExecutor(1, thread_name_prefix="other-model-thread")
other.submit(sizing.measure_speed, engine).result()  # a second long-lived thread with its own team
print("this thread, a second team alive:", sizing.measure_speed(engine))
other.shutdown()
print("this thread, the second team gone:", sizing.measure_speed(engine))

# %% [markdown]
# Whatever your numbers show, the rule the server follows is the same: **one thread in the process runs
# every torch call** (the engine thread of notebook 3). A thread that ends takes its team with it, which
# is why `Engine.from_config` loads and converts the weights on a short-lived thread.
#
# ## 2. GGUF's 4-bit blocks
#
# The model file (`SmolLM2-135M-Instruct.Q4_1.gguf`) stores its layer matrices as Q4_1 blocks: 32
# weights share a float16 scale `d` and a float16 minimum `m`, and each weight is a 4-bit integer `q`,
# standing for `d * q + m`. The embedding (also the output matrix) is Q8_0: 32 signed bytes and one scale.

# %% tags=["nbval-ignore-output"]
table = cpu.block_table()
print_table(table)
bits = {row["type"]: row["bits per weight"] for row in table}
claim(f"a Q4_1 weight takes {bits['Q4_1']} bits in the file (4 for q, and 16 + 16 bits of d and m per 32 "
      f"weights) and a Q8_0 weight {bits['Q8_0']} (8, and a 16-bit scale per 32)",
      (bits["Q4_1"], bits["Q8_0"]) == (5.0, 8.5));

# %% [markdown]
# One block by hand: 20 bytes, `d` and `m` first, then 16 bytes of which each holds two weights (the low
# 4 bits weight `j`, the high 4 bits weight `j + 16`). `cpu.dequantize_q4_1_block` is six lines; read it
# with `lab.display.show_source`, then compare with the `gguf` library's own dequantization:

# %% tags=["nbval-ignore-output"]
import numpy as np
from gguf.quants import dequantize

tensor = cpu.first_tensor("Q4_1")
block = np.asarray(tensor.data).reshape(-1)[:20]
mine = cpu.dequantize_q4_1_block(block)
theirs = dequantize(tensor.data, tensor.tensor_type).reshape(-1)[:32]
print(f"{tensor.name}: d, m = {block[:4].view(np.float16)}; first weights {np.round(mine[:4], 4)}")
# Both compute d * q + m in float32 from the same float16 values: one rounding each, the same one.
claim(f"the hand dequantization of block 0 of {tensor.name} equals gguf's: largest difference "
      f"{np.abs(mine - theirs).max()}", np.array_equal(mine, theirs));

# %% [markdown]
# ## 3. Vector width, and why a batched step is cheap
#
# <!-- mechanism -->
# A decode step multiplies one row of activations by every weight matrix. For each weight it reads half
# a byte and does one multiply-add: far more bytes than arithmetic per second, so one row's product runs
# at the speed of memory. The kernels unpack the nibbles and do the multiply-adds in float32, as many per
# instruction as a vector register holds float32 numbers:

# %% tags=["nbval-ignore-output"]
width = cpu.VECTOR_BYTES.get(kernels.path())
if width:
    print(f"{kernels.path()}: {width}-byte registers: {width // 4} float32 multiply-adds per instruction, "
          f"{width} with 8-bit integers (what VNNI's dot products do); {2 * width} Q4_1 weights fit in one")
else:
    print(f"{kernels.path()} C: the compiler decides how wide the loops run")

# %% [markdown]
# With B rows (B sequences in one batched step, notebook 5), the same weights serve every row: they are
# read once, and only the arithmetic grows B times. The blocks below are the model's own Q4_1 weights
# (several layers stacked into one matrix larger than the CPU's caches), quantized again from their
# float32 values: the very same blocks. First, does the kernel compute the same product as float32
# arithmetic? Then, what do 1, 2, 4 and 8 rows cost?

# %% tags=["nbval-ignore-output"]
import torch

w = cpu.on_grid_matrix("Q4_1")
layer = lossless(w, "q4_1")  # None if the blocks did not reproduce w exactly
x = torch.randn(8, w.shape[1])
diff, bound = float((layer(x) - x @ w.T).abs().max()), cpu.float32_sum_bound(x, w)
claim(f"the block kernel's product of 8 rows equals float32's up to rounding: largest difference {diff:.1e}, "
      f"within the {bound:.1e} that the order of {w.shape[1] - 1} float32 additions allows", diff <= bound)
cost = cpu.rows_cost(layer, w.shape[1], batches=(1, 2, 4, 8))
print_table([{"rows": b, "ms": ms, "x one row": ms / cost[1], "weights read GB/s": layer.nbytes / ms / 1e6}
             for b, ms in cost.items()])

# %% [markdown]
# Read the "x one row" column. Where it stays near 1, the product is bound by memory: the rows ride
# along with the weights that had to be read anyway, and batching is nearly free. Where it grows with
# the rows, the float32 multiply-adds take longer than the reading: with narrow registers that happens
# early, with wide ones late, and on a machine whose other programs keep the caches and cores busy the
# column can move from one run to the next (run the cell again). That is why no sentence here claims a
# number for it.
#
# <!-- mechanism -->
# Rounding the activations to 8 bits (`EngineConfig(quant="w4a8")`, what llama.cpp does
# with these weights) turns the multiply-adds into integer dot products, four times as many per
# instruction; the logits then move a little and some greedy tokens change (`make bench` prints both
# routes side by side).
#
# ## Summary
#
# - Every thread that runs the model owns an OpenMP team; more teams than cores change every step's
#   time, in a direction that depends on how busy the machine is. One engine thread avoids the question.
# - Q4_1 stores 32 weights in 20 bytes: 5 bits a weight, each `d * q + m`.
# - A decode step reads every weight once; a batched step reads them once for all its rows, and only its
#   arithmetic grows with the rows: how much that costs depends on the CPU's vector width.
#
# ## Questions
#
# **1.** *Explain your number.* The setup measured one decode step; `cpu.block_table()` gives the bytes
# of all the model's blocks. What read speed (GB/s) does one step then need at least? Compare it with the
# GB/s of the one-row product in section 3. If they disagree, which of the two runs more than one
# thread, keeps its activations in cache, or pays a call per matrix?
#
# **2.** *Explain your number.* Time `cpu.rows_cost` for 1 to 32 rows, a few times. Where does the cost
# start to grow with the rows, how steady is that point from run to run, and what does it say about the
# batch size at which a batched step stops being nearly free on this CPU?
#
# ## Clean up
#
# Stop the servers this notebook started; the last line is the most memory this notebook held at once.

# %% tags=["nbval-ignore-output"]
stop_all()
