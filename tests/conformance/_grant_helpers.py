"""Small helpers shared by the grant conformance tests (contract API only).

Everything here uses :mod:`grant_broker.backend.contract` and the shared
memory helper; nothing knows which backend runs.  Every helper closes what it
opens, so tests stay within the fd-leak check of the ``domains`` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from grant_broker.backend.contract import (
    Backend,
    EvtchnHandle,
    GntallocInstance,
    GntdevInstance,
    GrantAllocation,
    GrantRef,
    MemorySpan,
)
from grant_broker_protocol.memory import SharedMemory, map_spans

EVENT_TIMEOUT = 10.0  # seconds; generous for a real Xen under software emulation


@contextlib.contextmanager
def granted_pages(
    granter: Backend, grantee_domid: int, count: int = 1, *, writable: bool = True
) -> Iterator[tuple[GntallocInstance, GrantAllocation]]:
    """*count* pages of *granter* granted to *grantee_domid*, on a fresh gntalloc."""
    with granter.open_gntalloc() as gntalloc:
        allocation = gntalloc.alloc_gref(grantee_domid, count, writable=writable)
        yield gntalloc, allocation


def grant_refs(granter: Backend, allocation: GrantAllocation) -> list[GrantRef]:
    return [GrantRef(granter.domid, ref) for ref in allocation.refs]


def close_spans(spans: Sequence[MemorySpan]) -> None:
    for span in spans:
        span.close()


def map_and_close(spans: Sequence[MemorySpan], *, writable: bool) -> SharedMemory:
    """Map *spans* contiguously and close their descriptors (the mapping stays)."""
    try:
        return map_spans(spans, writable=writable)
    finally:
        close_spans(spans)


@contextlib.contextmanager
def granter_view(gntalloc: GntallocInstance, allocation: GrantAllocation) -> Iterator[memoryview]:
    """The granter's own writable view of *allocation*."""
    with map_and_close(gntalloc.memory_spans(allocation.index, allocation.count), writable=True) as memory:
        yield memory.view


@contextlib.contextmanager
def grantee_view(
    gntdev: GntdevInstance, refs: Sequence[GrantRef], *, writable: bool = True
) -> Iterator[tuple[int, SharedMemory]]:
    """Map *refs* on *gntdev*; yields (index, memory); unmaps both afterwards."""
    index = gntdev.map_grant_refs(refs)
    try:
        with map_and_close(gntdev.map_memory(index, len(refs), writable=writable), writable=writable) as memory:
            yield index, memory
    finally:
        gntdev.unmap_grant_ref(index, len(refs))


async def wait_readable(fd: int, timeout: float = EVENT_TIMEOUT) -> None:
    """Wait, on the running event loop, until *fd* is readable (bounded)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)


@dataclass
class Channel:
    """An interdomain event channel: ``sender_port`` (bound in the sender's
    domain) notifies ``receiver_port`` on ``receiver``'s handle."""

    sender: EvtchnHandle
    sender_port: int
    receiver: EvtchnHandle
    receiver_port: int

    async def received(self, timeout: float = EVENT_TIMEOUT) -> list[int]:
        """Wait for the receiver's handle to fire; return its pending ports."""
        await wait_readable(self.receiver.fileno(), timeout)
        return self.receiver.read_pending()


@contextlib.asynccontextmanager
async def event_channel(sender: Backend, receiver: Backend) -> AsyncIterator[Channel]:
    """Bind a channel from *sender*'s domain to *receiver*'s, with the
    pending event that BIND_INTERDOMAIN leaves on the new port drained, so a
    later notification is not confused with it."""
    with receiver.open_evtchn() as receiving, sender.open_evtchn() as sending:
        receiver_port = receiving.bind_unbound_port(sender.domid)
        sender_port = sending.bind_interdomain(receiver.domid, receiver_port)
        await wait_readable(sending.fileno())
        assert sender_port in sending.read_pending()
        sending.unmask(sender_port)
        yield Channel(sending, sender_port, receiving, receiver_port)
