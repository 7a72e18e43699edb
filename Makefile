# The two newcomer commands: `make run` (install + the default job) and `make test` (install + the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup setup-dev run test test-fast lint bench-sweep

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh dev

run: setup
	$(PY) -m kvbench $(ARGS)

test: setup-dev
	$(PY) -m pytest -q --durations=10

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench-sweep:
	$(PY) scripts/bench_sweep.py
