"""Budgets per session and per uid (core/budgets.py), and descriptor transfers that expire.

Issue 14 §3: what the broker holds on a client's behalf — descriptors of
transfers nobody claims, dma-bufs kept, copy buffers, gntalloc pool pages,
mapped copy-buffer bytes, ports, subscriptions, sessions, calls in flight —
is bounded per session *and* per uid, refused with EDQUOT naming the budget
and its limit, and every count returns to zero once given back.  Sessions
and operations are driven directly (no sockets): the ``core`` fixture of
tests/core/conftest.py.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from collections.abc import Awaitable
from typing import Any

import pytest

from grant_broker.core import budgets
from grant_broker.core.operations import evtchn, gntalloc, gntdev
from grant_broker.core.operations.broker import BrokerStatus
from grant_broker.core.policy import Limits
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.routes import build_routes
from grant_broker.core.session import Session
from grant_broker_protocol.abi import GNTALLOC_FLAG_WRITABLE
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.transfers import TransferTable
from grant_broker_protocol.v1 import common_pb2, evtchn_pb2, gntalloc_pb2, gntdev_pb2

from .conftest import PEER, SELF, Core

FD0 = common_pb2.FdRef(index=0)
POOL = 1024  # the emulated hypervisor's gntalloc pool per domain (Linux's default `limit`)
OTHER_UID = os.getuid() + 1000


async def refused(call: Awaitable[Any], code: int, *words: str) -> BrokerError:
    with pytest.raises(BrokerError) as raised:
        await call
    error = raised.value
    assert error.errno == code, str(error)
    for word in words:
        assert word in str(error), str(error)
    return error


def pipes(n: int) -> list[OwnedFd]:
    out: list[OwnedFd] = []
    while len(out) < n:
        read_end, write_end = os.pipe()
        out += [OwnedFd(read_end), OwnedFd(write_end)]
    for extra in out[n:]:
        extra.close()
    return out[:n]


def alloc(count: int, domid: int = PEER) -> gntalloc_pb2.AllocGrefRequest:
    return gntalloc_pb2.AllocGrefRequest(domid=domid, count=count, flags=GNTALLOC_FLAG_WRITABLE)


async def share(session: Session, count: int) -> int:
    """Allocate *count* pages of the session's domain for PEER; the allocation's index."""
    reply = await gntalloc.alloc_gref(session, alloc(count))
    reply.close()
    return reply.message.index


def sparse_memfd(length: int) -> OwnedFd:
    """A memfd of *length* bytes (no memory used until touched), sealed as the broker requires."""
    import fcntl

    fd = OwnedFd(os.memfd_create("budget-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    os.ftruncate(fd.fileno(), length)
    fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


_transfer_ids = iter(range(50_000, 1_000_000))


async def register(session: Session, length: int) -> int:
    """A copy buffer of *length* bytes registered in *session*; its id."""
    transfer = next(_transfer_ids)
    session.incoming.deliver(transfer, [sparse_memfd(length)])
    request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer, fd=FD0, length=length)
    return (await gntdev.register_copy_buffer(session, request)).message.buffer_id


def held(session: Session) -> dict[str, int]:
    return {budget.per_uid: count for budget, count in session.held.items() if count}


def user_of(registry: SessionRegistry, uid: int | None = None) -> dict[str, int] | None:
    budget = registry.user_budget(os.getuid() if uid is None else uid)
    return None if budget is None else budget.usage()


# --------------------------------------------------------------------------- transfers nobody claims expire


async def test_an_unclaimed_transfer_expires_its_descriptors_close_and_a_late_call_is_told_at_once() -> None:
    table = TransferTable(max_pending=4, expire_after=0.05)
    sent = pipes(2)
    table.deliver(7, sent)
    await asyncio.sleep(0.2)  # the table's timer (due at +0.05 s) has run
    assert len(table) == 0
    assert all(fd.closed for fd in sent)
    started = asyncio.get_running_loop().time()
    with pytest.raises(BrokerError) as raised:
        await table.take("late call", 7, timeout=5)
    assert raised.value.errno == errno.EBADF and "were closed" in raised.value.detail
    assert asyncio.get_running_loop().time() - started < 1  # not the 5 s wait for a transfer that never came
    table.close(BrokerError(errno.ECANCELED, "test", "done"))


def test_without_a_running_loop_the_next_deliver_expires_what_is_due() -> None:
    table = TransferTable(max_pending=2, expire_after=0.0)
    first, second = pipes(1), pipes(1)
    table.deliver(1, first)
    table.deliver(2, second)  # transfer 1 is past its deadline: closed first, so 2 fits
    assert first[0].closed and not second[0].closed
    assert len(table) == 1
    table.close(BrokerError(errno.ECANCELED, "test", "done"))
    assert second[0].closed


async def test_a_transfer_taken_in_time_does_not_expire() -> None:
    table = TransferTable(expire_after=0.05)
    sent = pipes(1)
    table.deliver(3, sent)
    taken = await table.take("call", 3, timeout=1)
    await asyncio.sleep(0.1)
    assert taken == sent and not sent[0].closed
    sent[0].close()
    table.close(BrokerError(errno.ECANCELED, "test", "done"))


class CountingBudget:
    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def charge(self, count: int) -> None:
        if self.used + count > self.limit:
            raise BrokerError(errno.EDQUOT, "fd transfer", f"budget test: limit {self.limit}")
        self.used += count

    def credit(self, count: int) -> None:
        self.used -= count


async def test_a_transfer_over_budget_closes_at_once_and_its_call_gets_the_refusal() -> None:
    budget = CountingBudget(3)
    table = TransferTable(expire_after=5, budget=budget)
    first, second = pipes(2), pipes(2)
    table.deliver(1, first)
    table.deliver(2, second)  # 2 + 2 > 3
    assert budget.used == 2 and all(fd.closed for fd in second)
    with pytest.raises(BrokerError) as raised:
        await table.take("call", 2, timeout=1)
    assert raised.value.errno == errno.EDQUOT and "limit 3" in raised.value.detail
    taken = await table.take("call", 1, timeout=1)
    assert budget.used == 0
    for fd in taken:
        fd.close()
    table.deliver(3, pipes(3))
    table.close(BrokerError(errno.ECANCELED, "test", "done"))
    assert budget.used == 0


async def test_a_sessions_unclaimed_descriptors_expire_and_are_credited(core: Core) -> None:
    registry = core.new_registry(limits=Limits(fd_transfer_expiry_seconds=0.05))
    session = core.registered(registry)
    sent = pipes(32)
    session.incoming.deliver(9, sent)
    assert user_of(registry)["max_fds_held_per_uid"] == 32  # type: ignore[index]
    await asyncio.sleep(0.2)
    assert all(fd.closed for fd in sent)
    assert held(session) == {}
    assert user_of(registry) == {"max_sessions_per_uid": 1}


# --------------------------------------------------------------------------- descriptors held, per session and per uid


async def test_pending_descriptors_count_per_uid_across_sessions(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_fds_held_per_session=32, max_fds_held_per_uid=48))
    first, second = core.registered(registry), core.registered(registry)
    stranger = core.registered(registry, uid=OTHER_UID)
    first.incoming.deliver(1, pipes(32))
    second.incoming.deliver(1, pipes(16))
    refused_fds = pipes(1)
    second.incoming.deliver(2, refused_fds)  # 32 + 16 + 1 > 48: refused, closed now
    assert refused_fds[0].closed
    await refused(second.take_fds("gntdev register copy buffer", 2, [0]), errno.EDQUOT,
                  "budget max_fds_held_per_uid", "the limit is 48", f"uid {os.getuid()}")
    # A session's own budget too.
    first.incoming.deliver(2, pipes(1))
    await refused(first.take_fds("call", 2, [0]), errno.EDQUOT, "budget max_fds_held_per_session", "the limit is 32")
    # Another uid is not concerned.
    stranger.incoming.deliver(1, pipes(32))
    assert user_of(registry, OTHER_UID) == {"max_sessions_per_uid": 1, "max_fds_held_per_uid": 32}
    # Taking them gives the budget back (the call owns them now).
    for fd in await first.take_fds("call", 1, []):
        fd.close()
    assert user_of(registry)["max_fds_held_per_uid"] == 16  # type: ignore[index]
    for session in (first, second, stranger):
        registry.close_session(session)
    assert user_of(registry) is None and user_of(registry, OTHER_UID) is None


async def test_dmabuf_exports_and_copy_buffers_are_descriptors_held(core: Core) -> None:
    session = core.session(Limits(max_fds_held_per_session=2))
    granted = core.grant(1)
    request = gntdev_pb2.DmabufExportFromRefsRequest(domid=PEER, count=1, refs=granted.refs)
    export = await gntdev.dmabuf_export_from_refs(session, request)
    buffer_id = await register(session, mmap.PAGESIZE)
    assert held(session) == {"max_fds_held_per_uid": 2, "max_copy_buffer_bytes_per_uid": mmap.PAGESIZE}
    await refused(gntdev.dmabuf_export_from_refs(session, request), errno.EDQUOT, "budget max_fds_held_per_session")
    with pytest.raises(BrokerError) as raised:
        await register(session, mmap.PAGESIZE)
    assert raised.value.errno == errno.EDQUOT and "max_fds_held_per_session" in str(raised.value)
    # Given back: the export once released, the buffer once unregistered.
    export.close()
    wait = gntdev_pb2.DmabufExportWaitReleasedRequest(dmabuf_id=export.message.dmabuf_id, wait_to_ms=2000)
    await gntdev.dmabuf_export_wait_released(session, wait)
    await gntdev.unregister_copy_buffer(session, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=buffer_id))
    assert held(session) == {} and session.user.empty


# --------------------------------------------------------------------------- the gntalloc pool


async def test_one_session_cannot_take_its_domains_whole_gntalloc_pool(core: Core) -> None:
    registry = core.registry  # default limits
    hog = core.registered(registry)
    await refused(gntalloc.alloc_gref(hog, alloc(POOL)), errno.EDQUOT, "budget max_pool_pages_per_session", "the limit is 256")
    await share(hog, Limits().max_pool_pages_per_session)
    await refused(gntalloc.alloc_gref(hog, alloc(1)), errno.EDQUOT, "max_pool_pages_per_session")
    # Another client of the same domain still gets pages.
    other = core.registered(registry, uid=OTHER_UID)
    await share(other, 16)


async def test_one_uid_cannot_take_more_than_its_share_of_the_pool(core: Core) -> None:
    registry = core.registry
    per_session, per_uid = Limits().max_pool_pages_per_session, Limits().max_pool_pages_per_uid
    assert per_session < per_uid < POOL
    sessions = [core.registered(registry) for _ in range(per_uid // per_session + 1)]
    indexes = [await share(session, per_session) for session in sessions[:-1]]
    await refused(gntalloc.alloc_gref(sessions[-1], alloc(1)), errno.EDQUOT,
                  "budget max_pool_pages_per_uid", f"the limit is {per_uid}", f"uid {os.getuid()}")
    # Others of the domain keep the rest of the pool.
    await share(core.registered(registry, uid=OTHER_UID), per_session)
    # Deallocating gives the pages back to the uid's budget.
    request = gntalloc_pb2.DeallocGrefRequest(index=indexes[0], count=per_session)
    await gntalloc.dealloc_gref(sessions[0], request)
    await share(sessions[-1], per_session)
    for session in list(registry.sessions):
        registry.close_session(session)
    assert user_of(registry) is None and user_of(registry, OTHER_UID) is None


# --------------------------------------------------------------------------- copy buffers: bytes mapped


async def test_copy_buffers_map_at_most_the_bytes_budget(core: Core) -> None:
    limit = Limits().max_copy_buffer_bytes_per_session
    session = core.session()
    with pytest.raises(BrokerError) as raised:
        await register(session, 1 << 30)  # 1 GiB: within MAX_COPY_BUFFER_BYTES, far over the budget
    assert raised.value.errno == errno.EDQUOT
    assert "budget max_copy_buffer_bytes_per_session" in str(raised.value) and f"the limit is {limit}" in str(raised.value)
    first = await register(session, limit // 2)
    await register(session, limit // 2)
    with pytest.raises(BrokerError):
        await register(session, mmap.PAGESIZE)
    await gntdev.unregister_copy_buffer(session, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=first))
    await register(session, mmap.PAGESIZE)


async def test_copy_buffer_bytes_count_per_uid(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_copy_buffer_bytes_per_session=1 << 20, max_copy_buffer_bytes_per_uid=3 << 19))
    first, second = core.registered(registry), core.registered(registry)
    await register(first, 1 << 20)
    with pytest.raises(BrokerError) as raised:
        await register(second, 1 << 20)
    assert raised.value.errno == errno.EDQUOT and "budget max_copy_buffer_bytes_per_uid" in str(raised.value)
    await register(core.registered(registry, uid=OTHER_UID), 1 << 20)


# --------------------------------------------------------------------------- ports, subscriptions, sessions


async def test_ports_count_per_uid(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_ports_per_uid=2))
    first, second = core.registered(registry), core.registered(registry)
    bind = evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER)
    port = (await evtchn.bind_unbound_port(first, bind)).message.port
    await evtchn.bind_unbound_port(second, bind)
    await refused(evtchn.bind_unbound_port(second, bind), errno.EDQUOT, "budget max_ports_per_uid", "the limit is 2")
    await evtchn.bind_unbound_port(core.registered(registry, uid=OTHER_UID), bind)
    await evtchn.unbind(first, evtchn_pb2.UnbindRequest(port=port))
    await evtchn.bind_unbound_port(second, bind)


async def test_subscriptions_count_per_uid(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_subscriptions_per_uid=1))
    first, second = core.registered(registry), core.registered(registry)
    stream = evtchn.subscribe(first, evtchn_pb2.SubscribeRequest())
    try:
        assert (await anext(stream)).subscribed
        await refused(anext(evtchn.subscribe(second, evtchn_pb2.SubscribeRequest())), errno.EDQUOT,
                      "budget max_subscriptions_per_uid")
    finally:
        await stream.aclose()
    other = evtchn.subscribe(second, evtchn_pb2.SubscribeRequest())
    assert (await anext(other)).subscribed
    await other.aclose()
    assert user_of(registry) == {"max_sessions_per_uid": 2}


async def test_sessions_count_per_uid(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_sessions_per_uid=2))
    first = core.registered(registry)
    core.registered(registry)
    with pytest.raises(BrokerError) as raised:
        core.registered(registry)
    assert raised.value.errno == errno.EDQUOT and "budget max_sessions_per_uid" in str(raised.value)
    core.registered(registry, uid=OTHER_UID)
    registry.close_session(first)
    core.registered(registry)


# --------------------------------------------------------------------------- calls in flight


async def test_calls_in_flight_count_per_session_and_per_uid(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_calls_per_session=2, max_calls_per_uid=3, fd_frame_wait_seconds=5))
    routes = {route.full_name: route for route in build_routes(BrokerStatus(registry, core.peer.capabilities),
                                                                streams_ended=lambda: False)}
    register_route = routes["/grant_broker.v1.Gntdev/RegisterCopyBuffer"]
    first, second = core.registered(registry), core.registered(registry)

    def parked(session: Session, transfer: int) -> asyncio.Task[Any]:
        # A call waiting for descriptors that have not come yet.
        request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer, fd=FD0, length=mmap.PAGESIZE)
        return asyncio.ensure_future(register_route.operation(session, request))  # type: ignore[arg-type]

    calls = [parked(first, 1), parked(first, 2)]
    await asyncio.sleep(0.01)
    await refused(parked(first, 3), errno.EDQUOT, "budget max_calls_per_session", "the limit is 2")
    calls.append(parked(second, 1))
    await asyncio.sleep(0.01)
    await refused(parked(second, 2), errno.EDQUOT, "budget max_calls_per_uid", "the limit is 3")
    # Another uid's calls are not concerned.
    stranger = core.registered(registry, uid=OTHER_UID)
    await routes["/grant_broker.v1.Broker/DescribeSession"].operation(stranger, None)  # type: ignore[arg-type]
    # Ended calls give their place back.
    for transfer, session in ((1, first), (2, first), (1, second)):
        session.incoming.deliver(transfer, [sparse_memfd(mmap.PAGESIZE)])
    await asyncio.gather(*calls)
    assert user_of(registry) == {"max_sessions_per_uid": 2, "max_fds_held_per_uid": 3,
                                 "max_copy_buffer_bytes_per_uid": 3 * mmap.PAGESIZE}


# --------------------------------------------------------------------------- every count back to zero


async def test_everything_a_session_held_is_credited_back_when_it_ends(core: Core) -> None:
    registry = core.registry
    session = core.registered(registry, domid=SELF)
    await share(session, 8)
    await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))
    await register(session, mmap.PAGESIZE)
    granted = core.grant(1)
    export = await gntdev.dmabuf_export_from_refs(
        session, gntdev_pb2.DmabufExportFromRefsRequest(domid=PEER, count=1, refs=granted.refs)
    )
    export.close()
    session.incoming.deliver(99, pipes(3))
    stream = evtchn.subscribe(session, evtchn_pb2.SubscribeRequest())
    assert (await anext(stream)).subscribed
    assert user_of(registry) == {
        "max_sessions_per_uid": 1,
        "max_pool_pages_per_uid": 8,
        "max_ports_per_uid": 1,
        "max_fds_held_per_uid": 1 + 1 + 3,
        "max_copy_buffer_bytes_per_uid": mmap.PAGESIZE,
        "max_subscriptions_per_uid": 1,
    }
    registry.close_session(session)
    await stream.aclose()  # the stream ends after the session: nothing is credited twice
    assert held(session) == {}
    assert user_of(registry) is None
    # A charge after the end is refused (nothing would give it back).
    with pytest.raises(BrokerError) as raised:
        session.charge("late", budgets.PORTS)
    assert raised.value.errno == errno.ECANCELED


def test_the_default_budgets_leave_room_for_others() -> None:
    limits = Limits()
    for budget in budgets.BUDGETS:
        per_session = budget.session_limit(limits)
        assert per_session is None or per_session <= budget.uid_limit(limits), budget
    # One uid takes at most half of a domain's pool, one session a quarter.
    assert limits.max_pool_pages_per_uid <= POOL // 2 and limits.max_pool_pages_per_session <= POOL // 4
    # Copy buffers: far below what MAX_COPY_BUFFERS_PER_SESSION x MAX_COPY_BUFFER_BYTES allowed (64 GiB).
    assert limits.max_copy_buffer_bytes_per_uid <= 256 << 20


async def test_a_call_counted_by_its_transport_is_not_counted_again(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_calls_per_session=1))
    routes = {route.full_name: route for route in build_routes(BrokerStatus(registry, core.peer.capabilities),
                                                                streams_ended=lambda: False)}
    session = core.registered(registry)
    # What the gRPC handler does: take the call's place before reading its request, then run the route.
    with session.call_in_flight("Broker.DescribeSession"):
        assert held(session) == {"max_calls_per_uid": 1}
        await routes["/grant_broker.v1.Broker/DescribeSession"].operation(session, None)  # type: ignore[arg-type]
        # Another call of the session (another task) is refused: the one place is taken.
        other = asyncio.ensure_future(routes["/grant_broker.v1.Broker/DescribeSession"].operation(session, None))  # type: ignore[arg-type]
        await refused(other, errno.EDQUOT, "budget max_calls_per_session")
    assert held(session) == {}


async def test_calls_started_from_a_callback_are_each_counted(core: Core) -> None:
    # The fast path serves a call from its channel's reader callback up to its
    # first wait (transport/eager.py): no task there, each call in a context
    # of its own.  A call that waits must not make the next one look nested.
    from grant_broker.transport.eager import start_eagerly

    registry = core.new_registry(limits=Limits(max_calls_per_session=2, fd_frame_wait_seconds=5))
    routes = {route.full_name: route for route in build_routes(BrokerStatus(registry, core.peer.capabilities),
                                                                streams_ended=lambda: False)}
    register_route = routes["/grant_broker.v1.Gntdev/RegisterCopyBuffer"]
    session = core.registered(registry)
    loop = asyncio.get_running_loop()

    def from_a_callback(transfer: int) -> "asyncio.Future[Any]":
        started: asyncio.Future[Any] = loop.create_future()

        def callback() -> None:
            request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer, fd=FD0, length=mmap.PAGESIZE)
            task = start_eagerly(register_route.operation(session, request))  # type: ignore[arg-type]
            started.set_result(task)

        loop.call_soon(callback)
        return started

    waiting = [await from_a_callback(1), await from_a_callback(2)]
    assert all(task is not None for task in waiting)
    assert held(session) == {"max_calls_per_uid": 2}
    reported: list[BaseException] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    try:
        assert await from_a_callback(3) is None  # refused at once, in its first step
    finally:
        loop.set_exception_handler(None)
    (error,) = reported
    assert isinstance(error, BrokerError) and error.errno == errno.EDQUOT and "max_calls_per_session" in str(error)
    for transfer in (1, 2):
        session.incoming.deliver(transfer, [sparse_memfd(mmap.PAGESIZE)])
    await asyncio.gather(*waiting)
    assert held(session) == {"max_fds_held_per_uid": 2, "max_copy_buffer_bytes_per_uid": 2 * mmap.PAGESIZE}


async def test_a_place_taken_before_the_request_is_read_is_given_back_once(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_calls_per_session=1))
    routes = {route.full_name: route for route in build_routes(BrokerStatus(registry, core.peer.capabilities),
                                                                streams_ended=lambda: False)}
    describe = routes["/grant_broker.v1.Broker/DescribeSession"]
    session = core.registered(registry)

    async def admitted_and_served() -> None:
        slot = session.take_call("Broker.DescribeSession")
        assert held(session) == {"max_calls_per_uid": 1}
        await describe.operation(session, None)  # type: ignore[arg-type]  # the route's count is this one
        slot.release()
        slot.release()
        assert held(session) == {}

    await asyncio.ensure_future(admitted_and_served())
    assert held(session) == {} and user_of(registry) == {"max_sessions_per_uid": 1}

    async def admitted_never_served() -> None:
        session.take_call("Broker.DescribeSession")
        assert held(session) == {"max_calls_per_uid": 1}
        # Another call of the session meanwhile is past the budget.
        other = asyncio.ensure_future(describe.operation(session, None))  # type: ignore[arg-type]
        await refused(other, errno.EDQUOT, "budget max_calls_per_session")

    await asyncio.ensure_future(admitted_never_served())
    await asyncio.sleep(0)  # the task's done callbacks run
    assert held(session) == {} and user_of(registry) == {"max_sessions_per_uid": 1}
    # Outside a task (a callback) nothing would give a place back: refused.
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()

    def callback() -> None:
        try:
            session.take_call("Broker.DescribeSession")
            outcome.set_result(None)
        except BrokerError as exc:
            outcome.set_result(exc)

    loop.call_soon(callback)
    error = await outcome
    assert isinstance(error, BrokerError) and error.errno == errno.EIO, error
    assert held(session) == {}
