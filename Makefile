# Two commands matter: `make demo` (the daily DAG on generated logs) and `make test`.
# Both create .venv from the pinned requirements.lock when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MMN := $(BIN)/mmn
# Server targets (mlflow-ui, airflow-ui, serve) listen on 127.0.0.1 at their default port;
# `make mlflow-ui PORT=5050 HOST=0.0.0.0` changes that. Only values given on the command line
# count, so a PORT or HOST exported in the environment never moves or exposes a server.
cli_var = $(if $(filter command line,$(origin $(1))),$($(1)))
SERVER_OPTS = $(if $(call cli_var,HOST),--host $(call cli_var,HOST)) $(if $(call cli_var,PORT),--port $(call cli_var,PORT))

.PHONY: help venv java demo test cluster-test lint mlflow-ui airflow-ui backfill rollback serve clean

help:
	@echo "make demo        generate 3 days of logs and run the daily DAG for each (embedded mode)"
	@echo "make test        run the test suite (the cluster test too, when Java and PostgreSQL are installed)"
	@echo "make cluster-test  the scale-out stack as native processes: Spark standalone, Postgres, MLflow server, Airflow (docs/deployment.md)"
	@echo "make mlflow-ui   open the MLflow UI on http://127.0.0.1:5000 (PORT=... to change)"
	@echo "make airflow-ui  run Airflow standalone (UI on http://127.0.0.1:8080; PORT=... to change)"
	@echo "make backfill FROM=YYYY-MM-DD TO=YYYY-MM-DD   queue a backfill of logical dates (needs a scheduler)"
	@echo "make backfill DAYS=2026-11-01:2026-11-03      the same, naming the impression days to build"
	@echo "make rollback    point the champion alias back at the previous model"
	@echo "make serve       serve models:/<name>@champion over HTTP on 127.0.0.1:5001 (PORT=... to change)"
	@echo "make lint        ruff"

java:
	@scripts/check_java.sh

$(STAMP): requirements.lock pyproject.toml
	@scripts/check_java.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(MMN) demo

test: venv
	$(BIN)/python -m pytest -q

# The compose deployment's services as native processes, two days through them (tests/test_cluster.py);
# fails instead of skipping when a prerequisite is missing.
cluster-test: venv
	MMN_REQUIRE_CLUSTER=1 $(BIN)/python -m pytest -q -m cluster tests/test_cluster.py

lint: venv
	$(BIN)/ruff check .

mlflow-ui: venv
	$(MMN) mlflow-ui $(SERVER_OPTS)

airflow-ui: venv
	$(MMN) airflow $(SERVER_OPTS) standalone

backfill: venv
	@if [ -n "$(DAYS)" ]; then $(MMN) backfill --days $(DAYS); \
	elif [ -n "$(FROM)" -a -n "$(TO)" ]; then $(MMN) backfill --from-date $(FROM) --to-date $(TO); \
	else echo "usage: make backfill FROM=YYYY-MM-DD TO=YYYY-MM-DD (logical dates)  or  DAYS=FIRST:LAST (impression days)"; exit 2; fi

rollback: venv
	$(MMN) rollback

serve: venv
	$(MMN) serve $(SERVER_OPTS)

clean:
	rm -rf data .airflow
