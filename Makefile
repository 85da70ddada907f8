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

# infra/image/install.sh is the one install recipe (the container image runs it too): the
# venv, torch first at pyproject's pin, then the project in editable mode with its test tools.
$(STAMP): pyproject.toml
	PYTHON=$(PYTHON) bash infra/image/install.sh --venv $(VENV) --dev
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
