# `make run` and `make test` work on a fresh machine: the first use creates .venv and installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/quickstart.yaml
# Local MNIST IDX files: taken from VAEDIST_MNIST_DIR, else ../shared/data/mnist when present,
# else torchvision downloads MNIST.
VAEDIST_MNIST_DIR ?= $(wildcard $(abspath ../shared/data/mnist))
export VAEDIST_MNIST_DIR
# Fashion-MNIST's likewise (configs/fashion-mnist.yaml, and the tests that run it).
VAEDIST_FASHION_MNIST_DIR ?= $(wildcard $(abspath ../shared/data/fashion-mnist))
export VAEDIST_FASHION_MNIST_DIR

.PHONY: install chromium docs run test test-unit test-integration test-minimal bench-train bench-encode gpu-bundle clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,mlflow,docs]"
	touch $(STAMP)

# Debian's Chromium for the report's browser test (tests/integration/test_report_browser.py), installed
# only where it is missing and apt-get can run (root); elsewhere, or if the install fails, that test
# skips and says why. --no-install-recommends: headless needs none of them (fonts come via fontconfig).
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium >/dev/null; } || echo "chromium could not be installed: the browser test will skip"; \
	  else \
	    echo "$(CHROMIUM) missing and apt-get unusable here (not root?): the browser test will skip"; \
	  fi; \
	fi

run: $(STAMP)  ## the whole pipeline on an embedded local Ray
	$(BIN)/vaedist run --config $(CONFIG)

# The suite's test files run TEST_WORKERS at a time (pytest-xdist, a file per worker so that module
# fixtures are built once): on 2 cores about a fifth faster than one at a time, which leaves a core
# idle while a test waits on Ray's process starts; 3 at a time was slower (781 s against 674 s, the
# same checkout). The order is tests/conftest.py's (the long files first, longest first), not
# xdist's (most tests first), which left the long single-test files last, stacked on one worker that
# then ran the last 70 s alone.
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP) chromium  ## unit and integration tiers
	$(BIN)/pytest -q $(PARALLEL)

test-unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

test-integration: $(STAMP) chromium
	$(BIN)/pytest -q -m integration $(PARALLEL)

# The main commands where only vaedist's required dependencies are installed (no extras); part of `test`.
test-minimal: $(STAMP)
	$(BIN)/pytest -q tests/integration/test_minimal_install.py

docs: $(STAMP)  ## the documentation site, strict (a broken link or reference fails), into site/
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench-train: $(STAMP)
	$(BIN)/vaedist bench train

bench-encode: $(STAMP)
	$(BIN)/vaedist bench encode

# What travels beside the code to a GPU machine without a package index (docs/guides/clusters.md, "Proving the GPU
# paths ..."): Ray's wheelhouse for its Python (PYVER, default 3.12) and MNIST's IDX files, ~61 MB.
gpu-bundle:
	../shared/offline-wheels/build.sh .whl
	mkdir -p .whl/mnist && cp $(VAEDIST_MNIST_DIR)/*-ubyte.gz .whl/mnist/
	du -sh .whl

clean:
	rm -rf outputs .pytest_cache site
