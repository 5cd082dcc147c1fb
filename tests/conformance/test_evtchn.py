"""Event channels, as ``/dev/xen/evtchn`` on Xen behaves.

Written against the backend contract only, so the same tests prove the
emulated hypervisor and the real device.  On real Xen both domains are dom0
(loopback channels), and delivery goes through an interrupt, so a test waits
for the descriptor to become readable before it expects a port and allows a
short grace period before it concludes that nothing arrived.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from collections.abc import Callable, Iterator

import pytest

from grant_broker.backend.contract import EvtchnHandle
from grant_broker.core.events import EventFanout, EventHub, FanoutEvent, Fired, Subscription
from grant_broker_protocol.errors import BrokerError

from .conftest import Domains

# xen/include/public/xen.h (not mirrored in grant_broker.uapi: no ioctl carries them)
NR_VIRQS = 24
VIRQ_ENOMEM = 12  # global, "low on heap memory": no Linux driver binds it
DOMID_FIRST_RESERVED = 0x7FF0

DELIVERY_TIMEOUT = 5.0  # seconds for a notification to reach a handle
QUIET_PERIOD = 0.05  # seconds to wait before concluding nothing arrives


# --------------------------------------------------------------------------- helpers


async def wait_readable(fd: int, timeout: float = DELIVERY_TIMEOUT) -> None:
    """Wait until *fd* polls readable, through the event loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        loop.remove_reader(fd)


async def fired(handle: EvtchnHandle) -> list[int]:
    """The ports that fired on *handle*, once at least one has."""
    await wait_readable(handle.fileno())
    return handle.read_pending()


async def quiet(handle: EvtchnHandle) -> list[int]:
    """What fired on *handle* after a short grace period (expected: nothing)."""
    await asyncio.sleep(QUIET_PERIOD)
    return handle.read_pending()


async def fired_count(handle: EvtchnHandle, count: int) -> list[int]:
    """The ports that fire on *handle*, read until there are *count* of them."""
    ports: list[int] = []
    async with asyncio.timeout(DELIVERY_TIMEOUT):
        while len(ports) < count:
            await wait_readable(handle.fileno())
            ports += handle.read_pending()
    return ports


class Channel:
    """An interdomain channel: ``peer`` offered ``peer_port``, ``local`` bound ``local_port``."""

    def __init__(self, domains: Domains) -> None:
        self.local = domains.local.open_evtchn()
        self.peer = domains.peer.open_evtchn()
        try:
            self.peer_port = self.peer.bind_unbound_port(domains.local.domid)
            self.local_port = self.local.bind_interdomain(domains.peer.domid, self.peer_port)
        except BaseException:
            self.close()
            raise

    async def drained(self) -> Channel:
        """Consume and unmask the bind's own notification, so tests start quiet."""
        assert await fired(self.local) == [self.local_port]
        self.local.unmask(self.local_port)
        return self

    def close(self) -> None:
        self.local.close()
        self.peer.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def channel(domains: Domains) -> Iterator[Channel]:
    with Channel(domains) as chan:
        yield chan


# --------------------------------------------------------------------------- binding


async def test_bind_unbound_then_interdomain_connects_both_ends(channel: Channel) -> None:
    await channel.drained()
    assert channel.local_port != 0 and channel.peer_port != 0  # port 0 is reserved

    channel.local.notify(channel.local_port)
    assert await fired(channel.peer) == [channel.peer_port]

    channel.peer.notify(channel.peer_port)
    assert await fired(channel.local) == [channel.local_port]


async def test_interdomain_bind_leaves_new_port_pending_once(channel: Channel) -> None:
    assert await fired(channel.local) == [channel.local_port]
    assert await quiet(channel.local) == []
    assert await quiet(channel.peer) == []  # only the new local port is set pending


def test_bind_to_unknown_domain_is_refused(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        with pytest.raises(BrokerError) as caught:
            handle.bind_interdomain(domains.unknown_domid, 1)
    assert caught.value.errno == errno.ESRCH


def test_interdomain_bind_to_a_connected_port_is_einval(channel: Channel, domains: Domains) -> None:
    with domains.local.open_evtchn() as other:
        with pytest.raises(BrokerError) as caught:
            other.bind_interdomain(domains.peer.domid, channel.peer_port)
    assert caught.value.errno == errno.EINVAL


def test_bind_virq_beyond_nr_virqs_is_einval(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        with pytest.raises(BrokerError) as caught:
            handle.bind_virq(NR_VIRQS)
    assert caught.value.errno == errno.EINVAL


def test_bind_virq_twice_is_eexist(domains: Domains) -> None:
    with domains.local.open_evtchn() as first, domains.local.open_evtchn() as second:
        try:
            first.bind_virq(VIRQ_ENOMEM)
        except BrokerError as exc:
            if exc.errno == errno.EEXIST:
                pytest.skip(f"VIRQ {VIRQ_ENOMEM} is already bound on this host")
            raise
        with pytest.raises(BrokerError) as caught:
            second.bind_virq(VIRQ_ENOMEM)
    assert caught.value.errno == errno.EEXIST


def test_unbinding_a_virq_frees_it_for_binding_again(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        try:
            port = handle.bind_virq(VIRQ_ENOMEM)
        except BrokerError as exc:
            if exc.errno == errno.EEXIST:
                pytest.skip(f"VIRQ {VIRQ_ENOMEM} is already bound on this host")
            raise
        handle.unbind(port)
        handle.unbind(handle.bind_virq(VIRQ_ENOMEM))


# --------------------------------------------------------------------------- delivery


async def test_notify_reaches_remote_end_and_fd_becomes_readable(channel: Channel) -> None:
    await channel.drained()
    channel.peer.notify(channel.peer_port)
    await wait_readable(channel.local.fileno())
    assert channel.local.read_pending() == [channel.local_port]


async def test_fired_port_stays_masked_until_unmask(channel: Channel) -> None:
    await channel.drained()
    channel.local.notify(channel.local_port)
    assert await fired(channel.peer) == [channel.peer_port]

    channel.local.notify(channel.local_port)
    assert await quiet(channel.peer) == []


async def test_notifications_coalesce_while_masked(channel: Channel) -> None:
    await channel.drained()
    channel.local.notify(channel.local_port)
    assert await fired(channel.peer) == [channel.peer_port]

    for _ in range(3):
        channel.local.notify(channel.local_port)
    channel.peer.unmask(channel.peer_port)
    # Xen kept one pending bit while the port was masked: one delivery on unmask.
    assert await fired(channel.peer) == [channel.peer_port]
    assert await quiet(channel.peer) == []


async def test_unmask_without_new_notification_delivers_nothing(channel: Channel) -> None:
    await channel.drained()
    channel.local.notify(channel.local_port)
    assert await fired(channel.peer) == [channel.peer_port]

    channel.peer.unmask(channel.peer_port)
    assert await quiet(channel.peer) == []


async def test_unmasked_port_fires_again(channel: Channel) -> None:
    await channel.drained()
    channel.local.notify(channel.local_port)
    assert await fired(channel.peer) == [channel.peer_port]
    channel.peer.unmask(channel.peer_port)

    channel.local.notify(channel.local_port)
    assert await fired(channel.peer) == [channel.peer_port]


def test_unmask_of_a_port_not_bound_here_is_ignored(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        handle.unmask(1)


async def test_read_pending_never_blocks(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        assert os.get_blocking(handle.fileno()) is False
        async with asyncio.timeout(1.0):  # a blocking read would hang the loop past this
            assert handle.read_pending() == []
            assert handle.read_pending(1) == []


async def test_read_pending_returns_at_most_max_ports(domains: Domains) -> None:
    with domains.peer.open_evtchn() as peer, domains.local.open_evtchn() as local:
        offered = [peer.bind_unbound_port(domains.local.domid) for _ in range(2)]
        bound = {local.bind_interdomain(domains.peer.domid, port) for port in offered}  # each pending once
        await wait_readable(local.fileno())
        await asyncio.sleep(QUIET_PERIOD)  # let the second delivery land too
        first = local.read_pending(1)
        assert len(first) == 1
        assert set(first + local.read_pending()) == bound


# --------------------------------------------------------------------------- ownership


def test_unbind_unknown_port_is_enotconn(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        with pytest.raises(BrokerError) as caught:
            handle.unbind(1)
    assert caught.value.errno == errno.ENOTCONN


def test_unbind_beyond_the_event_array_is_einval(domains: Domains) -> None:
    # Linux checks the port against xen_evtchn_nr_channels(): under the FIFO
    # ABI the domain's event array, one page (1024 ports) until a port beyond
    # it is bound.  Seen on Xen 4.17 + Linux 6.1: 1024 is EINVAL, not ENOTCONN.
    first_beyond = 1024
    with domains.local.open_evtchn() as handle:
        probe = handle.bind_unbound_port(domains.peer.domid)
        handle.unbind(probe)
        if probe >= first_beyond:
            pytest.skip(f"this domain already uses port {probe}: its event array is larger")
        with pytest.raises(BrokerError) as caught:
            handle.unbind(first_beyond)
    assert caught.value.errno == errno.EINVAL


def test_notify_unbound_port_is_enotconn(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        with pytest.raises(BrokerError) as caught:
            handle.notify(1)
    assert caught.value.errno == errno.ENOTCONN


def test_notify_port_of_another_handle_is_enotconn(channel: Channel, domains: Domains) -> None:
    with domains.peer.open_evtchn() as other:
        with pytest.raises(BrokerError) as caught:
            other.notify(channel.peer_port)
    assert caught.value.errno == errno.ENOTCONN


# --------------------------------------------------------------------------- closing


def test_unbind_makes_remote_port_bindable_again(channel: Channel, domains: Domains) -> None:
    channel.local.unbind(channel.local_port)
    # __evtchn_close: the remote end is unbound again, offered to the closer's domain.
    channel.local.unbind(channel.local.bind_interdomain(domains.peer.domid, channel.peer_port))


def test_closing_handle_makes_remote_port_bindable_again(channel: Channel, domains: Domains) -> None:
    channel.local.close()
    with domains.local.open_evtchn() as again:
        again.bind_interdomain(domains.peer.domid, channel.peer_port)


async def test_notify_after_remote_end_closed_is_silent(channel: Channel) -> None:
    await channel.drained()
    channel.local.close()
    channel.peer.notify(channel.peer_port)  # Xen drops sends on an unbound port
    assert await quiet(channel.peer) == []


async def test_handle_stays_bound_while_a_copy_of_its_fd_is_open(channel: Channel, domains: Domains) -> None:
    await channel.drained()
    copy = os.dup(channel.local.fileno())
    try:
        channel.local.close()
        channel.peer.notify(channel.peer_port)
        await wait_readable(copy)
        assert int.from_bytes(os.read(copy, 4), sys.byteorder) == channel.local_port
    finally:
        os.close(copy)
    # The last copy is gone: the handle was released and its port closed.
    with domains.local.open_evtchn() as again:
        again.bind_interdomain(domains.peer.domid, channel.peer_port)


async def test_reset_discards_fired_ports_but_keeps_them_masked(channel: Channel) -> None:
    await channel.drained()
    channel.local.notify(channel.local_port)
    await wait_readable(channel.peer.fileno())
    channel.peer.reset()
    assert await quiet(channel.peer) == []

    channel.local.notify(channel.local_port)  # the port is still masked: only pending
    assert await quiet(channel.peer) == []
    channel.peer.unmask(channel.peer_port)
    assert await fired(channel.peer) == [channel.peer_port]


async def test_unbind_leaves_an_already_fired_port_in_the_queue(channel: Channel, domains: Domains) -> None:
    # Linux evtchn_unbind_from_user does not touch the ring: the bind's event
    # is read after the unbind, and a new channel that gets the same number
    # fires on top of it.  (Why the broker's reader must forget it: below.)
    await wait_readable(channel.local.fileno())
    channel.local.unbind(channel.local_port)
    again = channel.local.bind_interdomain(domains.peer.domid, channel.peer_port)
    assert await fired_count(channel.local, 2) == [channel.local_port, again]


# --------------------------------------------------------------------------- the broker's reader on this device
#
# The broker reads each handle through one EventFanout (grant_broker.core.events)
# and tells it of every unbind after the device's.  Since the device keeps
# an unbound port's event queued (above), the fan-out drains the queue and
# forgets the port: nothing of the old channel is handed out afterwards, in
# particular not as an event of a new channel that reuses the number.


async def next_fanout_event(subscription: Subscription) -> FanoutEvent:
    return await asyncio.wait_for(anext(subscription), DELIVERY_TIMEOUT)


async def quiet_subscription(subscription: Subscription) -> list[FanoutEvent]:
    """What *subscription* received after a short grace period (expected: nothing)."""
    await asyncio.sleep(QUIET_PERIOD)
    events: list[FanoutEvent] = []
    while (event := subscription.get_nowait()) is not None:
        events.append(event)
    return events


async def until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(DELIVERY_TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.005)
    assert predicate(), what


async def test_broker_reader_drops_the_event_of_an_unbound_port_it_had_not_read(
    channel: Channel, domains: Domains
) -> None:
    await wait_readable(channel.local.fileno())  # the bind's event is queued in the device
    fanout = EventFanout(channel.local, EventHub())
    try:
        # Unbound before the reader ran: the event is still in the device's queue.
        channel.local.unbind(channel.local_port)
        fanout.forget_port(channel.local_port)
        again = channel.local.bind_interdomain(domains.peer.domid, channel.peer_port)
        with fanout.subscribe() as subscription:
            assert await next_fanout_event(subscription) == Fired(again)  # the new channel's own event
            assert await quiet_subscription(subscription) == []
    finally:
        fanout.close()


async def test_broker_reader_drops_the_event_of_an_unbound_port_queued_for_a_subscriber(
    channel: Channel, domains: Domains
) -> None:
    fanout = EventFanout(channel.local, EventHub())
    try:
        with fanout.subscribe() as subscription:
            await until(lambda: fanout.events_read == 1, "the bind's event was read")  # queued, not taken
            channel.local.unbind(channel.local_port)
            fanout.forget_port(channel.local_port)
            again = channel.local.bind_interdomain(domains.peer.domid, channel.peer_port)
            assert await next_fanout_event(subscription) == Fired(again)
            assert await quiet_subscription(subscription) == []
    finally:
        fanout.close()


# --------------------------------------------------------------------------- restriction


def test_restrict_to_domain_0_is_einval(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        with pytest.raises(BrokerError) as caught:
            handle.restrict_domid(0)
    assert caught.value.errno == errno.EINVAL


def test_restrict_to_reserved_domain_is_einval(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        with pytest.raises(BrokerError) as caught:
            handle.restrict_domid(DOMID_FIRST_RESERVED)
    assert caught.value.errno == errno.EINVAL


def test_restrict_twice_is_eacces(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        handle.restrict_domid(domains.unknown_domid)
        with pytest.raises(BrokerError) as caught:
            handle.restrict_domid(domains.unknown_domid)
    assert caught.value.errno == errno.EACCES


def test_restricted_handle_refuses_interdomain_bind_to_other_domains(domains: Domains) -> None:
    with domains.peer.open_evtchn() as peer, domains.local.open_evtchn() as local:
        offered = peer.bind_unbound_port(domains.local.domid)
        local.restrict_domid(domains.unknown_domid)
        with pytest.raises(BrokerError) as caught:
            local.bind_interdomain(domains.peer.domid, offered)
    assert caught.value.errno == errno.EACCES


def test_restricted_handle_refuses_unbound_ports(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        handle.restrict_domid(domains.unknown_domid)
        with pytest.raises(BrokerError) as caught:
            handle.bind_unbound_port(domains.peer.domid)
    assert caught.value.errno == errno.EACCES


def test_restricted_handle_refuses_virqs(domains: Domains) -> None:
    with domains.local.open_evtchn() as handle:
        handle.restrict_domid(domains.unknown_domid)
        with pytest.raises(BrokerError) as caught:
            handle.bind_virq(VIRQ_ENOMEM)
    assert caught.value.errno == errno.EACCES


def test_restricted_handle_binds_to_its_domain(domains: Domains) -> None:
    if domains.peer.domid == 0:
        pytest.skip("the peer is domain 0, which a handle cannot be restricted to")
    with domains.peer.open_evtchn() as peer, domains.local.open_evtchn() as local:
        offered = peer.bind_unbound_port(domains.local.domid)
        local.restrict_domid(domains.peer.domid)
        local.bind_interdomain(domains.peer.domid, offered)


async def test_restricted_handle_keeps_its_bound_ports(channel: Channel, domains: Domains) -> None:
    await channel.drained()
    channel.local.restrict_domid(domains.unknown_domid)
    channel.local.notify(channel.local_port)
    assert await fired(channel.peer) == [channel.peer_port]
