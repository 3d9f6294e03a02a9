# Quick start: `make demo` then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all
export PATH := $(BIN):$(PATH)

.PHONY: demo test install dryrun lint docs clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, alone: the pinned CPU wheel; any other spec pulls CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) all

dryrun: $(STAMP)
	$(BIN)/snakemake -n all

# ruff (lint, format), snakefmt, mypy on the package, the layer order (import-linter's
# contracts in pyproject.toml), Snakemake's own linter
lint: $(STAMP)
	$(BIN)/ruff check medtx tests bench
	$(BIN)/ruff format --check medtx tests bench
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/snakemake --lint

# one worker per core (pytest-xdist); a module's tests stay on one worker, so the
# integration module's one workflow run overlaps the unit tests on the other core
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadscope tests

# the documentation site (site/): the generated pages (configuration reference,
# benchmark pages from bench/results/*.json), then mkdocs, where a broken link fails
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -c 'import mkdocs, material' 2>/dev/null || $(BIN)/pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean-demo:
	rm -rf results logs .snakemake
