"""Unmap notifications of gntdev and gntalloc (``set_unmap_notify``).

One notification per mapping (gntdev) or page (gntalloc); a later call
replaces it.  CLEAR_BYTE zeroes a byte of the shared page, SEND_EVENT
notifies an event channel port bound in the notifying domain.

gntdev mappings are mmapped before they are unmapped: on a PV dom0 Linux
clears the byte when the grant pages are unmapped from the process, so a
mapping never mmapped would never clear it.
"""

from __future__ import annotations

import errno

import pytest

from grant_broker.backend.contract import PAGE_SIZE
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi.gntdev import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT

from ._grant_helpers import event_channel, grant_refs, granted_pages, granter_view, map_and_close

MARK = 0xA5
OFFSET = 123  # a byte inside the first page


def _map(gntdev, refs, *, writable: bool = True):
    index = gntdev.map_grant_refs(refs)
    memory = map_and_close(gntdev.map_memory(index, len(refs), writable=writable), writable=writable)
    return index, memory


# --------------------------------------------------------------------------- gntdev


def test_unmap_notify_clear_byte_fires_on_unmap(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[OFFSET] = MARK
        index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
        gntdev.set_unmap_notify(index + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE, 0)
        assert granter[OFFSET] == MARK  # armed, not fired
        memory.close()
        gntdev.unmap_grant_ref(index, 1)
        assert granter[OFFSET] == 0


def test_unmap_notify_clear_byte_fires_on_close(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
    ):
        granter[OFFSET] = MARK
        with domains.local.open_gntdev() as gntdev:
            index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
            gntdev.set_unmap_notify(index + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE, 0)
            memory.close()
        assert granter[OFFSET] == 0


def test_clear_byte_hits_the_page_holding_the_offset(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[OFFSET] = MARK
        granter[PAGE_SIZE + OFFSET] = MARK
        index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
        gntdev.set_unmap_notify(index + PAGE_SIZE + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE, 0)
        memory.close()
        gntdev.unmap_grant_ref(index, 2)
        assert (granter[OFFSET], granter[PAGE_SIZE + OFFSET]) == (MARK, 0)


async def test_unmap_notify_send_event_fires_on_unmap(domains) -> None:
    async with event_channel(domains.local, domains.peer) as channel:
        with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
            index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
            gntdev.set_unmap_notify(index, UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
            assert channel.receiver.read_pending() == []
            memory.close()
            gntdev.unmap_grant_ref(index, 1)
            assert await channel.received() == [channel.receiver_port]


async def test_unmap_notify_send_event_fires_on_close(domains) -> None:
    async with event_channel(domains.local, domains.peer) as channel:
        with granted_pages(domains.peer, domains.local.domid) as (_, allocation):
            with domains.local.open_gntdev() as gntdev:
                index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
                gntdev.set_unmap_notify(index, UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
            assert await channel.received() == [channel.receiver_port]


async def test_both_actions_fire_together(domains) -> None:
    async with event_channel(domains.local, domains.peer) as channel:
        with (
            granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
            granter_view(gntalloc, allocation) as granter,
            domains.local.open_gntdev() as gntdev,
        ):
            granter[OFFSET] = MARK
            index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
            gntdev.set_unmap_notify(
                index + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT, channel.sender_port
            )
            memory.close()
            gntdev.unmap_grant_ref(index, 1)
            assert await channel.received() == [channel.receiver_port]
            assert granter[OFFSET] == 0


async def test_later_notify_overwrites_earlier(domains) -> None:
    async with event_channel(domains.local, domains.peer) as channel:
        with (
            granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
            granter_view(gntalloc, allocation) as granter,
            domains.local.open_gntdev() as gntdev,
        ):
            granter[OFFSET] = MARK
            index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
            gntdev.set_unmap_notify(index + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE, 0)
            gntdev.set_unmap_notify(index, UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
            memory.close()
            gntdev.unmap_grant_ref(index, 1)
            assert await channel.received() == [channel.receiver_port]
            assert granter[OFFSET] == MARK  # the CLEAR_BYTE was replaced


async def test_unbound_port_still_carries_the_armed_notification(domains) -> None:
    # The notification holds a reference on its port (Linux's evtchn_get): the
    # handle may unbind the port, but Xen keeps the channel connected until the
    # notification is sent, and only then closes it (seen on Xen 4.17 + Linux 6.1).
    async with event_channel(domains.local, domains.peer) as channel:
        with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
            index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
            gntdev.set_unmap_notify(index, UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
            channel.sender.unbind(channel.sender_port)
            with domains.local.open_evtchn() as other, pytest.raises(BrokerError) as caught:
                other.bind_interdomain(domains.peer.domid, channel.receiver_port)  # still connected
            assert caught.value.errno == errno.EINVAL
            gntdev.unmap_grant_ref(index, 1)
            assert await channel.received() == [channel.receiver_port]
        with domains.local.open_evtchn() as again:  # sent: the port is closed now
            again.bind_interdomain(domains.peer.domid, channel.receiver_port)


def test_clear_byte_refused_on_read_only_mapping(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        index, memory = _map(gntdev, grant_refs(domains.peer, allocation), writable=False)
        with memory, pytest.raises(BrokerError) as caught:
            gntdev.set_unmap_notify(index + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE, 0)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 1)


def test_send_event_on_unbound_port_is_einval(domains) -> None:
    with domains.local.open_evtchn() as evtchn:
        port = evtchn.bind_unbound_port(domains.peer.domid)
        evtchn.unbind(port)
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        with pytest.raises(BrokerError) as caught:
            gntdev.set_unmap_notify(index, UNMAP_NOTIFY_SEND_EVENT, port)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 1)


def test_notify_with_unknown_action_is_einval(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        with pytest.raises(BrokerError) as caught:
            gntdev.set_unmap_notify(index, 0x4, 0)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 1)


def test_notify_offset_in_no_mapping_is_enoent(domains) -> None:
    with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.set_unmap_notify(32 * PAGE_SIZE, UNMAP_NOTIFY_CLEAR_BYTE, 0)
    assert caught.value.errno == errno.ENOENT


# --------------------------------------------------------------------------- gntalloc


def test_gntalloc_clear_byte_fires_on_dealloc(domains) -> None:
    # The granter's page is observed through the grantee's mapping, which
    # keeps it alive past the dealloc.
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
        with memory:
            memory.view[OFFSET] = MARK
            gntalloc.set_unmap_notify(allocation.index + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE, 0)
            assert memory.view[OFFSET] == MARK
            gntalloc.dealloc_gref(allocation.index, 1)
            assert memory.view[OFFSET] == 0
        gntdev.unmap_grant_ref(index, 1)


async def test_gntalloc_send_event_fires_on_close(domains) -> None:
    async with event_channel(domains.peer, domains.local) as channel:
        with domains.peer.open_gntalloc() as gntalloc:
            allocation = gntalloc.alloc_gref(domains.local.domid, 1)
            gntalloc.set_unmap_notify(allocation.index, UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
            assert channel.receiver.read_pending() == []
        assert await channel.received() == [channel.receiver_port]


async def test_gntalloc_later_notify_overwrites_earlier(domains) -> None:
    async with event_channel(domains.peer, domains.local) as channel:
        with (
            granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
            domains.local.open_gntdev() as gntdev,
        ):
            index, memory = _map(gntdev, grant_refs(domains.peer, allocation))
            with memory:
                memory.view[OFFSET] = MARK
                gntalloc.set_unmap_notify(allocation.index + OFFSET, UNMAP_NOTIFY_CLEAR_BYTE, 0)
                gntalloc.set_unmap_notify(allocation.index, UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
                gntalloc.dealloc_gref(allocation.index, 1)
                assert await channel.received() == [channel.receiver_port]
                assert memory.view[OFFSET] == MARK
            gntdev.unmap_grant_ref(index, 1)


async def test_gntalloc_notification_outlives_the_closed_handle(domains) -> None:
    # A process that dies closes its event channel file, maybe before its
    # gntalloc file: the notification still reaches the other end.
    async with event_channel(domains.peer, domains.local) as channel:
        with domains.peer.open_gntalloc() as gntalloc:
            allocation = gntalloc.alloc_gref(domains.local.domid, 1)
            gntalloc.set_unmap_notify(allocation.index, UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
            channel.sender.close()
        assert await channel.received() == [channel.receiver_port]


def test_gntalloc_notify_offset_in_no_page_is_enoent(domains) -> None:
    with domains.peer.open_gntalloc() as gntalloc, pytest.raises(BrokerError) as caught:
        gntalloc.set_unmap_notify(8 * PAGE_SIZE, UNMAP_NOTIFY_CLEAR_BYTE, 0)
    assert caught.value.errno == errno.ENOENT


def test_gntalloc_send_event_on_unbound_port_is_einval(domains) -> None:
    with domains.peer.open_evtchn() as evtchn:
        port = evtchn.bind_unbound_port(domains.local.domid)
        evtchn.unbind(port)
    with granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation):
        with pytest.raises(BrokerError) as caught:
            gntalloc.set_unmap_notify(allocation.index, UNMAP_NOTIFY_SEND_EVENT, port)
        assert caught.value.errno == errno.EINVAL
