"""Event streams through real sockets: Subscribe, fan-out, loss, and the ends of streams.

Two sessions act as two domains of the emulated hypervisor.  Where a test
needs several ports to fire in the *same* read of the device (to overflow a
queue deterministically), it has domain 2's own handle in the broker notify
them back to back, without yielding to the loop in between.
"""

from __future__ import annotations

import asyncio
import errno

import grpc
import pytest

import grant_broker_client
from grant_broker_client import BrokerClientError
from grant_broker.core.operations.evtchn import FANOUT_KEY
from grant_broker.core.events import EventFanout, MAX_QUEUE_SIZE
from grant_broker.core.policy import Limits
from grant_broker.core.session import Session as BrokerSession
from grant_broker_client import Session
from grant_broker_client.evtchn import EventsLost, PortFired, PortUnbound

from waiting import eventually

from .conftest import InProcessBroker
from .evtchn_helpers import Pair, connect_pair, expect_error, next_event, nothing_more, two_domains

MAX_SUBSCRIPTIONS = 80


@pytest.fixture
def broker_limits() -> Limits:
    return Limits(max_subscriptions_per_session=MAX_SUBSCRIPTIONS)


def broker_side(broker: InProcessBroker, client: Session) -> BrokerSession:
    return next(s for s in broker.registry.sessions if s.id == client.session_id)


async def connected_pairs(one: Session, two: Session, count: int) -> list[Pair]:
    """*count* channels between the domains, their initial events already consumed."""
    async with one.evtchn.subscribe() as drain:
        pairs = [await connect_pair(one, two) for _ in range(count)]
        seen = {await next_event(drain) for _ in pairs}
    assert seen == {PortFired(p.client_port) for p in pairs}
    return pairs


# --------------------------------------------------------------------------- delivery


async def test_interdomain_initial_event_is_delivered_once(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        # Bound before anyone subscribed: pending until the first subscriber.
        early = await connect_pair(one, two)
        async with one.evtchn.subscribe() as first:
            assert await next_event(first) == PortFired(early.client_port)
            async with one.evtchn.subscribe() as second:
                # Bound while both listen: both hear it, once.
                late = await connect_pair(one, two)
                assert await next_event(first) == PortFired(late.client_port)
                assert await next_event(second) == PortFired(late.client_port)
                await nothing_more(first)
                await nothing_more(second)


async def test_masked_port_coalesces_until_unmasked(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        (pair,) = await connected_pairs(one, two, 1)
        async with one.evtchn.subscribe(ports=[pair.client_port], auto_unmask=False) as events:
            await two.evtchn.notify(pair.server_port)
            assert await next_event(events) == PortFired(pair.client_port)
            for _ in range(5):
                await two.evtchn.notify(pair.server_port)
            await nothing_more(events)  # masked: nothing fires
            await one.evtchn.unmask(pair.client_port)
            assert await next_event(events) == PortFired(pair.client_port)  # the five, as one
            await nothing_more(events)
            await one.evtchn.unmask(pair.client_port)
            await two.evtchn.notify(pair.server_port)
            assert await next_event(events) == PortFired(pair.client_port)


async def test_auto_unmask_fires_every_notification(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        (pair,) = await connected_pairs(one, two, 1)
        async with one.evtchn.subscribe(ports=[pair.client_port]) as events:
            for _ in range(20):
                await two.evtchn.notify(pair.server_port)
                assert await next_event(events) == PortFired(pair.client_port)


async def test_ports_filter_and_all_ports(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        a, b = await connected_pairs(one, two, 2)
        async with one.evtchn.subscribe(ports=[a.client_port]) as only_a, one.evtchn.subscribe() as every:
            await two.evtchn.notify(b.server_port)
            await two.evtchn.notify(a.server_port)
            assert await next_event(every) == PortFired(b.client_port)
            assert await next_event(every) == PortFired(a.client_port)
            assert await next_event(only_a) == PortFired(a.client_port)
            await nothing_more(only_a)


async def test_many_subscribers_on_one_session_all_receive_each_event(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        (pair,) = await connected_pairs(one, two, 1)
        subscriptions = [await one.evtchn.subscribe() for _ in range(MAX_SUBSCRIPTIONS)]
        try:
            fanout: EventFanout = broker_side(broker, one).resources[FANOUT_KEY]
            assert fanout.subscriber_count == MAX_SUBSCRIPTIONS
            read_before = fanout.events_read
            for _ in range(3):
                await two.evtchn.notify(pair.server_port)
                events = await asyncio.gather(*(next_event(s) for s in subscriptions))
                assert set(events) == {PortFired(pair.client_port)}
            assert fanout.events_read - read_before == 3  # one device read per event, not one per subscriber
        finally:
            for subscription in subscriptions:
                await subscription.close()
        await eventually(lambda: fanout.subscriber_count == 0, "every subscription unregistered")


async def test_slow_subscriber_gets_events_lost_and_others_are_unaffected(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        pairs = await connected_pairs(one, two, 10)
        async with one.evtchn.subscribe(queue_size=2) as slow, one.evtchn.subscribe() as fast:
            # Ten ports fire within one read of domain 1's device.
            sender = broker_side(broker, two)
            for pair in pairs:
                sender.evtchn.notify(pair.server_port)
            assert [await next_event(fast) for _ in pairs] == [PortFired(p.client_port) for p in pairs]
            # The slow one had room for two; the other eight were dropped for it alone.
            assert await next_event(slow) == PortFired(pairs[0].client_port)
            assert await next_event(slow) == PortFired(pairs[1].client_port)
            await nothing_more(slow)
            await two.evtchn.notify(pairs[5].server_port)
            assert await next_event(fast) == PortFired(pairs[5].client_port)
            # The loss is reported right before the next event.
            assert await next_event(slow) == EventsLost(8)
            assert await next_event(slow) == PortFired(pairs[5].client_port)


async def test_a_timed_out_wait_does_not_end_the_subscription(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        (pair,) = await connected_pairs(one, two, 1)
        async with one.evtchn.subscribe() as events:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(events), 0.05)
            await two.evtchn.notify(pair.server_port)
            assert await next_event(events) == PortFired(pair.client_port)


# --------------------------------------------------------------------------- ends of streams


async def test_streams_end_cleanly_when_the_client_closes_its_session(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        await one.evtchn.bind_unbound_port(2)
        subscriptions = [await one.evtchn.subscribe() for _ in range(5)]
        consumers = [asyncio.create_task(_collect(s)) for s in subscriptions]
        await asyncio.sleep(0.05)
        server_session = broker_side(broker, one)
        fanout: EventFanout = server_session.resources[FANOUT_KEY]
        await one.close()
        results = await asyncio.wait_for(asyncio.gather(*consumers), 5)
        assert results == [[]] * 5
        await eventually(lambda: server_session.closed.is_set(), "the broker released the session")
        assert fanout.closed and fanout.subscriber_count == 0


async def test_streams_end_cleanly_when_the_broker_ends_the_session(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        (pair,) = await connected_pairs(one, two, 1)
        subscriptions = [await one.evtchn.subscribe() for _ in range(5)]
        received: list[list[object]] = [[] for _ in subscriptions]
        consumers = [asyncio.create_task(_collect(s, into)) for s, into in zip(subscriptions, received)]
        await two.evtchn.notify(pair.server_port)
        await eventually(lambda: all(received), "every subscriber has the event")
        fanout: EventFanout = broker_side(broker, one).resources[FANOUT_KEY]
        broker_side(broker, one).release()
        # The server finished each stream with OK: the iterators just end.
        results = await asyncio.wait_for(asyncio.gather(*consumers), 5)
        assert results == [[PortFired(pair.client_port)]] * 5
        assert fanout.closed


async def test_subscription_ends_with_port_unbound_when_its_port_is_unbound(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        a, b = await connected_pairs(one, two, 2)
        subscription = await one.evtchn.subscribe(ports=[a.client_port, b.client_port])
        try:
            waiter = asyncio.create_task(anext(subscription))
            await asyncio.sleep(0.05)
            await one.evtchn.unbind(a.client_port)
            with pytest.raises(PortUnbound) as raised:
                await asyncio.wait_for(waiter, 5)
            error = raised.value
            assert (error.code, error.errno) == (grpc.StatusCode.FAILED_PRECONDITION, errno.ENOTCONN)
            assert f"port {a.client_port} was unbound" in error.detail
            assert error.ports == (a.client_port, b.client_port)
            with pytest.raises(StopAsyncIteration):  # ended
                await anext(subscription)
        finally:
            await subscription.close()
        await eventually(lambda: broker_side(broker, one).usage.subscriptions == 0, "the broker dropped the subscription")


async def test_subscription_to_an_unbound_port_never_hears_a_new_channel_on_its_number(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        (pair,) = await connected_pairs(one, two, 1)
        async with one.evtchn.subscribe(ports=[pair.client_port]) as events:
            await one.evtchn.unbind(pair.client_port)
            again = await one.evtchn.bind_interdomain(two.domid, pair.server_port)
            assert again == pair.client_port  # Xen hands out the lowest free port
            await two.evtchn.notify(pair.server_port)
            with pytest.raises(PortUnbound):
                await next_event(events)


async def test_subscription_to_all_ports_survives_an_unbind(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, two):
        a, b = await connected_pairs(one, two, 2)
        async with one.evtchn.subscribe() as every:
            await one.evtchn.unbind(a.client_port)
            await two.evtchn.notify(b.server_port)
            assert await next_event(every) == PortFired(b.client_port)
            again = await one.evtchn.bind_interdomain(two.domid, a.server_port)
            assert await next_event(every) == PortFired(again)  # the new channel's own event, once
            await nothing_more(every)


async def test_end_subscriptions_for_shutdown(broker: InProcessBroker) -> None:
    from grant_broker.core.operations.evtchn import end_subscriptions

    async with two_domains(broker.socket_path) as (one, two):
        subscriptions = [await session.evtchn.subscribe() for session in (one, two) for _ in range(3)]
        consumers = [asyncio.create_task(_collect(s)) for s in subscriptions]
        end_subscriptions(broker.registry)
        assert await asyncio.wait_for(asyncio.gather(*consumers), 5) == [[]] * 6


async def _collect(subscription, into: list[object] | None = None) -> list[object]:  # type: ignore[no-untyped-def]
    events = [] if into is None else into
    async for event in subscription:
        events.append(event)
    return events


async def test_closing_a_subscription_unregisters_it_in_the_broker(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        subscription = await one.evtchn.subscribe()
        server_session = broker_side(broker, one)
        fanout: EventFanout = server_session.resources[FANOUT_KEY]
        assert fanout.subscriber_count == 1 and server_session.usage.subscriptions == 1
        waiter = asyncio.create_task(anext(subscription))
        await asyncio.sleep(0.05)
        await subscription.close()
        with pytest.raises(StopAsyncIteration):
            await waiter
        await eventually(lambda: fanout.subscriber_count == 0, "the broker dropped the subscription")
        assert server_session.usage.subscriptions == 0
        assert not fanout.closed  # the session's reader stays for the next subscriber


# --------------------------------------------------------------------------- limits and bad input


async def test_subscription_limit(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        subscriptions = [await one.evtchn.subscribe() for _ in range(MAX_SUBSCRIPTIONS)]
        try:
            error = await expect_error(one.evtchn.subscribe(), grpc.StatusCode.RESOURCE_EXHAUSTED, errno.EDQUOT)
            assert str(MAX_SUBSCRIPTIONS) in error.detail
            await subscriptions.pop().close()
            await eventually(lambda: broker_side(broker, one).usage.subscriptions < MAX_SUBSCRIPTIONS, "a free slot")
            subscriptions.append(await one.evtchn.subscribe())
        finally:
            for subscription in subscriptions:
                await subscription.close()


async def test_subscribe_bad_input(broker: InProcessBroker) -> None:
    async with two_domains(broker.socket_path) as (one, _):
        await expect_error(
            one.evtchn.subscribe(queue_size=MAX_QUEUE_SIZE + 1), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL
        )
        await expect_error(one.evtchn.subscribe(ports=[3]), grpc.StatusCode.FAILED_PRECONDITION, errno.ENOTCONN)
        assert broker_side(broker, one).usage.subscriptions == 0


async def test_subscribe_on_a_closed_session(broker: InProcessBroker) -> None:
    session = await grant_broker_client.connect(broker.socket_path, domid=1)
    events = session.evtchn
    await session.close()
    await expect_error(events.subscribe(), grpc.StatusCode.UNAVAILABLE, errno.EPIPE)


async def test_device_clients_are_refused_after_close(broker: InProcessBroker) -> None:
    session = await grant_broker_client.connect(broker.socket_path, domid=1)
    await session.close()
    for name in ("gntdev", "gntalloc", "evtchn", "membuf"):
        with pytest.raises(BrokerClientError) as raised:
            getattr(session, name)
        assert (raised.value.code, raised.value.errno) == (grpc.StatusCode.UNAVAILABLE, errno.EPIPE)


async def test_events_through_the_daemon_on_uvloop(broker_process) -> None:  # type: ignore[no-untyped-def]
    """The real daemon (its own process, on uvloop) fans events out the same way."""
    async with two_domains(broker_process.socket_path) as (one, two):
        (pair,) = await connected_pairs(one, two, 1)
        subscriptions = [await one.evtchn.subscribe(ports=[pair.client_port]) for _ in range(10)]
        try:
            for _ in range(3):
                await two.evtchn.notify(pair.server_port)
                events = await asyncio.gather(*(next_event(s) for s in subscriptions))
                assert set(events) == {PortFired(pair.client_port)}
        finally:
            for subscription in subscriptions:
                await subscription.close()
