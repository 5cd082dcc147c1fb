"""Fixtures of the end-to-end tests in dom0 (tests/xen/test_*_e2e.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from dom0_helpers import Broker, Child, running_broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """``grant-broker serve --backend xen``, one for the whole run (it is slow to start here)."""
    if not os.path.exists("/dev/xen/gntdev"):
        pytest.skip("needs a real Xen (dom0): no /dev/xen/gntdev here")
    with running_broker() as running:
        yield running


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    """Client processes a test starts; killed and reaped afterwards."""
    started: list[Child] = []
    yield started
    for child in started:
        if child.process.returncode is None:
            child.process.kill()
        await child.process.wait()
