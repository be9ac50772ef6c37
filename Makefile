# Two entry points for a newcomer: `make demo` (the embedded end-to-end job) and `make test`.
# Both create .venv and install what they need first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch and torchvision for laptops and CI, pinned together: torchvision (pytorch-fid's FID Inception,
# the data-feedback critic's ResNet-18) only loads beside the torch it was built for. These builds
# run on the CPU; GPU cluster images bring their own pair.
TORCH   ?= torch==2.14.1 torchvision==0.29.1

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/minit2i demo

# TEST_WORKERS=N runs the suite on N pytest-xdist workers (each its own session: tests/conftest.py),
# the slowest groups of tests first; 0 runs it in one process. Two on the 2-core box: the tests spend
# much of their time waiting on process starts, polls and outages, and a second worker fills those
# waits (2026-12-03, same tree one run after the other: 17 min 22 s against 23 min 8 s in one process;
# BENCHMARKS.md, "Test-suite cost").
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25

bench: install
	$(BIN)/minit2i bench all

.PHONY: install demo test bench
