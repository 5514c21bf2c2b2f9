# `make demo` and `make test` work on a fresh clone with only Python 3.11+ and make.
# The first interpreter on PATH that runs and is 3.11+ (a pyenv shim may exist and not run).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; \
	done)
VENV := .venv
BIN := $(VENV)/bin
# The demo needs the package alone; tests, lint, docs and benchmarks need the dev and docs
# extras too.
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup dev demo test lint docs bench clean down

$(VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "fanout needs Python 3.11+ on PATH"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $(STAMP)

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	@touch $(STAMP) $(DEV_STAMP)

setup: $(STAMP)

dev: $(DEV_STAMP)

demo: setup
	$(BIN)/fanout demo $(ARGS)

lint: dev
	$(BIN)/ruff check .
	$(BIN)/mypy workers producers demo_vendor

# Two test processes (pytest-xdist), a file to each at a time: each starts its own Redis and demo
# vendor (tests/conftest.py), and most of a test's time is spent waiting on real processes.
PYTEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The docs site into site/, strict: a broken reference or link fails it (tests/test_docs.py
# builds it too, in make test). Material's banner about MkDocs 2 is not a warning of ours.
docs: dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: dev
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks $(ARGS)

down: setup
	$(BIN)/fanout down

clean:
	-$(BIN)/fanout down
	rm -rf $(VENV) .fanout .pytest_cache .mypy_cache .ruff_cache site
