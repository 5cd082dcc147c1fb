"""Run a coroutine at once, up to its first wait; a task only for the rest.

Python 3.12's eager task factory, for this one use on 3.11: a fast-path call
whose operation never waits (a map, an unmap, a copy-ring doorbell) is
served, and answered, straight from the reader callback that received it —
no task, no turn of the event loop in between (``bench.frames``: 23 µs of a
round trip).  A call that does wait goes on in a task exactly where it
stopped, the future it waits for handed to that task.

The first step runs in a copy of the current context, and the task, if any,
continues in that same copy: a context variable set before the first wait
(``Session.call_in_flight``) is still the coroutine's own after it.  The
first step runs in the caller's task — none in a reader callback — so code
that needs a task of its own (``asyncio.timeout``) must not run before the
coroutine's first wait.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start_eagerly(coro: Coroutine[Any, Any, T]) -> "asyncio.Task[T] | None":
    """Run *coro* now until it first waits.  ``None`` when it finished then
    (its result, and any exception, are its own to handle: an exception
    escaping it is logged by the loop's exception handler as a task's would
    be); else the task that runs the rest."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    try:
        waited = context.run(coro.send, None)
    except StopIteration:
        return None
    except BaseException as exc:  # noqa: BLE001 - reported as an unretrieved task exception would be
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        loop.call_exception_handler({"message": "Exception in an eagerly started coroutine", "exception": exc})
        return None
    return loop.create_task(_resume(_Started(coro, waited)), context=context)


async def _resume(started: "_Started[T]") -> T:
    return await started


class _Started(Generator[Any, Any, T]):
    """A coroutine past its first step, as an awaitable that drives the rest:
    what it waits for goes to the awaiting task, what the task sends or throws
    (a result, a cancellation) goes back into it."""

    __slots__ = ("_coro", "_waited")

    def __init__(self, coro: Coroutine[Any, Any, T], waited: Any) -> None:
        self._coro = coro
        self._waited = waited

    def __await__(self) -> Generator[Any, Any, T]:
        return self

    def __iter__(self) -> Generator[Any, Any, T]:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        waited, self._waited = self._waited, _NOTHING
        if waited is not _NOTHING:
            return waited  # the first step's wait, handed to the task on its first step
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._waited = _NOTHING
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()


_NOTHING: Any = object()
