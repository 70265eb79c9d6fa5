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
	$(VENV)/bin/lint-imports

# The Lambda zip: the handler's modules at its root (/var/task), the serving contract as the package bundle/, and
# manylinux2014 wheels for the python3.11 runtime (Amazon Linux 2, glibc 2.26; no torch), then its unzipped size,
# which AWS limits to 250 MiB (LAMBDA_LIMIT bytes). pip's cache keeps the downloads. lambda/Dockerfile copies the same.
LAMBDA_PYTHON ?= 3.11
LAMBDA_BUILD ?= build/lambda
LAMBDA_ZIP ?= build/lambda.zip
LAMBDA_LIMIT := 262144000
LAMBDA_CODE := lambda/handler.py lambda/model_store.py lambda/settings.py
LAMBDA_BUNDLE := bundle/__init__.py bundle/layout.py bundle/predictor.py

lambda-zip: $(LAMBDA_ZIP)

$(LAMBDA_ZIP): lambda/requirements.txt $(LAMBDA_CODE) $(LAMBDA_BUNDLE) | $(STAMP)
	rm -rf $(LAMBDA_BUILD) $@
	$(PY) -m pip install --quiet --no-deps --no-compile --only-binary=:all: --implementation cp \
		--python-version $(LAMBDA_PYTHON) --platform manylinux2014_x86_64 \
		--target $(LAMBDA_BUILD) -r lambda/requirements.txt
	cp $(LAMBDA_CODE) $(LAMBDA_BUILD)/
	mkdir -p $(LAMBDA_BUILD)/bundle
	cp $(LAMBDA_BUNDLE) $(LAMBDA_BUILD)/bundle/
	# Bytecode in the zip: /var/task is read-only, so without it every cold start compiles numpy's and the handler's
	# sources. unchecked-hash .pyc files hold whatever mtimes the unzip gives the sources.
	@if $(PY) -c 'import sys; sys.exit(not sys.version.startswith("$(LAMBDA_PYTHON)."))'; then \
		$(PY) -m compileall -q -j 0 --invalidation-mode unchecked-hash $(LAMBDA_BUILD); \
	else echo "no bytecode in the zip: $(PY) is not Python $(LAMBDA_PYTHON)"; fi
	mkdir -p $(dir $@)
	cd $(LAMBDA_BUILD) && zip -q -r -X $(abspath $@) .
	@$(PY) -c 'import sys, zipfile; n = sum(i.file_size for i in zipfile.ZipFile(sys.argv[1]).infolist()); \
		print(f"{sys.argv[1]}: {n / 2**20:.1f} MiB unzipped (AWS limit {int(sys.argv[2]) / 2**20:.0f} MiB)"); \
		sys.exit(n > int(sys.argv[2]))' $@ $(LAMBDA_LIMIT)

clean:
	rm -rf .store .checkpoints mlflow build dist
