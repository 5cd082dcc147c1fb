"""The Gntalloc service through real sockets: sharing pages, ending grants, unmap notifications."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator

import grpc
import pytest

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.gntalloc import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT

from .conftest import InProcessBroker

SHARER, MAPPER = 1, 2


@pytest.fixture
async def sharer(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER, client_name="sharer") as session:
        yield session


@pytest.fixture
async def mapper(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=MAPPER, client_name="mapper") as session:
        yield session


async def test_share_gives_zeroed_writable_pages_and_one_ref_per_page(sharer: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 3) as pages:
        assert len(pages.refs) == 3 == pages.count and len(set(pages.refs)) == 3
        assert len(pages.view) == 3 * PAGE_SIZE and not pages.view.readonly
        assert bytes(pages.view) == bytes(3 * PAGE_SIZE)
        pages.view[-1] = 0xFF
        info = await sharer.describe()
        assert (info.usage.allocations, info.usage.granted_pages) == (1, 3)
    info = await sharer.describe()
    assert (info.usage.allocations, info.usage.granted_pages) == (0, 0)


async def test_closing_shared_pages_ends_the_grants(sharer: Session, mapper: Session) -> None:
    pages = await sharer.gntalloc.share(MAPPER, 1)
    ref = pages.refs[0]
    await pages.aclose()
    with pytest.raises(BrokerClientError) as raised:
        await mapper.gntdev.map([(SHARER, ref)])
    assert raised.value.errno == errno.EINVAL and raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_only_the_grantee_may_map(broker: InProcessBroker, sharer: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages, await grant_broker_client.connect(
        broker.socket_path, domid=3
    ) as stranger:
        with pytest.raises(BrokerClientError) as raised:
            await stranger.gntdev.map([(SHARER, pages.refs[0])])
        assert raised.value.errno == errno.EINVAL
        assert "not to domain 3" in raised.value.detail


async def test_dealloc_of_a_wrong_size_or_index_is_einval(sharer: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages:
        with pytest.raises(BrokerClientError) as raised:
            await sharer.gntalloc.dealloc_gref(pages.index, 1)
        assert raised.value.errno == errno.EINVAL and "2 pages, not 1" in raised.value.detail
        with pytest.raises(BrokerClientError) as raised:
            await sharer.gntalloc.dealloc_gref(pages.index + 64 * PAGE_SIZE, 2)
        assert raised.value.errno == errno.EINVAL


async def test_sharer_session_end_clears_the_notify_byte_for_the_mapper(broker: InProcessBroker, mapper: Session) -> None:
    sharer = await grant_broker_client.connect(broker.socket_path, domid=SHARER)
    pages = await sharer.gntalloc.share(MAPPER, 1)
    pages.view[7] = 0xAA
    async with await mapper.gntdev.map([(SHARER, pages.refs[0])]) as mapping:
        await pages.set_unmap_notify(7, UNMAP_NOTIFY_CLEAR_BYTE)
        assert mapping.view[7] == 0xAA
        await sharer.close()  # the sharer goes away without deallocating
        for _ in range(100):
            if mapping.view[7] == 0:
                break
            await asyncio.sleep(0.01)
        assert mapping.view[7] == 0
    await pages.aclose()  # local unmap only: the session is gone


async def test_sharer_unmap_notify_sends_an_event_to_the_mapper(broker: InProcessBroker, mapper: Session) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER) as sharer, \
            await grant_broker_client.connect(broker.socket_path, domid=SHARER) as neighbour:
        offered = await mapper.evtchn.bind_unbound_port(remote_domain=SHARER)
        port = await sharer.evtchn.bind_interdomain(remote_domain=MAPPER, remote_port=offered)
        async with mapper.evtchn.subscribe(ports=[offered]) as events:
            pages = await sharer.gntalloc.share(MAPPER, 1)
            # A port of the same domain bound by another session is not ours to signal.
            neighbours_port = await neighbour.evtchn.bind_unbound_port(remote_domain=MAPPER)
            with pytest.raises(BrokerClientError) as raised:
                await pages.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, neighbours_port)
            assert raised.value.errno == errno.EINVAL and "not bound by this session" in raised.value.detail
            await pages.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, port)
            await pages.aclose()
            event = await asyncio.wait_for(anext(events), 5)
            assert event.port == offered  # type: ignore[union-attr]


async def test_mapped_pages_outlive_the_sharers_dealloc(sharer: Session, mapper: Session) -> None:
    pages = await sharer.gntalloc.share(MAPPER, 1)
    pages.view[0:4] = b"keep"
    async with await mapper.gntdev.map([(SHARER, pages.refs[0])]) as mapping:
        await pages.aclose()
        # As on Linux: the page lives until the mapper unmaps it.
        assert bytes(mapping.view[0:4]) == b"keep"
