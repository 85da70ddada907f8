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

# Two pytest workers (pytest-xdist), each taking whole test files (`--dist loadfile`, so a module's
# Ray head, MLflow server or Airflow home starts once): most end-to-end tests leave a core idle at
# times (process starts, polls, servers), and on CI's 2 cores this takes the suite from about
# 26.5 to 23.5 minutes. PYTEST_WORKERS=0 runs it in this process, one test at a time.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

demo: setup
	$(BIN)/python -m infra demo

bench: setup
	set -e; for script in benchmarks/*.py; do $(BIN)/python $$script; done

clean:
	rm -rf $(VENV) demo .pytest_cache
