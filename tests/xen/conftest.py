"""Fixtures of the end-to-end tests in dom0 (tests/xen/test_*_e2e.py)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from dom0_helpers import GUEST_READY_TIMEOUT, Broker, Child, GuestInfo, running_broker


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


@pytest.fixture(scope="session")
def guest_info() -> GuestInfo:
    """The guest ``tests/xen/guest/start-in-dom0`` started (waits for it)."""
    state = os.environ.get("XEN_GUEST_STATE")
    required = os.environ.get("GRANT_BROKER_TEST_REQUIRE_GUEST") == "1"
    if not state:
        pytest.skip("no guest was started (run through tests/xen/ci-suite)")
    deadline = time.monotonic() + GUEST_READY_TIMEOUT
    ready, failed = os.path.join(state, "ready"), os.path.join(state, "failed")
    while not os.path.exists(ready):
        why = None
        if os.path.exists(failed):
            with open(failed) as source:
                why = source.read().strip()
        elif time.monotonic() > deadline:
            why = f"no guest within {GUEST_READY_TIMEOUT} s"
        if why is not None:
            detail = ""
            with contextlib.suppress(OSError), open(os.path.join(state, "start.log")) as log:
                detail = log.read()[-3000:]
            (pytest.fail if required else pytest.skip)(f"the guest did not come up: {why}\n{detail}")
        time.sleep(0.5)
    with open(ready) as source:
        domid, control_ref = (int(word) for word in source.read().split())
    return GuestInfo(domid, control_ref)
