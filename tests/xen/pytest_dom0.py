"""A pytest plugin for the in-dom0 run of ``tests/xen/ci-suite`` (``-p pytest_dom0``).

Under QEMU's software emulation a full ``gc.collect()`` over a heap holding
grpc, protobuf and the whole suite takes about a second, and the suite's
``fd_baseline`` fixture collects twice per test.  Everything alive once the
tests are collected (modules, classes, fixtures' definitions) lives until
the end anyway: ``gc.freeze()`` moves it out of the collector's sight, so the
per-test collections only walk what the test itself created.
"""

from __future__ import annotations

import gc

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    gc.collect()
    gc.freeze()
