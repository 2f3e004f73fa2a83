# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test lint typecheck unit bench lock clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c requirements.lock -e '.[test]'
	touch $@

## The main job on the embedded default: throwaway PostgreSQL + local S3, plan, apply, status.
demo: $(VENV)/.installed
	$(BIN)/fanout demo

## Lint, type-check and the whole test suite (starts its own PostgreSQL and S3).
test: lint typecheck unit

lint: $(VENV)/.installed
	$(BIN)/ruff check fanout tests bench
	$(BIN)/ruff format --check fanout tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Re-pin the dependency set after changing pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install $(PIP_FLAGS) -e '.[test]'
	{ head -2 requirements.lock; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^fanout'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The benchmark table (issue targets); minutes, not part of `make test` (a smoke run is).
bench: $(VENV)/.installed
	$(BIN)/python bench/fleet.py
