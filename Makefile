# pfjet-ssd developer entry points. Every target installs what it needs into .venv by itself.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVICE_STAMP := $(VENV)/.installed-service
# Extras installed for development and tests: the GPL generator stack (generator tests) and torch (model,
# training and export tests; the CPU wheel 2.13.0 is on the project machines).
EXTRAS ?= dev,datagen,train,inference,dsp

.PHONY: install test lint unit run bench clean help

help:  ## List the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml service/pyproject.toml client/pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "pfjet-ssd needs Python 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" -e ./service -e "./client[dask,parquet]"
	touch $(STAMP) $(SERVICE_STAMP)

# What `make run` needs: the core and the service (no torch, no generator); `make install` is a superset.
$(SERVICE_STAMP): pyproject.toml service/pyproject.toml client/pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "pfjet-ssd needs Python 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[inference,dsp]" -e ./service -e ./client
	touch $(SERVICE_STAMP)

install: $(STAMP)  ## Create .venv and install jetssd with the dev, datagen and train extras

lint: $(STAMP)  ## ruff + mypy
	$(VENV)/bin/ruff check jetssd service client tests benchmarks
	$(VENV)/bin/mypy

unit: $(STAMP)  ## pytest only
	$(PY) -m pytest

test: lint unit  ## Everything CI runs: lint, type checks and the test suite

run: $(SERVICE_STAMP)  ## Start Triton + the gateway on the shipped models (Ctrl-C stops both)
	$(VENV)/bin/jetssd-service serve

bench: $(STAMP)  ## Benchmarks (rasterizer, post-processing, generator, model in ORT, gateway + Triton), same-run baselines
	$(PY) benchmarks/bench_rasterize.py
	$(PY) benchmarks/bench_postprocess.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_gateway.py
	$(PY) benchmarks/bench_triton.py
	$(PY) benchmarks/bench_reprocess.py
	$(PY) benchmarks/bench_deploy.py

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
