# One entry point for humans and CI. `make test` is the README's test command.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint proto proto-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m proxy_common.demo

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check

RUFF_PATHS := proxy_common proxy_server proxy_agent tests scripts bench

lint: $(STAMP)
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(VENV)/bin/lint-imports

# CI runs `make test`, so lint is enforced here too.
test: $(STAMP)
	$(PY) scripts/gen_proto.py --check
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

check: lint test

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
