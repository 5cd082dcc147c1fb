# grant-broker developer entry points.  Each target installs what it needs
# (a virtualenv in .venv with the project in editable mode) before it runs.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test bench xen-test clean

$(STAMP): pyproject.toml setup.py client/grant_broker_protocol_build.py $(shell find proto -name '*.proto')
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## run: start the broker on the embedded default (the emulated hypervisor)
run: $(STAMP)
	$(BIN)/grant-broker serve

## test: the whole test suite: the normal suite, then the real-Xen suite (xen-test)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory xen-test

## xen-test: the conformance suite, the Xen unit tests and an end-to-end broker
## run in dom0 of a real Xen 4.17 booted under QEMU (tests/xen/ci-suite; a few
## minutes).  Where Xen cannot be booted it fails with CI set, else it skips.
xen-test: $(STAMP)
	XEN_SUITE_PYTHON=$(abspath $(BIN)/python) tests/xen/ci-suite

## bench: the broker against its floors, ~2 min (BENCH_ARGS=--quick: ~15 s; see README, "Performance")
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist client/build client/dist client/grant_broker_protocol/v1/*_pb2*.py*
