# lmforge: two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
MLFLOW_PORT  ?= 5000
PREFECT_PORT ?= 4200
ARGS   ?=
CRON   ?= 0 3 * * 1

.PHONY: run test test-fast lint ui schedule clean install bench

install: $(STAMP)

# (Re)install when pyproject.toml changes. torch is pinned to the CPU build that lies on this disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]:-0} -eq 0
	$(BIN)/python -c "import lm, flows, tasks, torch, lightning, prefect, mlflow"
	touch $(STAMP)

run: $(STAMP)  ## the whole pipeline on the built-in offline demo corpus (conf/default.yaml)
	$(BIN)/lmforge run $(ARGS)

test: $(STAMP)  ## every test a CPU can run
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## the inner loop: skips tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/python -m ruff check lm flows tasks tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/train.py

ui: $(STAMP)  ## MLflow and Prefect dashboards on 127.0.0.1
	@$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host $(HOST) --port $(MLFLOW_PORT) >/tmp/lmforge-mlflow-ui.log 2>&1 &
	@$(BIN)/prefect server start --host $(HOST) --port $(PREFECT_PORT) >/tmp/lmforge-prefect-ui.log 2>&1 &
	@echo "MLflow:  http://$(HOST):$(MLFLOW_PORT)   (log /tmp/lmforge-mlflow-ui.log)"
	@echo "Prefect: http://$(HOST):$(PREFECT_PORT)   (log /tmp/lmforge-prefect-ui.log)"
	@echo "To send runs to this Prefect server: export PREFECT_API_URL=http://$(HOST):$(PREFECT_PORT)/api"
	@echo "Stop both: pkill -f 'mlflow ui' ; pkill -f 'prefect server'"

schedule: $(STAMP)  ## a Prefect server on $(HOST):$(PREFECT_PORT) (started when none answers; SQLite under the workdir) serving the retrain (cron $(CRON)), stage and new-data deployments
	$(BIN)/lmforge schedule --local-server --host $(HOST) --port $(PREFECT_PORT) --cron "$(CRON)" $(ARGS)

clean:
	rm -rf runs mlruns mlartifacts mlflow.db mlflow.db.lock .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
