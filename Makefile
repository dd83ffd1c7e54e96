# One command each. `make run` does all set-up and runs the server; `make test` runs the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast lint format bench image clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

setup: $(VENV)/.installed

run:
	bash scripts/up.sh

test: setup
	bash scripts/test.sh

test-fast: setup
	$(PY) -m pytest -q -m "not docker and not slow"

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	cd src/crogia/sandbox/daemon && $(abspath $(VENV))/bin/mypy --strict --explicit-package-bases --config-file "" *.py

format: setup
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: setup
	$(PY) bench/run_all.py

image: setup
	$(VENV)/bin/crogia image build

clean:
	rm -rf crogia-data .pytest_cache .mypy_cache .ruff_cache
