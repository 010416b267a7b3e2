# Set-up for a fresh machine. torch==2.13.0 is installed first, on its own, so that no dependency can pull a
# different (multi-GB CUDA) build; everything else is installed after it and keeps it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.thinslice-installed

.PHONY: install demo test lint check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/thinslice demo --out demo_out

# The checks first (seconds), then the suite.
test: check
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# Lint, types ([tool.mypy] in pyproject.toml) and the layer contracts ([tool.importlinter]).
check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) demo_out
