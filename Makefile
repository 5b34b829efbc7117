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

.PHONY: install run test test-unit test-integration bench-train bench-encode clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)  ## the whole pipeline on an embedded local Ray
	$(BIN)/vaedist run --config $(CONFIG)

test: $(STAMP)  ## unit and integration tiers
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

test-integration: $(STAMP)
	$(BIN)/pytest -q -m integration

bench-train: $(STAMP)
	$(BIN)/vaedist bench train

bench-encode: $(STAMP)
	$(BIN)/vaedist bench encode

clean:
	rm -rf outputs .pytest_cache
