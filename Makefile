# The two commands a new user needs: `make demo` and `make test`. Both run the idempotent setup first.
VENV := .venv
PY := $(VENV)/bin/python
HPCLLM := $(VENV)/bin/hpcllm
NP ?= 2

.PHONY: setup demo test lint clean gpu-check

setup:
	@bash scripts/setup.sh

# The main job on the built-in default: data-parallel training of the tiny GPT on Python's standard
# library (prepared on first use), then a sample from the trained model.
DEMO_RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)

demo: setup
	@$(PY) -m hpcllm.launcher -np $(NP) $(HPCLLM) info
	@$(PY) -m hpcllm.launcher -np $(NP) $(HPCLLM) train --out $(DEMO_RUN)
	@echo "---- a sample from $(DEMO_RUN) ----"
	@$(HPCLLM) generate --run $(DEMO_RUN) --prompt "def " --max-new-tokens 120

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

# On a GPU node: the CUDA build, the GPU tests, gpt2-124m MFU in bf16 and NCCL allreduce, in one
# JSON report (gpu-check.json). Uses .venv when there is one, else the python3 on PATH with torch.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@$(GPU_PY) scripts/gpu_check.py --out gpu-check.json

lint: setup
	@$(VENV)/bin/ruff check hpcllm tests && $(VENV)/bin/ruff format --check hpcllm tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
