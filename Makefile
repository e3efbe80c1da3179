# `make test` and (with the training issue) `make pretrain` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCHDYNAMO_DISABLE := 1
export DS_BUILD_OPS := 0
export DS_ACCELERATOR := cpu

.PHONY: test test-fast lint format install pretrain clean

install: $(STAMP)

# torch is pinned and installed first: the CPU wheel here; a looser pin would pull a CUDA build.
$(STAMP): setup.py requirements.txt requirements-eval.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -r requirements-eval.txt  # the optional lm-eval extra, so its test runs
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Lint first: a style or import error fails in seconds, not after the suite.
test: lint
	$(PY) -m pytest tests --durations=25  # the slowest 25: where the time budget goes

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrites the files: the fix for what `make lint` reports.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

# ARGS go to the trainer, e.g. make pretrain ARGS="--set train.steps=40"
pretrain: $(STAMP)
	cd $(CURDIR) && $(PY) pretrain_scripts/default_run.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
