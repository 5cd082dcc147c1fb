# grant-broker developer entry points.  Each target installs what it needs
# (a virtualenv in .venv with the project in editable mode) before it runs.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test bench xen-test clean

$(STAMP): pyproject.toml setup.py $(shell find proto -name '*.proto')
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## run: start the broker on the embedded default (the emulated hypervisor)
run: $(STAMP)
	$(BIN)/grant-broker serve

## test: the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build broker/v1/*_pb2*.py broker/v1/*_pb2.pyi
