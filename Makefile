# Two entry points for a newcomer: `make demo` (the embedded end-to-end job) and `make test`.
# Both create .venv and install what they need first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch for laptops and CI; GPU cluster images bring their own torch.
TORCH   ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/minit2i demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/minit2i bench all

.PHONY: install demo test bench
