# The book's two commands: `make book` (set up, execute every chapter, build the HTML) and
# `make test` (set up, lint, run the tests). Everything installs into .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
CH ?= ch1
PARAMS ?=

# The local data mirror and the fine-tuned teachers live beside the checkout, in ../shared.
SHARED ?= $(abspath ../shared)
export KDLIB_DATA_DIR ?= $(if $(wildcard $(SHARED)/data),$(SHARED)/data,)
export KDLIB_MODELS_DIR ?= $(if $(wildcard $(SHARED)/models),$(SHARED)/models,)

# the package names installed with --no-deps (the book's and the benchmark's), as an alternation
# for grep: pip check reports their declared dependencies as missing, by design
NODEPS := $(shell sed -e 's/[=<>].*//' -e '/^\#/d' -e '/^$$/d' requirements-nodeps.txt requirements-bench.txt | paste -s -d '|')

.PHONY: setup book test test-fast chapter reference params teacher notebooks bench clean

setup: $(VENV)/.installed

# torch 2.13.0 first: a CPU build, which requirements.txt's range admits, so pip keeps it; the
# rest at the versions the records were made with (constraints.txt).
$(VENV)/.installed: requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	@# pip check, except for the --no-deps packages, whose declared dependencies are left out on purpose
	! $(PY) -m pip check | grep -v -i -E '^(($(NODEPS)) |No broken requirements)' | grep .
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

book: setup
	$(PY) -m bookrun build --profile $(PROFILE)

# two test processes (pytest-xdist): one builds the smoke book (the longest chain) while the
# other takes the rest; every process computes on one thread (tests/conftest.py). TEST_WORKERS=0
# runs them in this one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

test: setup
	$(VENV)/bin/ruff check kdlib bookrun bench tests book/experiments
	$(PYTEST)

# the unit tests alone (tiny models built from configs; no smoke book, no pretrained model), for
# a contributor's edit-test loop
test-fast: setup
	$(VENV)/bin/ruff check kdlib bookrun bench tests book/experiments
	$(PYTEST) -m "not slow"

chapter: setup
	$(PY) -m bookrun run $(CH) --profile $(PROFILE) $(PARAMS)

# the chapter at its reference profile (up to ~100 minutes on 2 cores), replacing its committed
# record in book/records/$(CH); run it on a clean checkout and commit the record
reference: setup
	$(PY) -m bookrun reference $(CH)

params: setup
	$(PY) -m bookrun params $(CH)

teacher: setup
	$(PY) -m experiments.ch1_teacher

notebooks: setup
	$(PY) -m bookrun notebooks --profile $(PROFILE) --out _build/notebooks

# distillation's cost against its limit, as ratios (QA, the student's own step, causal LM; ~12 minutes on 2 cores)
bench: setup
	$(PY) -m pip install --quiet --no-deps -r requirements-bench.txt
	mkdir -p _build
	$(PY) -m bench --json _build/bench.json

clean:
	rm -rf _build
