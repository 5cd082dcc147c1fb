"""Gntalloc operations: a client's pages of this domain granted to another domain.

Each session allocates through its own gntalloc instance (``session.gntalloc``):
indexes are per session, and when the session ends the instance is closed,
which ends every grant and fires the unmap notifications, as closing
``/dev/xen/gntalloc`` does on Linux.  Pages the other domain still maps stay
alive until it unmaps them (the backend's business).

The pages come from a pool of the domain (Linux gntalloc's ``limit``, 1024
pages by default, for every user of the device in that domain — on a real
host, every session), so a session's pages are also charged to its
``POOL_PAGES`` budget and its uid's, well below the pool: one client cannot
leave the others of its domain with ENOSPC.
"""

from __future__ import annotations

from grant_broker.core import audit
from grant_broker.core.budgets import POOL_PAGES
from grant_broker.core.checks import check_count, check_domid, check_notify_action, check_peers, invalid, quota_grants
from grant_broker.core.operations.evtchn import check_port_of_session
from grant_broker.core.reply import Reply, close_spans, span_messages
from grant_broker.core.session import Session
from grant_broker_protocol.abi import GNTALLOC_FLAG_WRITABLE
from grant_broker_protocol.v1 import gntalloc_pb2


class GntallocState:
    """The session's allocations: index -> number of pages (for usage and checks)."""

    def __init__(self) -> None:
        self.allocations: dict[int, int] = {}
        self.domains: dict[int, int] = {}  # index -> the domain granted to (for the metrics: core/census.py)
        self.refs: dict[int, tuple[int, ...]] = {}  # index -> the refs granted (for the audit log: core/audit.py)

    def close(self) -> None:
        # Closing the session's gntalloc instance (the session does it right
        # after) deallocates everything; only the bookkeeping goes here.
        self.allocations.clear()
        self.domains.clear()
        self.refs.clear()


def gntalloc_state(session: Session) -> GntallocState:
    return session.service_state("gntalloc", GntallocState)


async def alloc_gref(session: Session, request: gntalloc_pb2.AllocGrefRequest) -> Reply[gntalloc_pb2.AllocGrefResponse]:
    op = "gntalloc alloc gref"
    check_domid(op, request.domid)
    if request.flags & ~GNTALLOC_FLAG_WRITABLE:
        raise invalid(op, f"flags {request.flags:#x} has bits other than GNTALLOC_FLAG_WRITABLE (0x1)")
    check_count(op, request.count, "pages")
    check_peers(session, op, "grant to", domains=(request.domid,))
    quota_grants(session, op, request.count)
    session.charge(op, POOL_PAGES, request.count)
    try:
        instance = session.gntalloc
        allocation = instance.alloc_gref(request.domid, request.count, writable=bool(request.flags & GNTALLOC_FLAG_WRITABLE))
        try:
            spans = instance.memory_spans(allocation.index, allocation.count)
        except BaseException:
            instance.dealloc_gref(allocation.index, allocation.count)
            raise
    except BaseException:
        session.credit(POOL_PAGES, request.count)
        raise
    try:
        state = gntalloc_state(session)
        state.allocations[allocation.index] = allocation.count
        state.domains[allocation.index] = request.domid
        state.refs[allocation.index] = tuple(allocation.refs)
        session.usage.allocations += 1
        session.usage.granted_pages += allocation.count
    except BaseException:
        close_spans(spans)
        raise
    audit.grants_shared(
        session, op, request.domid, allocation.refs, index=allocation.index,
        writable=bool(request.flags & GNTALLOC_FLAG_WRITABLE),
    )
    # Recorded before the reply travels: if the session ends meanwhile, the
    # instance's close gives the pages back.
    return Reply(
        gntalloc_pb2.AllocGrefResponse(index=allocation.index, gref_ids=allocation.refs, spans=span_messages(spans)),
        [span.fd for span in spans],
    )


async def dealloc_gref(session: Session, request: gntalloc_pb2.DeallocGrefRequest) -> Reply[gntalloc_pb2.DeallocGrefResponse]:
    op = "gntalloc dealloc gref"
    state = gntalloc_state(session)
    count = state.allocations.get(request.index)
    if count is None:
        raise invalid(op, f"no allocation starts at index {request.index} in this session")
    if count != request.count:
        raise invalid(op, f"the allocation at index {request.index} has {count} pages, not {request.count}")
    shared_with = state.domains.get(request.index)
    session.gntalloc.dealloc_gref(request.index, request.count)
    del state.allocations[request.index]
    state.domains.pop(request.index, None)
    session.usage.allocations -= 1
    session.usage.granted_pages -= count
    session.credit(POOL_PAGES, count)
    refs = state.refs.pop(request.index, ())
    if shared_with is not None:
        audit.grants_unshared(session, op, shared_with, refs, index=request.index)
    return Reply(gntalloc_pb2.DeallocGrefResponse())


async def set_unmap_notify(
    session: Session, request: gntalloc_pb2.GntallocUnmapNotifyRequest
) -> Reply[gntalloc_pb2.GntallocUnmapNotifyResponse]:
    op = "gntalloc set unmap notify"
    check_notify_action(op, request.action)
    check_port_of_session(op, session, request.action, request.event_channel_port)
    session.gntalloc.set_unmap_notify(request.index, request.action, request.event_channel_port)
    return Reply(gntalloc_pb2.GntallocUnmapNotifyResponse())
