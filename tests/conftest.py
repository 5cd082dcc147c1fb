"""Fixtures shared by the whole suite."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from grant_broker_protocol.fds import open_fd_count


@pytest.fixture
def fd_baseline() -> Iterator[None]:
    """Fail the test if it leaves descriptors open in this process."""
    gc.collect()
    before = open_fd_count()
    yield
    gc.collect()
    after = open_fd_count()
    assert after == before, f"descriptors leaked: {before} open before the test, {after} after ({sorted(os.listdir('/proc/self/fd'))})"
