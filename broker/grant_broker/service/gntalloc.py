"""The Gntalloc service: a client's pages of this domain granted to another domain.

Each session allocates through its own gntalloc instance (``session.gntalloc``):
indexes are per session, and when the session ends the instance is closed,
which ends every grant and fires the unmap notifications, as closing
``/dev/xen/gntalloc`` does on Linux.  Pages the other domain still maps stay
alive until it unmaps them (the backend's business).
"""

from __future__ import annotations

import grpc

from grant_broker.service.gntdev import (
    check_count,
    check_domid,
    check_notify_action,
    check_port_of_session,
    close_spans,
    quota_grants,
    send_spans,
)
from grant_broker.service.session import Session, SessionRegistry
from grant_broker.service.status import invalid, rpc
from grant_broker.uapi.gntalloc import GNTALLOC_FLAG_WRITABLE
from grant_broker_protocol.v1 import gntalloc_pb2, gntalloc_pb2_grpc


class GntallocState:
    """The session's allocations: index -> number of pages (for usage and checks)."""

    def __init__(self) -> None:
        self.allocations: dict[int, int] = {}

    def close(self) -> None:
        # Closing the session's gntalloc instance (the session does it right
        # after) deallocates everything; only the bookkeeping goes here.
        self.allocations.clear()


def gntalloc_state(session: Session) -> GntallocState:
    return session.service_state("gntalloc", GntallocState)


class GntallocService(gntalloc_pb2_grpc.GntallocServicer):
    """``grant_broker.v1.Gntalloc`` over the backend contract."""

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    @rpc
    async def AllocGref(
        self, request: gntalloc_pb2.AllocGrefRequest, context: grpc.aio.ServicerContext
    ) -> gntalloc_pb2.AllocGrefResponse:
        op = "gntalloc alloc gref"
        session = self.registry.session_for(context)
        check_domid(op, request.domid)
        if request.flags & ~GNTALLOC_FLAG_WRITABLE:
            raise invalid(op, f"flags {request.flags:#x} has bits other than GNTALLOC_FLAG_WRITABLE (0x1)")
        check_count(op, request.count, "pages")
        quota_grants(session, op, request.count)
        instance = session.gntalloc
        allocation = instance.alloc_gref(request.domid, request.count, writable=bool(request.flags & GNTALLOC_FLAG_WRITABLE))
        try:
            spans = instance.memory_spans(allocation.index, allocation.count)
        except BaseException:
            instance.dealloc_gref(allocation.index, allocation.count)
            raise
        try:
            gntalloc_state(session).allocations[allocation.index] = allocation.count
            session.usage.allocations += 1
            session.usage.granted_pages += allocation.count
        except BaseException:
            close_spans(spans)
            raise
        # Recorded before the await: if the session ends while the descriptors
        # travel, the instance's close gives the pages back.
        transfer, messages = await send_spans(session, spans)
        return gntalloc_pb2.AllocGrefResponse(
            index=allocation.index, gref_ids=allocation.refs, fd_transfer=transfer, spans=messages
        )

    @rpc
    async def DeallocGref(
        self, request: gntalloc_pb2.DeallocGrefRequest, context: grpc.aio.ServicerContext
    ) -> gntalloc_pb2.DeallocGrefResponse:
        op = "gntalloc dealloc gref"
        session = self.registry.session_for(context)
        state = gntalloc_state(session)
        count = state.allocations.get(request.index)
        if count is None:
            raise invalid(op, f"no allocation starts at index {request.index} in this session")
        if count != request.count:
            raise invalid(op, f"the allocation at index {request.index} has {count} pages, not {request.count}")
        session.gntalloc.dealloc_gref(request.index, request.count)
        del state.allocations[request.index]
        session.usage.allocations -= 1
        session.usage.granted_pages -= count
        return gntalloc_pb2.DeallocGrefResponse()

    @rpc
    async def SetUnmapNotify(
        self, request: gntalloc_pb2.GntallocUnmapNotifyRequest, context: grpc.aio.ServicerContext
    ) -> gntalloc_pb2.GntallocUnmapNotifyResponse:
        op = "gntalloc set unmap notify"
        session = self.registry.session_for(context)
        check_notify_action(op, request.action)
        check_port_of_session(op, session, request.action, request.event_channel_port)
        session.gntalloc.set_unmap_notify(request.index, request.action, request.event_channel_port)
        return gntalloc_pb2.GntallocUnmapNotifyResponse()
