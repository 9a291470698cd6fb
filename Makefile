# Quick start: `make train` (the digits demo) and `make test` (the whole suite). Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fastmcl-installed
# torch==2.13.0 resolves to the CPU build from local disk on our dev/CI machines and to the CUDA build from PyPI on
# a GPU box; installing it before the package keeps pip from ever pulling a CUDA build by accident.
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.8.0
# NVIDIA DALI (--dali; tests/test_dali.py): ~200 MB from PyPI, imports without a GPU driver. `make DALI_SPEC= install`
# skips it (the DALI tests then skip).
DALI_SPEC   ?= nvidia-dali-cuda130==2.4.0
PYTEST      := $(BIN)/python -m pytest

.PHONY: install train test test-fast test-interpreter bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q $(TRITON_SPEC)
	test -z "$(DALI_SPEC)" || $(BIN)/python -c "import nvidia.dali" 2>/dev/null || $(BIN)/python -m pip install -q $(DALI_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

train: $(STAMP)
	$(BIN)/python -m fastmcl.train

# Two pytest processes, side by side (each mostly keeps one core busy): the Triton interpreter leaves a process slow
# for torch CPU ops (docs/losses.md "Backends and numerics"). The interpreter pass's report follows the main one.
# Exit code 5 ("no tests collected") is not a failure for a marker selection that is still empty.
INTERPRETER_LOG := $(VENV)/interpreter-tests.log
test: $(STAMP)
	@TRITON_INTERPRET=1 $(PYTEST) -q -m interpreter tests > $(INTERPRETER_LOG) 2>&1 & pid=$$!; \
	echo "$(PYTEST) -q -m \"not interpreter\" tests   (TRITON_INTERPRET=1 ... -m interpreter: beside it)"; \
	$(PYTEST) -q -m "not interpreter" tests; rc=$$?; \
	wait $$pid; irc=$$?; echo "== TRITON_INTERPRET=1 $(PYTEST) -q -m interpreter tests"; cat $(INTERPRETER_LOG); \
	for c in $$rc $$irc; do [ $$c -eq 0 ] || [ $$c -eq 5 ] || exit $$c; done

# All benchmarks (minutes to an hour on a CPU), or one: make bench BENCH=benchmarks/bench_throughput.py
BENCH ?= benchmarks
bench: $(STAMP)
	$(PYTEST) $(BENCH) --benchmark-json=benchmarks/results.json -s

# On a machine with one NVIDIA GPU (within 8 minutes): GPU tests, kernels natively vs reference, kernel and throughput
# benchmarks; one report in benchmarks/results/gpu_check.md. Without a GPU it says why and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
