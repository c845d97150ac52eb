# The project's commands. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: help venv deps up monitor demo down status test test-unit lint typecheck format clean bench soak bench-verify bench-producer bench-consumer bench-capture bench-tables

help:
	@echo "make demo    - start local services, run producer + consumer under load, verify (DEMO_SECONDS=30)"
	@echo "make test    - install everything, start private services, run the whole test suite"
	@echo "make up      - start Kafka + source/destination PostgreSQL locally, write .env"
	@echo "make monitor - start a local Prometheus (PROMETHEUS_PORT, 9090) with the alerts, scraping both daemons"
	@echo "make status  - say what runs where"
	@echo "make down    - stop the local services and Prometheus"
	@echo "make lint    - ruff check and format check, the import layering contract (lint-imports), hadolint, mypy"
	@echo "make typecheck - mypy on cdc/ and the root scripts (also part of make lint)"
	@echo "make bench   - side by side: this pipeline, PostgreSQL logical replication, Debezium, a naive consumer"
	@echo "               (drain, three tables, latency, initial load, cost; ~40 min; bench-results/report.md). BENCH_ARGS=--smoke: ~3 min"
	@echo "make soak    - the pipeline for SOAK_MINUTES (30) with a fault every 3 min; memory/fds must stay flat"
	@echo "make bench-verify - time and peak memory of verify on 1M rows (private PostgreSQL servers)"
	@echo "make bench-capture - a writer's transactions/s with and without capture triggers (private PostgreSQL)"
	@echo "make bench-producer - producer throughput on a 100k backlog and idle CPU (private services)"
	@echo "make bench-consumer - consumer throughput on a 100k-event backlog (private services)"
	@echo "make bench-tables   - backlog drain over three tables against employees alone (make bench runs it too)"

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

# System packages (Java, Maven, PostgreSQL server, Prometheus) and the Kafka broker jars (cached in .cdc/).
deps: venv
	@bash scripts/install-system-deps.sh
	@$(PY) -m cdc prepare

up: deps
	@$(PY) -m cdc up

# Prometheus on 127.0.0.1:PROMETHEUS_PORT with monitoring/prometheus's config and alerts, its
# targets the daemons' metrics ports from .env (data in .cdc/prometheus).
monitor: deps
	@$(PY) -m cdc monitor

# The whole pipeline on the local services under load for DEMO_SECONDS, then verified.
DEMO_SECONDS ?= 30
demo: up
	@$(PY) -m cdc demo --duration $(DEMO_SECONDS)

down: venv
	@$(PY) -m cdc down

status: venv
	@$(PY) -m cdc status

test: deps
	$(PY) -m pytest

test-unit: venv
	$(PY) -m pytest -m "not integration and not prometheus"

# CI (.ci/run) runs this before make test. The contracts of lint-imports are in pyproject.toml.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile
	$(PY) -m mypy

# mypy's settings and the files it checks are in pyproject.toml.
typecheck: venv
	$(PY) -m mypy

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean: down
	rm -rf .cdc

# Benchmarks start their own private services; results in bench-results/.
BENCH_ARGS ?=
bench: deps
	$(PY) -m bench.run $(BENCH_ARGS)

SOAK_MINUTES ?= 30
soak: deps
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

bench-producer: deps
	$(PY) bench/bench_producer.py

bench-consumer: deps
	$(PY) bench/bench_consumer.py

bench-verify: deps
	PYTHONPATH=. $(PY) bench/bench_verify.py

bench-capture: deps
	PYTHONPATH=. $(PY) bench/bench_capture.py

bench-tables: deps
	$(PY) bench/bench_tables.py
