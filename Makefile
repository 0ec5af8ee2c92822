# Set-up and the two everyday commands. Both build (or refresh) the same .venv first.
#   make demo   -> fingerprint the Hubble Deep Field and run every later stage
#   make test   -> the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp is rebuilt when pyproject.toml changes, so `make` refreshes a stale environment.
STAMP  := $(VENV)/.elodin-installed

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the exact CPU build (see pyproject's `export` extra).
	$(BIN)/python -m pip install --quiet -e ".[export,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/elodin demo -o elodin-demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) elodin-demo .pytest_cache
