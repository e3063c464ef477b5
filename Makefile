# fastsample: make sample | make test | make bench | make results   (each sets up .venv itself; the same as
# .venv/bin/fastsample sample | bench | results, the package's console script)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3

.PHONY: install sample test test-all bench results docs diffusers-suite

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[eval,test,docs]'
	# k-diffusion's sampling module, the anchor of fastsample.k_diffusion's tests: its package pulls in training
	# extras (wandb, clip, clean-fid), so the package alone, and torchdiffeq, which its sampling module imports
	$(PIP) install -q --no-deps k-diffusion==0.1.1.post1
	$(PIP) install -q torchdiffeq
	touch $@

install: $(VENV)/.installed

sample: install
	$(VENV)/bin/fastsample sample

test: install
	$(PY) -m pytest -q

test-all: install  ## the slow tests too
	$(PY) -m pytest -q -m ""

bench: install
	$(VENV)/bin/fastsample bench

results: install  ## every committed fmnist-large table (hours on a CPU; resumable: a rerun skips finished cells)
	$(VENV)/bin/fastsample results --threads $${THREADS:-1}

docs: install  ## the documentation site (mkdocs, material, mkdocstrings) -> site/
	$(VENV)/bin/mkdocs build --strict

diffusers-suite: install  ## diffusers' own scheduler tests against ours: needs DIFFUSERS_SRC=<diffusers checkout>
	$(PY) scripts/run_diffusers_scheduler_tests.py
