"""EventFanout without gRPC: one reader of a real evtchn handle, many subscribers.

The handles come from the emulated hypervisor: real non-blocking pipes that
carry native uint32 port numbers, with Xen's masking and pending-bit rules,
so "the port fired" below is a real readable descriptor and a real read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest

from grant_broker.backend.contract import EvtchnHandle
from grant_broker_protocol.errors import BrokerError
from grant_broker.core.events import (
    DEFAULT_QUEUE_SIZE,
    EVENTS_PER_TURN,
    EventFanout,
    EventHub,
    FanoutClosed,
    Fired,
    Lost,
    PortUnbound,
    Subscription,
)
from grant_broker.core.observe import NO_RECORDER
from grant_broker.transport.fastevents import SUBSCRIPTIONS_PER_FRAME, FastEvents
from grant_broker_protocol.v1 import evtchn_pb2
from grant_broker_protocol.v1.fdchannel_pb2 import FdFrame

TIMEOUT = 5.0


# --------------------------------------------------------------------------- fixtures


class _Hypervisor:
    """The part of the emulated hypervisor an event-channel hub needs."""

    def __init__(self) -> None:
        from grant_broker.backend.emulated.evtchn import EventChannelHub

        self.events = EventChannelHub(self)

    def domain_exists(self, domid: int) -> bool:
        return domid in (1, 2)


@dataclass
class Channel:
    """An interdomain channel: domain 1's *local* handle receives on *port*;
    domain 2's *peer* handle sends on *peer_port*."""

    local: EvtchnHandle
    peer: EvtchnHandle
    port: int
    peer_port: int

    def fire(self) -> None:
        self.peer.notify(self.peer_port)


def _drain_initial(handle: EvtchnHandle, port: int) -> None:
    # BIND_INTERDOMAIN leaves the new port pending once (Xen does that so that
    # nothing sent before the bind is lost): drain it so tests count only
    # their own notifications.
    assert handle.read_pending() == [port]
    handle.unmask(port)


def _connect(local: EvtchnHandle, peer: EvtchnHandle) -> Channel:
    peer_port = peer.bind_unbound_port(1)
    port = local.bind_interdomain(2, peer_port)
    return Channel(local, peer, port, peer_port)


@pytest.fixture
def hypervisor(fd_baseline: None) -> Iterator[_Hypervisor]:
    hv = _Hypervisor()
    try:
        yield hv
    finally:
        hv.events.close()


@pytest.fixture
def handles(hypervisor: _Hypervisor) -> Iterator[tuple[EvtchnHandle, EvtchnHandle]]:
    from grant_broker.backend.emulated.evtchn import EmulatedEvtchnHandle

    with EmulatedEvtchnHandle(hypervisor, 1) as local, EmulatedEvtchnHandle(hypervisor, 2) as peer:
        yield local, peer


@pytest.fixture
def channel(handles: tuple[EvtchnHandle, EvtchnHandle]) -> Channel:
    chan = _connect(*handles)
    _drain_initial(chan.local, chan.port)
    return chan


@pytest.fixture
def hub() -> EventHub:
    return EventHub()


@pytest.fixture
async def fanout(handles: tuple[EvtchnHandle, EvtchnHandle], hub: EventHub) -> AsyncIterator[EventFanout]:
    fan = EventFanout(handles[0], hub, name="test")
    try:
        yield fan
    finally:
        fan.close()


async def next_event(subscription: Subscription) -> Fired | Lost:
    return await asyncio.wait_for(anext(subscription), TIMEOUT)


async def settle() -> None:
    """Let the loop run the fan-out's reader for what was just sent."""
    for _ in range(5):
        await asyncio.sleep(0)


def _reader_registered(fd: int) -> bool:
    loop = asyncio.get_running_loop()
    selector = getattr(loop, "_selector", None)
    if selector is None:
        pytest.skip("the loop does not expose its selector")
    try:
        key = selector.get_key(fd)
    except KeyError:
        return False
    return bool(key.events & 1)  # EVENT_READ


# --------------------------------------------------------------------------- delivery


async def test_fired_port_reaches_subscriber_and_auto_unmask_rearms(channel: Channel, fanout: EventFanout) -> None:
    with fanout.subscribe() as subscription:
        channel.fire()
        assert await next_event(subscription) == Fired(channel.port)
        # Auto-unmask: the port was unmasked once queued, so it fires again.
        channel.fire()
        assert await next_event(subscription) == Fired(channel.port)
        await settle()
        assert subscription.get_nowait() is None


async def test_without_auto_unmask_notifications_coalesce_until_unmask(channel: Channel, fanout: EventFanout) -> None:
    with fanout.subscribe(auto_unmask=False) as subscription:
        channel.fire()
        assert await next_event(subscription) == Fired(channel.port)
        for _ in range(5):
            channel.fire()  # masked: Xen keeps one pending bit
        await settle()
        assert subscription.get_nowait() is None
        channel.local.unmask(channel.port)  # the pending bit is delivered now, once
        assert await next_event(subscription) == Fired(channel.port)
        await settle()
        assert subscription.get_nowait() is None


async def test_ports_filter(handles: tuple[EvtchnHandle, EvtchnHandle], fanout: EventFanout) -> None:
    a = _connect(*handles)
    b = _connect(*handles)
    await settle()
    assert fanout.pending_ports == (a.port, b.port)
    with fanout.subscribe(ports=[a.port]) as only_a, fanout.subscribe() as everything:
        # The binds' initial events were pending before anyone subscribed: the
        # first subscription covering them took them, once.
        assert await next_event(only_a) == Fired(a.port)
        assert await next_event(everything) == Fired(b.port)
        b.fire()
        a.fire()
        assert await next_event(everything) == Fired(b.port)
        assert await next_event(everything) == Fired(a.port)
        assert await next_event(only_a) == Fired(a.port)
        await settle()
        assert only_a.get_nowait() is None


async def test_fired_before_subscribe_is_pending_once_for_the_next_subscriber(
    channel: Channel, fanout: EventFanout
) -> None:
    channel.fire()
    await settle()
    assert fanout.pending_ports == (channel.port,)
    # Nobody listened: the port stays masked, so more notifications coalesce.
    channel.fire()
    channel.fire()
    await settle()
    assert fanout.events_read == 1
    with fanout.subscribe() as first:
        assert fanout.pending_ports == ()
        assert await next_event(first) == Fired(channel.port)
        # Delivery unmasked the port, and Xen delivers the pending bit the
        # coalesced notifications left: one more event, not two.
        assert await next_event(first) == Fired(channel.port)
        with fanout.subscribe() as second:
            await settle()
            assert first.get_nowait() is None
            assert second.get_nowait() is None
            assert fanout.events_read == 2


async def test_interdomain_initial_event_delivered_once(
    handles: tuple[EvtchnHandle, EvtchnHandle], fanout: EventFanout
) -> None:
    with fanout.subscribe() as subscription:
        chan = _connect(*handles)
        assert await next_event(subscription) == Fired(chan.port)
        await settle()
        assert subscription.get_nowait() is None


async def test_the_subscribers_of_a_fanout_take_a_bounded_number_of_events_per_loop_turn(
    channel: Channel, fanout: EventFanout, hub: EventHub
) -> None:
    # One session's subscribers share EVENTS_PER_TURN per turn of the loop:
    # whatever they do with their events, the rest of the loop gets its turns.
    loop = asyncio.get_running_loop()
    subscriptions = [fanout.subscribe() for _ in range(64)]
    per_turn: list[int] = []
    last = hub.taken

    def probe() -> None:
        nonlocal last
        per_turn.append(hub.taken - last)
        last = hub.taken
        if len(per_turn) < 200:
            loop.call_soon(probe)

    try:
        loop.call_soon(probe)
        channel.fire()
        events = await asyncio.gather(*(next_event(s) for s in subscriptions))
        assert set(events) == {Fired(channel.port)}  # every one of them, in turn
        assert sum(per_turn) + hub.taken - last == 64
        assert max(per_turn) <= 2 * EVENTS_PER_TURN, per_turn
        assert len([n for n in per_turn if n]) >= 64 // (2 * EVENTS_PER_TURN)
    finally:
        for subscription in subscriptions:
            subscription.close()


async def test_a_thousand_subscribers_each_get_every_event(channel: Channel, fanout: EventFanout) -> None:
    subscriptions = [fanout.subscribe() for _ in range(1000)]
    try:
        assert fanout.subscriber_count == 1000
        for _ in range(3):
            channel.fire()
            events = await asyncio.gather(*(next_event(s) for s in subscriptions))
            assert set(events) == {Fired(channel.port)}
        # One read per notification, however many subscribers.
        assert fanout.events_read == 3
    finally:
        for subscription in subscriptions:
            subscription.close()
    assert fanout.subscriber_count == 0


def _channels(handles: tuple[EvtchnHandle, EvtchnHandle], count: int) -> list[Channel]:
    """*count* more channels, their initial events drained (call before the loop runs the reader)."""
    channels = []
    for _ in range(count):
        channels.append(_connect(*handles))
        _drain_initial(handles[0], channels[-1].port)
    return channels


async def test_slow_subscriber_loses_events_and_others_do_not(
    handles: tuple[EvtchnHandle, EvtchnHandle], fanout: EventFanout
) -> None:
    channels = _channels(handles, 10)
    with fanout.subscribe(queue_size=2) as slow, fanout.subscribe() as fast:
        for chan in channels:
            chan.fire()
            assert await next_event(fast) == Fired(chan.port)
        # The slow one kept the first two ports and lost the other eight.
        assert slow.lost_total == 8
        assert await next_event(slow) == Fired(channels[0].port)
        assert await next_event(slow) == Fired(channels[1].port)
        await settle()
        assert slow.get_nowait() is None
        channels[5].fire()
        assert await next_event(fast) == Fired(channels[5].port)
        # Lost is reported right before the next delivered event.
        assert await next_event(slow) == Lost(8)
        assert await next_event(slow) == Fired(channels[5].port)


async def test_a_port_that_fires_again_while_queued_is_heard_once(channel: Channel, fanout: EventFanout) -> None:
    with fanout.subscribe() as slow:
        channel.fire()  # queued, unmasked
        await settle()
        channel.fire()  # read, and coalesced into the queued event: the port is held masked
        await settle()
        for _ in range(1000):
            channel.fire()  # coalesces in the device while masked: the broker reads nothing
        await settle()
        assert (fanout.events_read, slow.lost_total) == (2, 0)
        assert await next_event(slow) == Fired(channel.port)  # taken: the port is unmasked
        assert await next_event(slow) == Fired(channel.port)  # the device's pending bit, once
        await settle()
        assert slow.get_nowait() is None
        assert (fanout.events_read, slow.lost_total) == (3, 0)


async def test_full_lone_subscriber_holds_port_masked_until_it_reads(
    handles: tuple[EvtchnHandle, EvtchnHandle], channel: Channel, fanout: EventFanout
) -> None:
    (other,) = _channels(handles, 1)
    with fanout.subscribe(queue_size=1) as slow:
        channel.fire()  # queued, unmasked
        await settle()
        other.fire()  # read, dropped (queue full): the port is held masked
        await settle()
        other.fire()  # coalesces in the device while masked
        other.fire()
        await settle()
        assert fanout.events_read == 2
        assert slow.lost_total == 1
        assert await next_event(slow) == Fired(channel.port)  # room made: the held port is unmasked
        assert await next_event(slow) == Lost(1)
        assert await next_event(slow) == Fired(other.port)  # the coalesced pending bit
        await settle()
        assert slow.get_nowait() is None


async def test_unmask_left_to_manual_subscribers_when_all_want_manual(channel: Channel, fanout: EventFanout) -> None:
    with fanout.subscribe(auto_unmask=False) as manual:
        channel.fire()
        assert await next_event(manual) == Fired(channel.port)
        with fanout.subscribe() as auto:
            # A manual subscriber's delivery did not unmask; the auto one
            # arrived later, so nothing fires until someone unmasks.
            channel.fire()
            await settle()
            assert auto.get_nowait() is None
            channel.local.unmask(channel.port)
            assert await next_event(auto) == Fired(channel.port)
            assert await next_event(manual) == Fired(channel.port)
            # The auto subscriber took it, so the port was unmasked for everyone.
            channel.fire()
            assert await next_event(manual) == Fired(channel.port)


async def test_forget_port_drops_pending(channel: Channel, fanout: EventFanout) -> None:
    channel.fire()
    await settle()
    assert fanout.pending_ports == (channel.port,)
    channel.local.unbind(channel.port)
    fanout.forget_port(channel.port)
    assert fanout.pending_ports == ()


# --------------------------------------------------------------------------- unbind


def _unbind(channel: Channel, fanout: EventFanout) -> None:
    """What the Evtchn service does on Unbind: the device first, then the fan-out."""
    channel.local.unbind(channel.port)
    fanout.forget_port(channel.port)


async def test_subscription_to_an_unbound_port_ends_with_port_unbound(channel: Channel, fanout: EventFanout) -> None:
    subscription = fanout.subscribe(ports=[channel.port])
    waiter = asyncio.create_task(anext(subscription))
    await settle()
    _unbind(channel, fanout)
    with pytest.raises(PortUnbound) as raised:
        await asyncio.wait_for(waiter, TIMEOUT)
    assert raised.value.port == channel.port
    assert subscription.closed and fanout.subscriber_count == 0
    with pytest.raises(PortUnbound):  # ended for good, for the same reason
        await next_event(subscription)


async def test_subscription_to_an_unbound_port_never_hears_a_new_channel_on_its_number(
    handles: tuple[EvtchnHandle, EvtchnHandle], channel: Channel, fanout: EventFanout
) -> None:
    subscription = fanout.subscribe(ports=[channel.port])
    _unbind(channel, fanout)
    again = _connect(*handles)  # fires once, as every new interdomain port does
    assert again.port == channel.port  # Xen hands out the lowest free port
    with pytest.raises(PortUnbound):
        await next_event(subscription)


async def test_subscription_to_all_ports_survives_an_unbind(
    handles: tuple[EvtchnHandle, EvtchnHandle], channel: Channel, fanout: EventFanout
) -> None:
    other = _connect(*handles)
    with fanout.subscribe() as everything:
        assert await next_event(everything) == Fired(other.port)  # its bind's own event
        _unbind(channel, fanout)
        other.fire()
        assert await next_event(everything) == Fired(other.port)
        again = _connect(*handles)  # a new channel on the old number is a port like any other
        assert await next_event(everything) == Fired(again.port)
        assert not everything.closed


async def test_queued_event_of_an_unbound_port_is_dropped(
    handles: tuple[EvtchnHandle, EvtchnHandle], channel: Channel, fanout: EventFanout
) -> None:
    other = _connect(*handles)
    with fanout.subscribe() as everything:
        await settle()  # other's bind event is queued
        channel.fire()
        await settle()  # and then channel's
        _unbind(channel, fanout)
        assert await next_event(everything) == Fired(other.port)
        await settle()
        assert everything.get_nowait() is None


async def test_subscription_ended_by_unbind_first_delivers_what_it_queued_of_its_other_ports(
    handles: tuple[EvtchnHandle, EvtchnHandle], channel: Channel, fanout: EventFanout
) -> None:
    other = _connect(*handles)
    with fanout.subscribe(ports=[channel.port, other.port]) as both:
        await settle()  # other's bind event is queued
        channel.fire()
        await settle()
        _unbind(channel, fanout)
        assert await next_event(both) == Fired(other.port)
        with pytest.raises(PortUnbound):
            await next_event(both)


async def test_unbind_drops_an_event_still_in_the_handles_queue(
    handles: tuple[EvtchnHandle, EvtchnHandle], fanout: EventFanout
) -> None:
    chan = _connect(*handles)  # its bind event is in the device's queue; the reader has not run yet
    _unbind(chan, fanout)
    again = _connect(*handles)
    assert again.port == chan.port
    with fanout.subscribe() as subscription:
        assert await next_event(subscription) == Fired(again.port)  # the new channel's own event, once
        await settle()
        assert subscription.get_nowait() is None


async def test_loss_reported_with_a_dropped_event_moves_to_the_next_event(
    handles: tuple[EvtchnHandle, EvtchnHandle], channel: Channel, fanout: EventFanout
) -> None:
    (other,) = _channels(handles, 1)
    with fanout.subscribe(queue_size=1) as slow:
        other.fire()
        await settle()  # queued
        channel.fire()
        await settle()  # the queue is full: lost (and the port held masked)
        assert await next_event(slow) == Fired(other.port)
        await settle()  # room made: the held port's pending event is queued, carrying the loss
        _unbind(channel, fanout)
        other.fire()
        assert await next_event(slow) == Lost(1)
        assert await next_event(slow) == Fired(other.port)


# --------------------------------------------------------------------------- the hub


async def test_deliveries_are_counted_per_hub(channel: Channel, fanout: EventFanout, hub: EventHub) -> None:
    elsewhere = EventHub()
    with fanout.subscribe() as subscription:
        before = hub.deliveries
        channel.fire()
        assert await next_event(subscription) == Fired(channel.port)
        assert hub.deliveries == before + 1
    assert elsewhere.deliveries == 0


# --------------------------------------------------------------------------- life


async def test_close_ends_subscriptions_cleanly_and_removes_the_reader(
    channel: Channel, handles: tuple[EvtchnHandle, EvtchnHandle]
) -> None:
    local = handles[0]
    hub = EventHub()
    fan = EventFanout(local, hub)
    assert _reader_registered(local.fileno())
    subscriptions = [fan.subscribe(queue_size=1) for _ in range(3)]
    channel.fire()
    channel.fire()  # the second is dropped: queues of 1 stay full

    async def consume(subscription: Subscription) -> list[Fired | Lost]:
        return [event async for event in subscription]

    await settle()
    consumers = [asyncio.create_task(consume(s)) for s in subscriptions]
    await settle()
    fan.close()
    results = await asyncio.wait_for(asyncio.gather(*consumers), TIMEOUT)
    assert all(result and result[0] == Fired(channel.port) for result in results)
    assert not _reader_registered(local.fileno())
    assert fan.subscriber_count == 0
    with pytest.raises(FanoutClosed):
        fan.subscribe()
    fan.close()  # idempotent
    # The handle is free for a new reader.
    EventFanout(local, hub).close()


async def test_close_wakes_a_subscriber_waiting_on_an_empty_queue(fanout: EventFanout) -> None:
    subscription = fanout.subscribe()
    waiter = asyncio.create_task(anext(subscription))
    await settle()
    fanout.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, TIMEOUT)


async def test_one_reader_per_handle(handles: tuple[EvtchnHandle, EvtchnHandle], fanout: EventFanout) -> None:
    with pytest.raises(RuntimeError, match="already has a reader"):
        EventFanout(handles[0], fanout.hub)


async def test_subscription_context_managers_unregister(fanout: EventFanout) -> None:
    async with fanout.subscribe(ports=[5, 6]) as subscription:
        assert fanout.subscriber_count == 1
    assert fanout.subscriber_count == 0
    assert subscription.closed
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)
    subscription.close()  # idempotent


async def test_cancelled_consumer_leaves_no_trace(channel: Channel, fanout: EventFanout) -> None:
    subscription = fanout.subscribe()
    waiter = asyncio.create_task(anext(subscription))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # Still usable after a cancelled wait: nothing was consumed by it.
    channel.fire()
    assert await next_event(subscription) == Fired(channel.port)
    subscription.close()
    assert fanout.subscriber_count == 0


async def test_queue_size_bounds(fanout: EventFanout) -> None:
    with fanout.subscribe() as default:
        assert default.queue_size == DEFAULT_QUEUE_SIZE
    with pytest.raises(ValueError):
        fanout.subscribe(queue_size=-1)
    with pytest.raises(ValueError):
        fanout.subscribe(queue_size=10**9)


# --------------------------------------------------------------------------- device failures


class FaultyHandle(EvtchnHandle):
    """A real emulated handle whose next read fails with *fail_with*."""

    def __init__(self, inner: EvtchnHandle) -> None:
        self.inner = inner
        self.fail_with: BaseException | None = None
        self.resets = 0

    def fileno(self) -> int:
        return self.inner.fileno()

    def read_pending(self, max_ports: int = 256) -> list[int]:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return self.inner.read_pending(max_ports)

    def reset(self) -> None:
        self.resets += 1
        self.inner.reset()

    def bind_unbound_port(self, remote_domain: int) -> int:
        return self.inner.bind_unbound_port(remote_domain)

    def bind_interdomain(self, remote_domain: int, remote_port: int) -> int:
        return self.inner.bind_interdomain(remote_domain, remote_port)

    def bind_virq(self, virq: int) -> int:
        return self.inner.bind_virq(virq)

    def unbind(self, port: int) -> None:
        self.inner.unbind(port)

    def notify(self, port: int) -> None:
        self.inner.notify(port)

    def unmask(self, port: int) -> None:
        self.inner.unmask(port)

    def restrict_domid(self, domid: int) -> None:
        self.inner.restrict_domid(domid)

    def close(self) -> None:
        self.inner.close()


async def test_read_failure_ends_subscriptions_with_the_error(channel: Channel) -> None:
    faulty = FaultyHandle(channel.local)
    fan = EventFanout(faulty, EventHub())
    try:
        subscription = fan.subscribe()
        faulty.fail_with = BrokerError(errno.EIO, "evtchn read", "device gone")
        channel.fire()
        with pytest.raises(BrokerError) as raised:
            await next_event(subscription)
        assert raised.value.errno == errno.EIO
        assert fan.closed and fan.error is not None
        assert not _reader_registered(faulty.fileno())
    finally:
        fan.close()


async def test_ring_overflow_reports_every_bound_port(handles: tuple[EvtchnHandle, EvtchnHandle]) -> None:
    a = _connect(*handles)
    _drain_initial(handles[0], a.port)
    b = _connect(*handles)
    _drain_initial(handles[0], b.port)
    faulty = FaultyHandle(handles[0])
    fan = EventFanout(faulty, EventHub(), bound_ports=lambda: [a.port, b.port])
    try:
        faulty.fail_with = BrokerError(errno.EFBIG, "evtchn read", "the event ring overflowed")
        with fan.subscribe() as subscription:
            a.fire()  # readable now; the read fails with EFBIG
            events = {await next_event(subscription), await next_event(subscription)}
            assert events == {Fired(a.port), Fired(b.port)}
            assert faulty.resets == 1 and fan.overflows == 1
            assert not fan.closed
            # Auto-unmask re-armed both ports.
            b.fire()
            assert await next_event(subscription) == Fired(b.port)
    finally:
        fan.close()


# --------------------------------------------------------------------------- uvloop


def test_fanout_on_uvloop() -> None:
    """The daemon runs on uvloop: the same reader life on libuv's poll handles."""
    uvloop = pytest.importorskip("uvloop")
    from grant_broker.backend.emulated.evtchn import EmulatedEvtchnHandle
    from grant_broker_protocol.fds import open_fd_count

    # libuv keeps a couple of process-wide descriptors once any loop ran, so
    # count after a first loop rather than with the fd_baseline fixture.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.sleep(0))
    gc.collect()
    before = open_fd_count()
    hypervisor = _Hypervisor()

    async def scenario() -> None:
        with EmulatedEvtchnHandle(hypervisor, 1) as local, EmulatedEvtchnHandle(hypervisor, 2) as peer:
            chan = _connect(local, peer)
            hub = EventHub()
            fan = EventFanout(local, hub)
            try:
                subscriptions = [fan.subscribe() for _ in range(100)]
                slow = fan.subscribe(queue_size=1)
                events = await asyncio.gather(*(next_event(s) for s in subscriptions))
                assert set(events) == {Fired(chan.port)}  # the bind's initial event
                for _ in range(3):
                    chan.fire()
                    events = await asyncio.gather(*(next_event(s) for s in subscriptions))
                    assert set(events) == {Fired(chan.port)}
                # The slow one never read: the port stayed queued for it once,
                # coalesced, and nothing was lost.
                assert (slow.lost_total, slow.get_nowait()) == (0, Fired(chan.port))
                waiter = asyncio.create_task(anext(subscriptions[0]))
                await settle()
            finally:
                fan.close()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiter, TIMEOUT)
            # A new reader can take the descriptor over: the old one is gone.
            again = EventFanout(local, hub)
            with again.subscribe() as subscription:
                chan.fire()
                assert await next_event(subscription) == Fired(chan.port)
            again.close()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    finally:
        hypervisor.events.close()
    gc.collect()
    assert open_fd_count() == before


async def test_held_port_is_unmasked_when_its_full_subscriber_leaves(channel: Channel, fanout: EventFanout) -> None:
    slow = fanout.subscribe(queue_size=1)
    channel.fire()
    await settle()
    channel.fire()  # coalesced for the subscriber that has not taken it: held masked
    await settle()
    channel.fire()
    await settle()
    assert fanout.events_read == 2  # masked: the device coalesced the third
    slow.close()
    with fanout.subscribe() as later:
        channel.fire()
        assert await next_event(later) == Fired(channel.port)


# --------------------------------------------------------------------------- as fast-path frames (FastEvents)


class _FrameSink:
    """The fd channel of a fake session: keeps what is sent; `hold` makes
    sends wait, as a socket the client does not read would."""

    closed = False

    def __init__(self) -> None:
        self.frames: list[FdFrame] = []
        self.open = asyncio.Event()
        self.open.set()

    async def send(self, frame: FdFrame, fds: object = ()) -> None:
        await self.open.wait()
        self.frames.append(FdFrame.FromString(frame.SerializeToString()))

    def send_nowait(self, frame: FdFrame) -> bool:
        self.frames.append(frame)
        return True

    def events(self) -> list[FdFrame]:
        return [frame for frame in self.frames if frame.WhichOneof("body") == "events"]


class _FakeSession:
    id = 1
    log_fields: dict[str, object] = {}

    def __init__(self) -> None:
        self.channel = _FrameSink()
        self.closed = asyncio.Event()


def _opener(fanout: EventFanout, opened: list[Subscription]) -> Callable[[object, evtchn_pb2.SubscribeRequest], Iterator[Subscription]]:
    @contextlib.contextmanager
    def open_subscription(session: object, request: evtchn_pb2.SubscribeRequest) -> Iterator[Subscription]:
        with fanout.subscribe(request.ports, queue_size=request.queue_size) as subscription:
            opened.append(subscription)
            yield subscription

    return open_subscription


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail("the condition did not come true")


async def test_fast_events_send_a_fan_out_as_frames_of_at_most_256_subscriptions(channel: Channel, fanout: EventFanout) -> None:
    session = _FakeSession()
    events = FastEvents(session)  # type: ignore[arg-type]
    opened: list[Subscription] = []
    ids = list(range(1, 601))
    try:
        for call_id in ids:
            events.subscribe(call_id, _opener(fanout, opened), evtchn_pb2.SubscribeRequest(ports=[channel.port]), NO_RECORDER)
        channel.fire()
        await _until(lambda: sum(len(f.events.fired[0].also_call_ids) + 1 for f in session.channel.events()) >= len(ids))
        frames = session.channel.events()
        assert len(frames) == 3  # 256 + 256 + 88
        taken = [[fired.call_id, *fired.also_call_ids] for frame in frames for fired in frame.events.fired]
        assert all(len(group) <= SUBSCRIPTIONS_PER_FRAME for group in taken)
        assert sorted(call_id for group in taken for call_id in group) == ids  # each subscription once
        assert {fired.port for frame in frames for fired in frame.events.fired} == {channel.port}
    finally:
        events.close()
    assert all(subscription.closed for subscription in opened)


async def test_fast_events_take_nothing_while_a_frame_waits_and_report_the_loss_before_the_next_event(
    handles: tuple[EvtchnHandle, EvtchnHandle], fanout: EventFanout
) -> None:
    first = _connect(*handles)
    _drain_initial(first.local, first.port)
    second = _connect(*handles)
    _drain_initial(second.local, second.port)
    session = _FakeSession()
    session.channel.open.clear()  # the client does not read: the subscription's reply waits
    events = FastEvents(session)  # type: ignore[arg-type]
    try:
        events.subscribe(7, _opener(fanout, []), evtchn_pb2.SubscribeRequest(queue_size=1), NO_RECORDER)
        first.fire()
        await settle()
        second.fire()  # no room: lost for this subscriber
        await settle()
        assert session.channel.frames == []
        session.channel.open.set()
        await _until(lambda: len(session.channel.events()) == 1)
        (frame,) = session.channel.events()
        assert [(f.call_id, f.port) for f in frame.events.fired] == [(7, first.port)] and not frame.events.lost
        second.fire()
        await _until(lambda: len(session.channel.events()) == 2)
        frame = session.channel.events()[1]
        assert [(lost.call_id, lost.count) for lost in frame.events.lost] == [(7, 1)]
        assert [(f.call_id, f.port) for f in frame.events.fired] == [(7, second.port)]
    finally:
        events.close()


async def test_fast_events_cancel_closes_the_subscription_and_ends_its_stream(channel: Channel, fanout: EventFanout) -> None:
    session = _FakeSession()
    events = FastEvents(session)  # type: ignore[arg-type]
    opened: list[Subscription] = []
    try:
        events.subscribe(3, _opener(fanout, opened), evtchn_pb2.SubscribeRequest(), NO_RECORDER)
        assert events.cancel(3) and not events.cancel(3)
        assert opened[0].closed and fanout.subscriber_count == 0
        await _until(lambda: any(f.WhichOneof("body") == "stream_end" for f in session.channel.frames))
        bodies = [frame.WhichOneof("body") for frame in session.channel.frames]
        assert bodies == ["reply", "stream_end"]  # the answer first, then the end
    finally:
        events.close()
