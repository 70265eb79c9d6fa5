# `make pipeline` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Hydra overrides for `make pipeline`, e.g. ARGS="model=minilm data.source=../shared/data/ag_news"
ARGS ?=

.PHONY: setup pipeline smoke test test-fast test-model test-slow test-promotion test-e2e test-container test-spark \
	lint lambda-zip clean

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

# A smoke run that serves (about two minutes on a 2-core CPU): the pipeline on conf/preset/smoke.yaml, with its own
# model name and a smoke gate, then the Lambda handler answers the seed's example from the mirrored bundle.
# Offline: make smoke ARGS="data.source=../shared/data/ag_news"
SEED_TEXT := Apple reported strong quarterly earnings with iPhone sales up 15%
MODEL_ROOT = $(PY) -c 'import sys; from agnews.config import compose; from agnews.promotion.mirror import model_root; \
	cfg = compose(sys.argv[1:]); print(model_root(cfg.registry, cfg.storage))'

smoke: $(STAMP)
	$(PY) -m steps.main preset=smoke $(ARGS)
	@echo "smoke run: the gate above is the smoke gate of conf/preset/smoke.yaml, not the production gate"
	MODEL_URI="$$($(MODEL_ROOT) preset=smoke $(ARGS))" $(PY) lambda/handler.py "$(SEED_TEXT)"

test: $(STAMP)
	$(PY) -m pytest

# While editing: the default suite less what trains, serves, builds the Lambda zip or calls make (the integration
# marker, see tests/conftest.py): no training, no servers. On one process per CPU, up to 4 (pytest-xdist).
test-fast: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses 4 -m "not integration and not slow and not container and not ui"

# The behavioural suite (tests/model) against a real model, as Made-With-ML runs it right after training: `make smoke`
# into build/test-model/ (a fresh store and tracking database), then tests/model on that run's @champion, judged by
# the smoke preset's gate. CI runs it. AGNEWS_DIR: the local AG News copy.
AGNEWS_DIR ?= ../shared/data/ag_news
TEST_MODEL := build/test-model
TEST_MODEL_ARGS = preset=smoke tracking.uri=sqlite:///$(abspath $(TEST_MODEL))/mlflow.db

test-model: $(STAMP)
	rm -rf $(TEST_MODEL)
	$(MAKE) --no-print-directory smoke ARGS="data.source=$(AGNEWS_DIR) storage.uri=$(abspath $(TEST_MODEL))/store \
		tracking.uri=sqlite:///$(abspath $(TEST_MODEL))/mlflow.db train.output_dir=$(abspath $(TEST_MODEL))/checkpoints"
	$(PY) -m pytest tests/model -p no:cacheprovider --champion --overrides "$(TEST_MODEL_ARGS)"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# The promotion wing against real servers, kills and races (tests marked promotion): concurrent registers and
# mirrors on SQLite and PostgreSQL, webhooks, rollouts. Its unit tests run in make test-fast too.
test-promotion: $(STAMP)
	$(PY) -m pytest -m promotion

# The README's paths, run as written in a shell of their own (tests/code/test_readme.py): minutes each.
test-e2e: $(STAMP)
	$(PY) -m pytest -m e2e

test-container: $(STAMP)
	$(PY) -m pytest -m container

# The predict step on Spark local mode (tests marked spark): needs the extra, `pip install -e '.[spark]'`, and Java.
test-spark: $(STAMP)
	$(PY) -m pytest -m spark

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile lambda/Dockerfile
	$(VENV)/bin/cfn-lint lambda/template.yaml
	# the docs site (mkdocs.yml), into build/site/: a broken link or a page missing from the nav fails (not --quiet,
	# which hides the warnings that --strict counts)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The Lambda zip: the handler's modules at its root (/var/task), the serving contract as the package bundle/, and
# wheels for the python3.13 runtime (Amazon Linux 2023, glibc 2.34: manylinux tags up to 2_34; no torch), then its
# unzipped size, which AWS limits to 250 MiB (LAMBDA_LIMIT bytes). pip's cache keeps the downloads.
# lambda/Dockerfile copies the same. Keep LAMBDA_PYTHON equal to the template's Runtime and the Dockerfile's image.
LAMBDA_PYTHON ?= 3.13
LAMBDA_GLIBC_MINOR := 34
LAMBDA_PLATFORMS := --platform manylinux2014_x86_64 \
	$(foreach minor,$(shell seq 17 $(LAMBDA_GLIBC_MINOR)),--platform manylinux_2_$(minor)_x86_64)
# An interpreter of the runtime's Python, for the zip's bytecode and for running the unpacked zip (the tests and the
# benchmark): python$(LAMBDA_PYTHON) on PATH where it runs, else pyenv's. `make -s lambda-python` prints it.
LAMBDA_PY ?= $(shell for p in python$(LAMBDA_PYTHON) \
	$(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/$(LAMBDA_PYTHON).*/bin/python$(LAMBDA_PYTHON)); \
	do "$$p" -c '' 2>/dev/null && command -v "$$p" && break; done)
LAMBDA_BUILD ?= build/lambda
LAMBDA_ZIP ?= build/lambda.zip
LAMBDA_LIMIT := 262144000
LAMBDA_CODE := lambda/handler.py lambda/events.py lambda/model_store.py lambda/settings.py
LAMBDA_BUNDLE := bundle/__init__.py bundle/capture.py bundle/layout.py bundle/predictor.py
# What the wheels carry but the handler never imports or loads, left out of the zip (with every type stub; the tests
# run the unpacked zip): onnxruntime's C API library (its Python module has the runtime linked in) and its model
# tools, numpy's tests, f2py and PyInstaller hook.
LAMBDA_UNUSED := onnxruntime/capi/libonnxruntime.so.* onnxruntime/transformers onnxruntime/quantization \
	onnxruntime/tools onnxruntime/datasets onnxruntime/backend numpy/tests numpy/*/tests numpy/f2py numpy/_pyinstaller

.PHONY: lambda-python
lambda-python:
	@echo $(LAMBDA_PY)

lambda-zip: $(LAMBDA_ZIP)

$(LAMBDA_ZIP): lambda/requirements.txt $(LAMBDA_CODE) $(LAMBDA_BUNDLE) | $(STAMP)
	rm -rf $(LAMBDA_BUILD) $@
	$(PY) -m pip install --quiet --no-deps --no-compile --only-binary=:all: --implementation cp \
		--python-version $(LAMBDA_PYTHON) $(LAMBDA_PLATFORMS) \
		--target $(LAMBDA_BUILD) -r lambda/requirements.txt
	cd $(LAMBDA_BUILD) && rm -rf $(LAMBDA_UNUSED) && find . -name '*.pyi' -delete
	cp $(LAMBDA_CODE) $(LAMBDA_BUILD)/
	mkdir -p $(LAMBDA_BUILD)/bundle
	cp $(LAMBDA_BUNDLE) $(LAMBDA_BUILD)/bundle/
	# Bytecode in the zip: /var/task is read-only, so without it every cold start compiles numpy's and the handler's
	# sources. unchecked-hash .pyc files hold whatever mtimes the unzip gives the sources.
	@py="$(LAMBDA_PY)"; if [ -n "$$py" ]; then \
		"$$py" -m compileall -q -j 0 --invalidation-mode unchecked-hash $(LAMBDA_BUILD); \
	else echo "no bytecode in the zip: no Python $(LAMBDA_PYTHON) found (set LAMBDA_PY)"; fi
	mkdir -p $(dir $@)
	cd $(LAMBDA_BUILD) && zip -q -r -X $(abspath $@) .
	@$(PY) -c 'import sys, zipfile; n = sum(i.file_size for i in zipfile.ZipFile(sys.argv[1]).infolist()); \
		print(f"{sys.argv[1]}: {n / 2**20:.1f} MiB unzipped (AWS limit {int(sys.argv[2]) / 2**20:.0f} MiB)"); \
		sys.exit(n > int(sys.argv[2]))' $@ $(LAMBDA_LIMIT)

clean:
	rm -rf .store .checkpoints mlflow build dist

# The GPU check (bench/gpu_check.sh, docs/benchmarks.md) rehearsed on this CPU: the same script and steps with a
# 2-layer 64-wide model and a few hundred rows, so that the GPU run cannot fail on an import, an override or the
# report. The report goes to $(GPU_REHEARSAL)/gpu.json (a few minutes on a 2-core CPU).
GPU_REHEARSAL ?= build/gpu-rehearsal
.PHONY: gpu-check-rehearsal
gpu-check-rehearsal: $(STAMP)
	PY=$(abspath $(PY)) WORK=$(abspath $(GPU_REHEARSAL))/work RESULT=$(abspath $(GPU_REHEARSAL))/gpu.json \
		BUDGET=1200 SAMPLE=200 TEST_ROWS=100 DIMS=64,128,2,2 LR=1e-3 FULL_SAMPLE=300 EPOCHS=1 \
		EXTRA="data.val_size=100" bash bench/gpu_check.sh

# The browser suite: headless Chromium (Debian's chromium and chromium-driver) moves @champion in the MLflow UI, and
# the Lambda follows through the webhook receiver. UPDATE_SCREENSHOT=1 also refreshes docs/promote-champion.png.
.PHONY: test-ui
test-ui: $(STAMP)
	$(PY) -m pytest -m ui tests/code/test_ui.py
