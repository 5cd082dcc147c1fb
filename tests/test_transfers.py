"""The descriptor-transfer table both sides use (grant_broker_protocol.transfers):
when a transfer is complete, which frames are refused, waiting and its end,
and select_fds.  Real descriptors (pipes), and every test checks that none leaks."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator

import pytest

from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd, open_fd_count
from grant_broker_protocol.transfers import TransferRefused, TransferTable, select_fds

pytestmark = pytest.mark.usefixtures("fd_baseline")

OP = "test take"


def fds(n: int) -> list[OwnedFd]:
    """*n* owned descriptors (pipe ends)."""
    out: list[OwnedFd] = []
    while len(out) < n:
        read_end, write_end = os.pipe()
        out += [OwnedFd(read_end), OwnedFd(write_end)]
    for extra in out[n:]:
        extra.close()
    return out[:n]


def close_all(owned: list[OwnedFd]) -> None:
    for fd in owned:
        fd.close()


@pytest.fixture
def table() -> Iterator[TransferTable]:
    """The broker's kind of table: one frame per transfer, ids once, EBADF for a transfer that never came."""
    table = TransferTable(max_pending=4)
    yield table
    table.close(BrokerError(errno.ECANCELED, "test", "table closed"))


async def take(table: TransferTable, transfer_id: int, *, count: int | None = None, timeout: float = 2.0) -> list[OwnedFd]:
    return await table.take(OP, transfer_id, count=count, timeout=timeout)


# --------------------------------------------------------------------------- complete transfers


async def test_a_transfer_is_complete_with_its_first_frame(table: TransferTable) -> None:
    sent = fds(2)
    table.deliver(1, sent)
    taken = await take(table, 1)
    assert taken == sent
    assert len(table) == 0
    close_all(taken)


async def test_taking_gives_the_caller_the_descriptors(table: TransferTable) -> None:
    sent = fds(1)
    table.deliver(1, sent)
    taken = await take(table, 1)
    table.close(BrokerError(errno.ECANCELED, "test"))
    assert not taken[0].closed  # the table no longer owns them
    close_all(taken)


async def test_with_accumulate_a_transfer_is_complete_once_it_has_count_descriptors() -> None:
    table = TransferTable(accumulate=True, missing_errno=errno.ETIMEDOUT)
    first, second = fds(3), fds(2)
    table.deliver(7, first)
    waiter = asyncio.ensure_future(take(table, 7, count=5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    table.deliver(7, second)
    taken = await asyncio.wait_for(waiter, 2)
    assert taken == first + second
    close_all(taken)


async def test_with_accumulate_a_transfer_with_count_descriptors_already_there_is_taken_at_once() -> None:
    table = TransferTable(accumulate=True)
    table.deliver(7, fds(1))
    table.deliver(7, fds(1))
    taken = await take(table, 7, count=2, timeout=0)
    assert len(taken) == 2
    close_all(taken)


async def test_take_waits_for_a_frame_that_comes_after_the_call(table: TransferTable) -> None:
    waiter = asyncio.ensure_future(take(table, 3))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    sent = fds(1)
    table.deliver(3, sent)
    taken = await asyncio.wait_for(waiter, 2)
    assert taken == sent
    close_all(taken)


# --------------------------------------------------------------------------- refused frames


def test_a_frame_with_id_0_is_refused_and_its_descriptors_closed(table: TransferTable) -> None:
    sent = fds(2)
    with pytest.raises(TransferRefused, match="id 0"):
        table.deliver(0, sent)
    assert all(fd.closed for fd in sent)
    assert len(table) == 0


def test_a_failed_frame_with_id_0_is_refused(table: TransferTable) -> None:
    with pytest.raises(TransferRefused):
        table.fail(0, BrokerError(errno.EMFILE, "receive"))


def test_an_id_used_twice_is_refused_and_only_the_second_frames_descriptors_closed(table: TransferTable) -> None:
    first, second = fds(1), fds(2)
    table.deliver(5, first)
    with pytest.raises(TransferRefused, match="used twice"):
        table.deliver(5, second)
    assert all(fd.closed for fd in second)
    assert not first[0].closed
    assert len(table) == 1


def test_an_id_that_failed_cannot_be_used_again(table: TransferTable) -> None:
    table.fail(5, BrokerError(errno.EMFILE, "receive"))
    sent = fds(1)
    with pytest.raises(TransferRefused):
        table.deliver(5, sent)
    assert sent[0].closed


def test_with_accumulate_an_id_that_failed_cannot_be_used_again() -> None:
    table = TransferTable(accumulate=True)
    table.fail(5, BrokerError(errno.EMFILE, "receive"))
    sent = fds(1)
    with pytest.raises(TransferRefused):
        table.deliver(5, sent)
    assert sent[0].closed


def test_frames_beyond_max_pending_are_refused_and_their_descriptors_closed() -> None:
    table = TransferTable(max_pending=2)
    table.deliver(1, fds(1))
    table.fail(2, BrokerError(errno.EMFILE, "receive"))  # failed transfers are pending too
    sent = fds(1)
    with pytest.raises(TransferRefused, match="more than 2"):
        table.deliver(3, sent)
    assert sent[0].closed
    table.close(BrokerError(errno.ECANCELED, "test"))


async def test_a_taken_transfer_no_longer_counts_against_max_pending() -> None:
    table = TransferTable(max_pending=1)
    table.deliver(1, fds(1))
    close_all(await take(table, 1))
    table.deliver(2, fds(1))
    assert len(table) == 1
    table.close(BrokerError(errno.ECANCELED, "test"))


def test_without_max_pending_any_number_of_transfers_wait() -> None:
    table = TransferTable()
    for transfer_id in range(1, 101):
        table.deliver(transfer_id, [])
    assert len(table) == 100
    table.close(BrokerError(errno.ECANCELED, "test"))


# --------------------------------------------------------------------------- calls that get no descriptors


async def test_taking_id_0_is_ebadf(table: TransferTable) -> None:
    with pytest.raises(BrokerError) as raised:
        await take(table, 0)
    assert (raised.value.errno, raised.value.operation) == (errno.EBADF, OP)
    assert "fd_transfer is 0" in raised.value.detail


async def test_a_transfer_that_never_comes_fails_with_ebadf_by_default(table: TransferTable) -> None:
    with pytest.raises(BrokerError) as raised:
        await take(table, 9, timeout=0.02)
    assert (raised.value.errno, raised.value.operation) == (errno.EBADF, OP)
    assert "transfer id 9" in raised.value.detail


async def test_a_transfer_that_never_comes_fails_with_the_configured_errno() -> None:
    table = TransferTable(missing_errno=errno.ETIMEDOUT)
    with pytest.raises(BrokerError) as raised:
        await take(table, 9, timeout=0.02)
    assert raised.value.errno == errno.ETIMEDOUT


async def test_with_accumulate_too_few_descriptors_in_time_fail_and_stay_with_the_table() -> None:
    table = TransferTable(accumulate=True, missing_errno=errno.ETIMEDOUT)
    sent = fds(1)
    table.deliver(4, sent)
    with pytest.raises(BrokerError) as raised:
        await take(table, 4, count=2, timeout=0.02)
    assert raised.value.errno == errno.ETIMEDOUT
    assert not sent[0].closed
    table.close(BrokerError(errno.ECANCELED, "test"))
    assert sent[0].closed


async def test_a_second_call_waiting_for_the_same_transfer_is_ebadf(table: TransferTable) -> None:
    first = asyncio.ensure_future(take(table, 6))
    await asyncio.sleep(0)
    with pytest.raises(BrokerError) as raised:
        await take(table, 6)
    assert raised.value.errno == errno.EBADF
    assert "already waiting" in raised.value.detail
    table.deliver(6, fds(1))
    close_all(await asyncio.wait_for(first, 2))


async def test_a_failed_transfer_fails_the_call_that_names_it_with_its_error(table: TransferTable) -> None:
    table.fail(8, BrokerError(errno.EMFILE, "receive", "the broker is out of descriptors"))
    with pytest.raises(BrokerError) as raised:
        await take(table, 8)
    error = raised.value
    assert (error.errno, error.operation, error.detail) == (errno.EMFILE, OP, "the broker is out of descriptors")
    assert len(table) == 0


async def test_a_failed_transfer_fails_that_call_only(table: TransferTable) -> None:
    sent = fds(1)
    table.deliver(1, sent)
    table.fail(2, BrokerError(errno.EMFILE, "receive"))
    with pytest.raises(BrokerError):
        await take(table, 2)
    assert await take(table, 1) == sent
    close_all(sent)


async def test_a_failure_wakes_the_call_waiting_for_it(table: TransferTable) -> None:
    waiter = asyncio.ensure_future(take(table, 2))
    await asyncio.sleep(0.01)
    table.fail(2, BrokerError(errno.ENFILE, "receive"))
    with pytest.raises(BrokerError) as raised:
        await asyncio.wait_for(waiter, 2)
    assert raised.value.errno == errno.ENFILE


async def test_with_accumulate_a_failure_of_a_transfer_partly_arrived_fails_the_call_and_closes_what_arrived() -> None:
    # The SDK's side: a reply's descriptors in several frames, one of which
    # could not be received.
    table = TransferTable(accumulate=True)
    sent = fds(2)
    table.deliver(3, sent)
    table.fail(3, BrokerError(errno.EMFILE, "receive"))
    with pytest.raises(BrokerError) as raised:
        await take(table, 3, count=4)
    assert raised.value.errno == errno.EMFILE
    assert all(fd.closed for fd in sent)
    assert len(table) == 0


# --------------------------------------------------------------------------- close


async def test_close_fails_every_waiting_call_with_its_error(table: TransferTable) -> None:
    waiters = [asyncio.ensure_future(take(table, transfer_id)) for transfer_id in (1, 2)]
    await asyncio.sleep(0.01)
    table.close(BrokerError(errno.ECANCELED, "session", "session 3 ended"))
    for waiter in waiters:
        with pytest.raises(BrokerError) as raised:
            await asyncio.wait_for(waiter, 2)
        assert (raised.value.errno, raised.value.operation, raised.value.detail) == (errno.ECANCELED, OP, "session 3 ended")


async def test_after_close_a_call_fails_with_the_close_error(table: TransferTable) -> None:
    table.close(BrokerError(errno.ECANCELED, "session", "ended"))
    with pytest.raises(BrokerError) as raised:
        await take(table, 1)
    assert raised.value.errno == errno.ECANCELED
    assert table.closed


def test_close_closes_every_descriptor_held(table: TransferTable) -> None:
    held = fds(3)
    table.deliver(1, held[:2])
    table.deliver(2, held[2:])
    before = open_fd_count()
    table.close(BrokerError(errno.ECANCELED, "test"))
    assert all(fd.closed for fd in held)
    assert open_fd_count() == before - 3
    assert len(table) == 0


def test_after_close_arriving_descriptors_are_closed(table: TransferTable) -> None:
    table.close(BrokerError(errno.ECANCELED, "test"))
    sent = fds(2)
    table.deliver(1, sent)
    assert all(fd.closed for fd in sent)
    assert len(table) == 0


async def test_close_is_idempotent_and_keeps_the_first_error(table: TransferTable) -> None:
    table.close(BrokerError(errno.ECANCELED, "first"))
    table.close(BrokerError(errno.EPIPE, "second"))
    with pytest.raises(BrokerError) as raised:
        await take(table, 1)
    assert raised.value.errno == errno.ECANCELED


# --------------------------------------------------------------------------- select_fds


def test_select_fds_gives_the_named_descriptors_in_the_order_named() -> None:
    sent = fds(3)
    chosen = select_fds(OP, 1, sent, [2, 0])
    assert chosen == [sent[2], sent[0]]
    close_all(chosen)


def test_select_fds_closes_the_descriptors_no_index_names() -> None:
    sent = fds(3)
    chosen = select_fds(OP, 1, sent, [1])
    assert [fd.closed for fd in sent] == [True, False, True]
    close_all(chosen)


def test_select_fds_of_no_indexes_closes_everything() -> None:
    sent = fds(2)
    assert select_fds(OP, 1, sent, []) == []
    assert all(fd.closed for fd in sent)


@pytest.mark.parametrize("index", [2, 5, -1])
def test_select_fds_refuses_an_index_out_of_range_and_closes_all(index: int) -> None:
    sent = fds(2)
    with pytest.raises(BrokerError) as raised:
        select_fds(OP, 4, sent, [0, index])
    assert (raised.value.errno, raised.value.operation) == (errno.EBADF, OP)
    assert f"fd index {index} not in transfer 4 of 2 fds" in raised.value.detail
    assert all(fd.closed for fd in sent)


def test_select_fds_refuses_an_index_named_twice_and_closes_all() -> None:
    sent = fds(2)
    with pytest.raises(BrokerError) as raised:
        select_fds(OP, 4, sent, [1, 1])
    assert raised.value.errno == errno.EBADF
    assert "named twice" in raised.value.detail
    assert all(fd.closed for fd in sent)
