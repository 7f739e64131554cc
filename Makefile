# The README's two commands: `make demo` (install, then train the default model on real data)
# and `make test` (install, then run the test suite). Both work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(if $(wildcard ../shared/data),../shared/data,)
# the weights search path of a checkout: the project's trained weights, then the authors' LruNet release
WEIGHTS ?= $(abspath weights)$(if $(wildcard ../shared/reference/weights),:$(abspath ../shared/reference/weights),)
ENV = DACNN_DATA=$${DACNN_DATA:-$(DATA)} DACNN_WEIGHTS=$${DACNN_WEIGHTS:-$(WEIGHTS)}

.PHONY: install demo test lint bench gpu-rehearse clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build on local disk, so that pip never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(ENV) $(BIN)/dacnn train --recipe demo

test: install
	$(ENV) $(BIN)/ruff check .
	$(ENV) $(BIN)/python -m pytest -q --durations=15

bench: install
	$(ENV) $(BIN)/python benchmarks/run_all.py

# What a lent GPU machine runs (scripts/gpu-campaign), rehearsed on the CPU at smoke scale; `make test`
# runs it too (tests/test_gpu_campaign.py).
gpu-rehearse: install
	$(ENV) $(BIN)/python scripts/gpu-campaign --rehearse --out runs/gpu-rehearse

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
