# `make demo` and `make test` work on a fresh clone with only Python 3.11+ and make.
# The first interpreter on PATH that runs and is 3.11+ (a pyenv shim may exist and not run).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; \
	done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: setup demo test lint bench clean down

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "fanout needs Python 3.11+ on PATH"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fanout demo $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy workers producers demo_vendor

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks $(ARGS)

down: setup
	$(BIN)/fanout down

clean:
	-$(BIN)/fanout down
	rm -rf $(VENV) .fanout .pytest_cache .mypy_cache .ruff_cache
