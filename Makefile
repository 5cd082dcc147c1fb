# grant-broker developer entry points.  Each target installs what it needs
# (a virtualenv in .venv with the project in editable mode) before it runs.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test bench bench-xen xen-test xen-pvh-export deploy-tools clean

$(STAMP): pyproject.toml setup.py client/grant_broker_protocol_build.py $(shell find proto -name '*.proto')
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## run: start the broker on the embedded default (the emulated hypervisor)
run: $(STAMP)
	$(BIN)/grant-broker serve

## test: the whole test suite: the normal suite, then the real-Xen suite (xen-test)
test: $(STAMP) deploy-tools
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

## bench-xen: on a real Xen 4.17 (dom0, under QEMU): the broker (fast path, gRPC)
## against the same operations done in-process; ratios printed (bench/xen_inprocess.py)
bench-xen: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 broker client bench >/dev/null
	tests/xen/run-in-dom0 --timeout 900 -- $(abspath $(BIN)/python) -m bench.xen_inprocess $(BENCH_ARGS)

## xen-pvh-export: gntdev dma-buf export in a PVH guest of a real Xen (HVM+HAP under QEMU),
## which a PV dom0 refuses; not in CI (tests/xen/pvh-export, a few minutes)
xen-pvh-export: $(STAMP)
	XEN_SUITE_PYTHON=$(abspath $(BIN)/python) tests/xen/pvh-export

# The programs tests/deploy checks the deploy files with and builds and runs the
# container image with, from Debian's packages (hadolint and kubernetes-validate
# come from PyPI with the test extra): program:package.
DEPLOY_TOOLS = systemd-analyze:systemd systemd-sysusers:systemd buildah:buildah podman:podman \
	debootstrap:debootstrap runc:runc strace:strace

## deploy-tools: install what tests/deploy needs from Debian (as root; tells what is missing otherwise)
deploy-tools:
	@missing="$$(export PATH="$$PATH:/usr/sbin:/sbin"; \
		for pair in $(DEPLOY_TOOLS); do command -v $${pair%%:*} >/dev/null || echo $${pair##*:}; done | sort -u)"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "deploy-tools: missing $$missing: apt-get install them as root" >&2; exit 0; fi; \
	echo "deploy-tools: installing" $$missing >&2; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

clean:
	rm -rf $(VENV) build dist client/build client/dist client/grant_broker_protocol/v1/*_pb2*.py*
	rm -f broker/grant_broker/deviceplugin/v1beta1/*_pb2*.py*
