# Two commands do all set-up on a fresh machine: `make repro` and `make test`.
# Both are idempotent: the virtualenv is rebuilt only when requirements.txt changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION_MNIST_DEB_DIR := /usr/share/datasets/fashion-mnist
KERAS_FASHION_MNIST_DIR := $(or $(KERAS_HOME),$(HOME)/.keras)/datasets/fashion-mnist

export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
# stages call `python -m pipeline.stages.<stage>`: make that the virtualenv's python
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install data browser postgres repro test test-slow test-all lint format variants bench bench-tune bench-e2e bench-numerics bench-folders dashboard team-up team-down clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# requirements.txt is a full lock (every transitive pin), so no resolution happens here
	$(BIN)/pip install --quiet --no-deps -r requirements.txt
	$(BIN)/pip check
	touch $(STAMP)

# The default data: Debian's dataset-fashion-mnist where apt is available and the files are
# missing; elsewhere (macOS, no root) the prepare stage downloads through keras.datasets.
data:
	@if [ -f $(FASHION_MNIST_DEB_DIR)/t10k-labels-idx1-ubyte.gz ] || [ -f $(KERAS_FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST: not installed; the prepare stage will download it through keras.datasets"; \
	fi

# Debian's chromium for the report's rendering test (the test skips, saying why, without it)
browser:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "chromium: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium; \
	else \
		echo "chromium: not installed and apt-get unavailable; the report rendering test will be skipped"; \
	fi

# Debian's PostgreSQL for the scale-out tests and `make team-up` (the tests skip without it, except
# under CI, where .ci/run sets REQUIRE_POSTGRES=1 and a skip fails)
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "postgresql: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq postgresql; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq postgresql; \
	else \
		echo "postgresql: not installed and apt-get unavailable; the scale-out tests will be skipped"; \
	fi

repro: install data
	$(BIN)/dvc repro

test: install data browser postgres
	$(BIN)/python -m pytest

test-slow: install data browser postgres
	$(BIN)/python -m pytest -m slow

test-all: install data browser postgres
	$(BIN)/python -m pytest -m "slow or not slow"

lint: install
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

format: install
	$(BIN)/ruff format pipeline tests
	$(BIN)/ruff check --fix pipeline tests

# reports/benchmark.md: compute, strategies vs naive fit, a large-study estimate (~10 min); the
# bench-* targets below add their parts to the same document
bench: install data
	$(BIN)/dvc repro prepare
	$(BIN)/python -m pipeline.tools.bench

# adds a clean `dvc repro` in a temporary copy, no-op repro and peak memory per stage (~20 min)
bench-e2e: install data
	$(BIN)/python -m pipeline.tools.bench --end-to-end

# tune trials/min per strategy under the training rule (~10 min)
bench-tune: install data
	$(BIN)/dvc repro prepare
	$(BIN)/python -m pipeline.tools.bench --tune

# reading a folder of generated camera-size JPEGs: the old path, one decode, draft mode, all cores (~3 min)
bench-folders: install
	$(BIN)/python -m pipeline.tools.bench --folders

# XLA and bfloat16 mixed precision against float32 (~5 min)
bench-numerics: install data
	$(BIN)/dvc repro prepare
	$(BIN)/python -m pipeline.tools.bench --numerics

# the README's variant table
variants: install
	$(BIN)/python -m pipeline.tools.describe

# optional extra: a web UI for the Optuna studies (`optuna-dashboard results/tune/<variant>/study.journal`)
dashboard: install
	$(BIN)/pip install --quiet --no-deps optuna-dashboard==0.21.0 bottle==0.13.4

# the local team stack (README "Running on several machines"): PostgreSQL for the Optuna studies and
# an MLflow server on it, both on 127.0.0.1; data in .team/, the environment to use in .team/env
TEAM_PG_PORT ?= 5433
TEAM_MLFLOW_PORT ?= 5000
team-up: install postgres
	$(BIN)/python -m pipeline.stack.team_stack up --dir .team --pg-port $(TEAM_PG_PORT) --mlflow-port $(TEAM_MLFLOW_PORT)

team-down: install
	$(BIN)/python -m pipeline.stack.team_stack down --dir .team

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
