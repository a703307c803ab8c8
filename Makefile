# The README's commands. `make setup` is shared and idempotent: it creates .venv,
# installs torch (the CPU wheel on CPU machines; a GPU machine's own torch is reused
# through --system-site-packages), builds plait._C and installs plait in editable mode.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0
DEPS_STAMP := $(VENV)/.plait-deps
BUILD_STAMP := $(VENV)/.plait-built
CSRC := $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?= -m "not slow" --durations=40

.PHONY: setup demo test test-parallel test-faults bench cuda-check clean

setup: $(BUILD_STAMP)

$(BIN)/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "setup: reusing the interpreter's torch ($$($(PYTHON) -c 'import torch; print(torch.__version__)'))"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(DEPS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check "scikit-build-core>=0.10" ninja
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) CMakeLists.txt pyproject.toml $(CSRC)
	$(BIN)/pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
	touch $@

demo: setup
	$(BIN)/plait train --config configs/demo.yaml --nproc 4

# The rehearsal tests build network namespaces with iproute2's ip and tc (as root; they skip otherwise).
test: setup
	@command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq iproute2) || \
	    echo "test: iproute2 (ip, tc) is missing; the rehearsal tests need it and root"; }
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The whole parallel parity matrix: every layout, dense and MoE, 2/4/8 ranks (fast subset included).
test-parallel: setup
	$(BIN)/pytest -q -m "slow or not slow" tests/test_parallel_parity.py

# 100 seeded random fault trials (every kind, two faults apart or at once, a fault during restore) against
# real processes, each listed with where it restored from; make test runs one.
test-faults: setup
	$(BIN)/pytest -q -m "slow or not slow" tests/test_snapshot_faults.py

bench: setup
	$(BIN)/plait bench overhead
	$(BIN)/plait bench gf256
	$(BIN)/plait bench ec
	$(BIN)/plait bench snapshot

cuda-check: setup
	$(BIN)/pytest -q tests/test_cuda_compile.py

clean:
	rm -rf build $(VENV)
