# reelforge developer entry points. `make demo` and `make test` each set up the
# virtual environment first, so on a fresh clone each is one command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The install stamp is keyed on pyproject.toml: editing dependencies re-runs setup,
# anything else makes `setup` a no-op.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel: a looser spec (or letting deepspeed pull
	# it) downloads a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m infra demo

bench: setup
	set -e; for script in benchmarks/*.py; do $(BIN)/python $$script; done

clean:
	rm -rf $(VENV) demo .pytest_cache
