# The two commands of the README. Each sets up what is missing (Debian packages for headless Qt,
# the .venv with pinned dependencies), then runs.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genemap-installed

.PHONY: demo test lint napari system

$(STAMP): pyproject.toml requirements/constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

system:
	bash scripts/system_packages.sh

demo: system $(STAMP)
	$(BIN)/genemap demo --out demo_output

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks scripts
	$(BIN)/ruff format --check src tests examples benchmarks scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

test: system lint
	$(BIN)/python -m pytest

napari: system $(STAMP)
	$(BIN)/python examples/open_sample_in_napari.py
