# `make pipeline` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Hydra overrides for `make pipeline`, e.g. ARGS="model=minilm data.source=../shared/data/ag_news"
ARGS ?=

.PHONY: setup pipeline test test-slow test-container lint bench lambda-zip clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing pulls a CUDA build in its place
	$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

pipeline: $(STAMP)
	$(PY) -m steps.main $(ARGS)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-container: $(STAMP)
	$(PY) -m pytest -m container

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf .store .checkpoints mlflow build dist
