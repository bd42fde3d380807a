# The two commands a new user needs: `make demo` and `make test`. Both run the idempotent setup first.
VENV := .venv
PY := $(VENV)/bin/python
HPCLLM := $(VENV)/bin/hpcllm
NP ?= 2

.PHONY: setup demo test lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m hpcllm.launcher -np $(NP) $(HPCLLM) info
	@$(PY) -m hpcllm.launcher -np $(NP) $(HPCLLM) train

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check hpcllm tests && $(VENV)/bin/ruff format --check hpcllm tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
