"""start_eagerly: a coroutine run at once up to its first wait, a task for the rest."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from grant_broker.transport.eager import start_eagerly

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("eager_test", default="unset")


async def test_a_coroutine_that_never_waits_finishes_before_start_eagerly_returns() -> None:
    done: list[str] = []

    async def work() -> None:
        done.append("ran")

    assert start_eagerly(work()) is None
    assert done == ["ran"]


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_its_result() -> None:
    steps: list[str] = []
    gate = asyncio.get_running_loop().create_future()

    async def work() -> int:
        steps.append("before")
        value = await gate
        steps.append("after")
        return value + 1

    task = start_eagerly(work())
    assert task is not None
    assert steps == ["before"]  # the first step ran now, synchronously
    gate.set_result(41)
    assert await task == 42
    assert steps == ["before", "after"]


async def test_every_wait_after_the_first_is_driven_by_the_task() -> None:
    async def work() -> list[int]:
        seen = []
        for value in range(3):
            await asyncio.sleep(0)
            seen.append(value)
        return seen

    task = start_eagerly(work())
    assert task is not None
    assert await task == [0, 1, 2]


async def test_a_context_variable_set_before_the_first_wait_is_the_coroutines_own_after_it() -> None:
    gate = asyncio.get_running_loop().create_future()

    async def work() -> str:
        token = _VAR.set("mine")
        await gate
        seen = _VAR.get()
        _VAR.reset(token)  # fails if the task ran in another context than the first step
        return seen

    task = start_eagerly(work())
    assert task is not None
    assert _VAR.get() == "unset"  # the caller's context is untouched
    gate.set_result(None)
    assert await task == "mine"


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    cleaned: list[str] = []

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally")

    task = start_eagerly(work())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"]


async def test_an_exception_after_the_first_wait_is_the_tasks() -> None:
    async def work() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    task = start_eagerly(work())
    assert task is not None
    with pytest.raises(ValueError, match="late"):
        await task


async def test_an_exception_in_the_first_step_goes_to_the_loops_exception_handler() -> None:
    loop = asyncio.get_running_loop()
    reported: list[BaseException] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    try:

        async def work() -> None:
            raise ValueError("early")

        assert start_eagerly(work()) is None
    finally:
        loop.set_exception_handler(previous)
    assert [str(exc) for exc in reported] == ["early"]


async def test_the_first_step_runs_in_the_callers_task_and_the_rest_in_its_own() -> None:
    seen: list[asyncio.Task[None] | None] = []

    async def work() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())

    task = start_eagerly(work())
    assert task is not None
    await task
    assert seen == [asyncio.current_task(), task]
