"""Waiting in tests for what the broker does on its own time.

A session's end, a revocation, a frame read: the broker does them when its
loop gets to them, later under load than on a quiet machine.  A test waits
for the state it expects, with a deadline far above any quiet run, instead of
sleeping a fixed time and hoping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest


async def eventually(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Return once *condition* (a plain or async callable) is true; fail the
    test naming *what* did not happen after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"never happened within {timeout} s: {what}")
        await asyncio.sleep(0.01)
