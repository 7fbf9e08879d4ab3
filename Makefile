# The two commands of the README:
#   make run   installs the pipeline into .venv and runs it (`dvc repro`, default params.yaml)
#   make test  installs it with the test tools and runs the linter and every test
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run small test lint search benchmark mlflow-ui vega gpu deps-system tracking-server tracking-server-stop screenshots serve

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

# `dvc repro` with a progress line over the whole pipeline and an ETA (fmnist.repro)
run: $(VENV)/.installed
	python -m fmnist.repro
	python -m fmnist.results

# The run to try first (docs/usage.md): every variant and stage on the real data, but 2 epochs,
# seed 0 only and the SVC on 10,000 images: NOT the paper's numbers. A DVC experiment named
# `small` in a temporary copy (--temp), so the workspace and its committed results stay as
# they are; its MLflow runs are named `... @ small`. Run again, it replaces the experiment.
SMALL := -S train.epochs=2 -S 'train.seeds=[0]' -S baseline.train_size=10000
small: $(VENV)/.installed
	-dvc exp remove small 2>/dev/null
	dvc exp run --temp -n small $(SMALL)
	@echo "Experiment 'small' (2 epochs, seed 0, SVC on 10,000 images: NOT the paper's numbers) beside the committed results:"
	@dvc metrics diff HEAD small --all --no-path --targets metrics/accuracy.json

# the test files spread over pytest-xdist workers, one more than the cores: the slow tests
# wait on their subprocesses (queue workers polled, servers starting, a fixture built by
# another worker), and the extra worker fills those waits (on the 2-core Zen 5: 522 s with 3
# workers, 574-608 s with 2); each file on one worker (a module's tests may share a fixture
# and run in order), the longest files first (tests/conftest.py: LONGEST_FIRST); the slowest
# tests are listed at the end
WORKERS_FOR_TESTS := $(shell echo $$(( $$(nproc) + 1 )))
test: $(VENV)/.installed-dev lint deps-system
	python -m pytest -n $(WORKERS_FOR_TESTS) --dist loadfile --no-loadscope-reorder --durations=15

lint: $(VENV)/.installed-dev
	ruff check src stages tests benchmarks

# params.yaml's hyperparameter search (docs/search.md); WORKERS=2 runs two worker processes
search: $(VENV)/.installed
	python -m fmnist.search $(if $(WORKERS),--workers $(WORKERS))

benchmark: $(VENV)/.installed
	python -m benchmarks.speed

# One worker and no job runner: MLflow's defaults (4 workers, a job runner of its own) start
# 16 processes and take 2.3 GB to serve one person's browser; the job runner serves GenAI
# features that this project does not use. MLFLOW_WORKERS=4 make mlflow-ui for more.
MLFLOW_WORKERS ?= 1
mlflow-ui: $(VENV)/.installed
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--host 127.0.0.1 --port 5000 --workers $(MLFLOW_WORKERS)

# Vega for `dvc plots show --html-template plot_templates/offline.html`, from npm into .vega/
# (once; the page then needs no network, where DVC's default page loads Vega from a CDN)
vega:
	npm install --silent --no-audit --no-fund --prefix .vega vega@5 vega-lite@5 vega-embed@6

# PostgreSQL from Debian's packages, for the tracking server and its test (its server programs
# live in /usr/lib/postgresql/<version>/bin); installed only where they are missing, without
# Debian's default cluster on port 5432 (the tracking server makes its own)
PG_CTL := $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
deps-system:
ifeq ($(PG_CTL),)
	$(SUDO) mkdir -p /etc/postgresql-common/createcluster.d
	echo 'create_main_cluster = false' | $(SUDO) tee /etc/postgresql-common/createcluster.d/fmnist.conf >/dev/null
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql
endif

# A shared MLflow server on PostgreSQL (docs/team.md); prints the
# MLFLOW_TRACKING_URI to export. State, database and artifacts in .tracking-server/.
tracking-server: $(VENV)/.installed deps-system
	python -m fmnist.tracking_server start

tracking-server-stop: $(VENV)/.installed
	python -m fmnist.tracking_server stop

# docs/images/mlflow-*.png for docs/mlflow.md: its steps walked from MLflow's home page by headless
# Chromium (Debian's chromium; apt needs root) driven by npm's playwright-core, on `mlflow ui` over
# a real small run (the tests' tiny pipeline), or STORE=<folder>: the MLflow store in that folder
# (mlflow.db, mlartifacts/), e.g. STORE=. after `make run`; SHOTS=<folder>: the PNGs there instead
screenshots: $(VENV)/.installed-dev
	command -v chromium >/dev/null || $(SUDO) apt-get install -y chromium
	cd docs/screenshots && npm install --no-audit --no-fund --silent
	python docs/screenshots/run.py $(if $(STORE),--store $(STORE)) $(if $(SHOTS),--out $(SHOTS))

# The registry's alias (params.yaml `registry`) over HTTP: POST http://127.0.0.1:$(PORT)/invocations
# with {"inputs": <(n, 28, 28) pixels 0-255>}; MODEL=models:/<name>@<alias> serves another.
PORT ?= 5001
serve: $(VENV)/.installed
	python -m fmnist.serve --port $(PORT) $(if $(MODEL),--model $(MODEL))
