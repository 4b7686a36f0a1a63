# `make demo` installs everything into .venv and runs the whole pipeline; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Offline and repo-local by default; see easyanimate/runtime.py for the full list.
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_HOME := $(CURDIR)/.easyanimate/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install install-test lint demo test repro clean serve-prefect prefect-up prefect-down retrain

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# pip (not uv) so the machine's own pip configuration (local wheels, constraints) applies.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

demo: $(STAMP)
	@test -d .git || (git init -q && echo "initialised a git repository (DVC needs one)")
	$(BIN)/easyanimate pipeline

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(TEST_STAMP) lint
	$(BIN)/easyanimate dvc-yaml --check
	$(BIN)/python -m pytest -q

repro: $(STAMP)
	$(BIN)/dvc repro

# Local Prefect server on 127.0.0.1:$(PREFECT_PORT) + process worker running prefect.yaml's deployments.
PREFECT_PORT ?= 4200
serve-prefect: $(STAMP)
	PREFECT_PORT=$(PREFECT_PORT) infra/prefect_local.sh serve

prefect-up: $(STAMP)
	PREFECT_PORT=$(PREFECT_PORT) infra/prefect_local.sh up

prefect-down:
	PREFECT_PORT=$(PREFECT_PORT) infra/prefect_local.sh down

# Queue a run of the scheduled retraining now (a worker from serve-prefect picks it up).
retrain:
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect deployment run retrain/weekly

clean:
	rm -rf data/curated models reports .easyanimate mlflow.db mlruns mlartifacts dvc.lock
