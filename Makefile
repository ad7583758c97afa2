# Two commands do all the set-up on a fresh machine with Python and pip:
#   make demo   - run the main job (installs first)
#   make test   - run the test suite (installs first)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hookscope-installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hookscope demo --out hookscope-demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check hookscope tests examples $(wildcard benchmarks)
	$(PY) -m ruff format --check hookscope tests examples $(wildcard benchmarks)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
