# The two commands of the README:
#   make run   installs the pipeline into .venv and runs it (`dvc repro`, default params.yaml)
#   make test  installs it with the test tools and runs the linter and every test
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test lint benchmark mlflow-ui gpu serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

# On a machine with an NVIDIA GPU, `make gpu run`: JAX with CUDA, then the pipeline trains on the GPU.
gpu: $(VENV)/.installed-gpu

$(VENV)/.installed-gpu: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[gpu]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	dvc repro
	dvc metrics show

test: $(VENV)/.installed-dev lint
	python -m pytest

lint: $(VENV)/.installed-dev
	ruff check src stages tests benchmarks

benchmark: $(VENV)/.installed
	python -m benchmarks.speed

mlflow-ui: $(VENV)/.installed
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The registry's alias (params.yaml `registry`) over HTTP: POST http://127.0.0.1:$(PORT)/invocations
# with {"inputs": <(n, 28, 28) pixels 0-255>}; MODEL=models:/<name>@<alias> serves another.
PORT ?= 5001
serve: $(VENV)/.installed
	python -m fmnist.serve --port $(PORT) $(if $(MODEL),--model $(MODEL))
