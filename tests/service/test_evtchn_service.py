"""The Evtchn service through real sockets: binding, notifying, and its errors.

Two sessions act as two domains of the emulated hypervisor; everything goes
through the broker's gRPC socket and fd channel.
"""

from __future__ import annotations

import errno
import re

import grpc
import pytest

import grant_broker_client
from grant_broker.core.policy import Limits
from grant_broker_client.evtchn import PortFired

from .conftest import InProcessBroker
from .evtchn_helpers import (
    UNKNOWN_DOMID,
    connect_pair,
    expect_error,
    next_event,
    nothing_more,
    two_domains,
)

MAX_PORTS = 6


@pytest.fixture
def broker_limits() -> Limits:
    return Limits(max_ports_per_session=MAX_PORTS)


async def test_notify_reaches_the_other_domains_subscription(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        pair = await connect_pair(one, two)
        async with two.evtchn.subscribe(ports=[pair.server_port]) as server_events, \
                   one.evtchn.subscribe(ports=[pair.client_port]) as client_events:
            assert await next_event(client_events) == PortFired(pair.client_port)  # the bind's pending event
            for _ in range(3):
                await one.evtchn.notify(pair.client_port)
                assert await next_event(server_events) == PortFired(pair.server_port)
                await two.evtchn.notify(pair.server_port)
                assert await next_event(client_events) == PortFired(pair.client_port)
            await nothing_more(server_events)
            await nothing_more(client_events)


async def test_usage_counts_ports_and_subscriptions(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        pair = await connect_pair(one, two)
        virq_port = await one.evtchn.bind_virq(0)
        assert (await one.describe()).usage.event_channels == 2
        async with one.evtchn.subscribe():
            assert (await one.describe()).usage.subscriptions == 1
        await one.evtchn.unbind(virq_port)
        await one.evtchn.unbind(pair.client_port)
        info = await one.describe()
        assert (info.usage.event_channels, info.usage.subscriptions) == (0, 0)


async def test_unbinding_frees_the_remote_end_to_bind_again(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        pair = await connect_pair(one, two)
        await one.evtchn.unbind(pair.client_port)
        # Xen: the remote end is unbound for the closer's domain again.
        again = await one.evtchn.bind_interdomain(two.domid, pair.server_port)
        async with one.evtchn.subscribe(ports=[again]) as events:
            assert await next_event(events) == PortFired(again)
            await two.evtchn.notify(pair.server_port)
            assert await next_event(events) == PortFired(again)


async def test_event_of_a_port_unbound_before_the_first_subscribe_is_dropped(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        pair = await connect_pair(one, two)  # the new port fires at once
        await two.evtchn.notify(pair.server_port)  # and again (coalesced while it is masked)
        await one.evtchn.unbind(pair.client_port)
        again = await one.evtchn.bind_interdomain(two.domid, pair.server_port)
        assert again == pair.client_port  # Xen hands out the lowest free port
        async with one.evtchn.subscribe(ports=[again]) as events:
            assert await next_event(events) == PortFired(again)  # the new channel's own event, once
            await nothing_more(events)


async def test_port_quota(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        ports = [await one.evtchn.bind_unbound_port(2) for _ in range(MAX_PORTS)]
        error = await expect_error(one.evtchn.bind_unbound_port(2), grpc.StatusCode.RESOURCE_EXHAUSTED, errno.EDQUOT)
        assert str(MAX_PORTS) in error.detail
        await one.evtchn.unbind(ports[0])
        await one.evtchn.bind_unbound_port(2)


# --------------------------------------------------------------------------- ownership


async def test_unbind_of_another_sessions_port_is_enotconn(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two), \
               await grant_broker_client.connect(broker.socket_path, domid=1) as one_again:
        for _ in range(3):
            await one.evtchn.bind_unbound_port(2)
        pair = await connect_pair(one, two)
        assert pair.client_port != pair.server_port  # port numbers are per domain
        # Same domain, other session: the number is the domain's, the port is the session's.
        # Other domain: the number means nothing there.
        for intruder in (one_again, two):
            error = await expect_error(
                intruder.evtchn.unbind(pair.client_port), grpc.StatusCode.FAILED_PRECONDITION, errno.ENOTCONN
            )
            assert f"port {pair.client_port} is not bound by this session" in error.detail
            for call in (intruder.evtchn.notify(pair.client_port), intruder.evtchn.unmask(pair.client_port)):
                await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, errno.ENOTCONN)
        # The owner still has it.
        async with two.evtchn.subscribe(ports=[pair.server_port]) as events:
            await one.evtchn.notify(pair.client_port)
            assert await next_event(events) == PortFired(pair.server_port)


async def test_unknown_ports(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        for call in (one.evtchn.unbind(77), one.evtchn.notify(77), one.evtchn.unmask(77)):
            await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, errno.ENOTCONN)
        port = await one.evtchn.bind_unbound_port(2)
        await one.evtchn.unbind(port)
        await expect_error(one.evtchn.unbind(port), grpc.StatusCode.FAILED_PRECONDITION, errno.ENOTCONN)
        await expect_error(one.evtchn.subscribe(ports=[port]), grpc.StatusCode.FAILED_PRECONDITION, errno.ENOTCONN)


# --------------------------------------------------------------------------- bad input


async def test_bind_interdomain_errors(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        error = await expect_error(
            one.evtchn.bind_interdomain(UNKNOWN_DOMID, 1), grpc.StatusCode.NOT_FOUND, errno.ESRCH
        )
        assert str(UNKNOWN_DOMID) in error.detail
        # A port that is not offered to us, or not allocated at all.
        offered_elsewhere = await two.evtchn.bind_unbound_port(remote_domain=3)
        await expect_error(
            one.evtchn.bind_interdomain(two.domid, offered_elsewhere), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL
        )
        await expect_error(one.evtchn.bind_interdomain(two.domid, 4000), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        # Already connected: not unbound any more.
        pair = await connect_pair(one, two)
        await expect_error(
            one.evtchn.bind_interdomain(two.domid, pair.server_port), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL
        )
        # Not a domid_t.
        await expect_error(one.evtchn.bind_interdomain(0x1_0000, 1), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        await expect_error(one.evtchn.bind_unbound_port(0x1_0000), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        # Failed binds hold nothing.
        assert (await one.describe()).usage.event_channels == 1


async def test_bind_virq_errors(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        await expect_error(one.evtchn.bind_virq(1000), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        await one.evtchn.bind_virq(1)
        await expect_error(one.evtchn.bind_virq(1), grpc.StatusCode.ALREADY_EXISTS, errno.EEXIST)


async def test_restrict_domid(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        await expect_error(one.evtchn.restrict_domid(0), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        await expect_error(one.evtchn.restrict_domid(0x1_0000), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        offered = await two.evtchn.bind_unbound_port(remote_domain=1)
        await one.evtchn.restrict_domid(two.domid)
        await expect_error(one.evtchn.restrict_domid(two.domid), grpc.StatusCode.PERMISSION_DENIED, errno.EACCES)
        # Restricted: no unbound ports, interdomain only to that domain.
        await expect_error(one.evtchn.bind_unbound_port(2), grpc.StatusCode.PERMISSION_DENIED, errno.EACCES)
        await expect_error(one.evtchn.bind_interdomain(3, 1), grpc.StatusCode.PERMISSION_DENIED, errno.EACCES)
        await one.evtchn.bind_interdomain(two.domid, offered)


async def test_client_side_range_checks(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        await expect_error(one.evtchn.notify(-1), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        await expect_error(one.evtchn.bind_unbound_port(2**32), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)


async def test_errors_are_never_unknown_or_internal(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        calls = [
            one.evtchn.unbind(0),
            one.evtchn.notify(2**32 - 1),
            one.evtchn.bind_interdomain(UNKNOWN_DOMID, 0),
            one.evtchn.bind_interdomain(2, 2**32 - 1),
            one.evtchn.bind_virq(2**32 - 1),
            one.evtchn.restrict_domid(0x7FF0),
        ]
        for call in calls:
            with pytest.raises(grant_broker_client.BrokerClientError) as raised:
                await call
            assert raised.value.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), str(raised.value)
            assert re.match(r"evtchn [a-z ]+: ", str(raised.value)), str(raised.value)


# --------------------------------------------------------------------------- after the session


async def test_session_end_unbinds_its_ports(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        pair = await connect_pair(one, two)
        await one.close()
        # Domain 1's handle is gone with its session: domain 2's port is
        # unbound for domain 1 again, so a new session of domain 1 can connect.
        async with await grant_broker_client.connect(broker.socket_path, domid=1) as one_again:
            port = await one_again.evtchn.bind_interdomain(two.domid, pair.server_port)
            async with two.evtchn.subscribe(ports=[pair.server_port]) as events:
                await one_again.evtchn.notify(port)
                assert await next_event(events) == PortFired(pair.server_port)


# --------------------------------------------------------------------------- unmap notifications


async def test_gntdev_unmap_notification_arrives_as_an_event(broker: InProcessBroker) -> None:
    from grant_broker_client.gntdev import UNMAP_NOTIFY_SEND_EVENT

    async with two_domains(broker.socket_path) as (one, two):
        # Domain 2 shares a page with domain 1 and offers it a port (libvchan's layout).
        async with await two.gntalloc.share(one.domid, 1) as pages:
            pair = await connect_pair(one, two)
            async with two.evtchn.subscribe(ports=[pair.server_port]) as server_events:
                mapping = await one.gntdev.map([(two.domid, pages.refs[0])])
                await mapping.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, pair.client_port)
                await nothing_more(server_events)
                await mapping.aclose()
                assert await next_event(server_events) == PortFired(pair.server_port)


async def test_gntalloc_unmap_notification_arrives_when_the_session_dies(broker: InProcessBroker) -> None:
    from grant_broker_client.gntalloc import UNMAP_NOTIFY_SEND_EVENT

    async with two_domains(broker.socket_path) as (one, two):
        pair = await connect_pair(one, two)
        async with one.evtchn.subscribe(ports=[pair.client_port]) as client_events:
            assert await next_event(client_events) == PortFired(pair.client_port)
            pages = await two.gntalloc.share(one.domid, 1)
            await pages.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, pair.server_port)
            pages._memory.close()  # this process's mapping; the session's end does the rest
            await two.close()
            assert await next_event(client_events) == PortFired(pair.client_port)


async def test_unmap_notify_with_someone_elses_port_is_refused(broker: InProcessBroker) -> None:
    from grant_broker_client.gntalloc import UNMAP_NOTIFY_SEND_EVENT

    async with two_domains(broker.socket_path) as (one, two), \
               await grant_broker_client.connect(broker.socket_path, domid=2) as two_again:
        pair = await connect_pair(one, two)
        async with await two_again.gntalloc.share(one.domid, 1) as pages:
            with pytest.raises(grant_broker_client.BrokerClientError) as raised:
                await pages.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, pair.server_port)
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- docs


async def test_module_example_runs(broker: InProcessBroker) -> None:
    """The example in grant_broker_client.evtchn's docstring is real code."""
    import grant_broker_client.evtchn as module

    assert module.__doc__ is not None
    example = module.__doc__.split("::\n", 1)[1].split("\n\n    # asyncio.run", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(_dedent(example), "grant_broker_client.evtchn example", "exec"), namespace)
    await namespace["ping_pong"](broker.socket_path)  # type: ignore[operator]


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


async def test_calls_on_a_closed_session_fail_cleanly(broker: InProcessBroker) -> None:
    # Never touches the closed gRPC channel (grpcio crashes building a stub on one).
    fresh = await grant_broker_client.connect(broker.socket_path, domid=1)
    await fresh.close()

    async def bind_on_closed() -> int:
        return await fresh.evtchn.bind_unbound_port(2)

    await expect_error(bind_on_closed(), grpc.StatusCode.UNAVAILABLE, errno.EPIPE)
    used = await grant_broker_client.connect(broker.socket_path, domid=1)
    port = await used.evtchn.bind_unbound_port(2)
    await used.close()
    await expect_error(used.evtchn.notify(port), grpc.StatusCode.UNAVAILABLE, errno.EPIPE)


async def test_reset_keeps_ports_bound(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        await one.evtchn.reset()  # before any port: opens the handle, resets nothing
        pair = await connect_pair(one, two)
        await one.evtchn.reset()  # drops the bind's pending event with the ring
        async with one.evtchn.subscribe(ports=[pair.client_port]) as events:
            await nothing_more(events)
            # The dropped event left the port masked, as on Linux: unmask, then it fires.
            await one.evtchn.unmask(pair.client_port)
            await two.evtchn.notify(pair.server_port)
            assert await next_event(events) == PortFired(pair.client_port)
        assert (await one.describe()).usage.event_channels == 1
