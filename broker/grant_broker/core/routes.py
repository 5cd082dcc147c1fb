"""The one table of the broker's calls: method name → operation.

Every transport serves the calls from this table and nothing else: the gRPC
adapter builds its handlers from it, and a call added here is served
everywhere.  The request and response types, and whether a call passes
descriptors, are read from the protocol's own service descriptors, so the
table cannot disagree with the schema.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from grant_broker.core.events import Subscription
from grant_broker.core.operations import broker, copyring, evtchn, gntalloc, gntdev, membuf
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
from grant_broker_protocol.methods import Method, method
from grant_broker_protocol.v1 import evtchn_pb2

UnaryOperation = Callable[[Any, Any], Awaitable[Reply[Any]]]
StreamOperation = Callable[[Any, Any], AsyncIterator[Any]]
SubscriptionOpener = Callable[[Any, Any], AbstractContextManager[Subscription]]


@dataclass(frozen=True, slots=True)
class Route:
    """One call of the protocol and the operation that serves it.

    The operation takes the calling session (``None`` for a call whose
    session is optional and that carries none) and the request message; a
    unary one returns a :class:`~grant_broker.core.reply.Reply`, a streaming
    one is an async iterator of messages.  Failures are
    :class:`~grant_broker_protocol.errors.BrokerError`.
    """

    service: str
    method: str
    operation: UnaryOperation | StreamOperation
    streaming: bool = False
    session_optional: bool = False
    subscription: SubscriptionOpener | None = None
    """For an event subscription: the opener a transport that takes the events
    itself uses instead of the stream (the fast path's per-session frames);
    it checks and counts exactly what the stream does."""

    @property
    def method_info(self) -> Method:
        """The protocol's method this route serves (types, descriptors, fd passing)."""
        return method(self.service, self.method)

    @property
    def full_name(self) -> str:
        """``/grant_broker.v1.Gntdev/Map``: the method as gRPC names it on the wire."""
        return self.method_info.full_name

    @property
    def request_type(self) -> type[Message]:
        return self.method_info.request_type

    @property
    def response_type(self) -> type[Message]:
        return self.method_info.response_type

    @property
    def sends_fds(self) -> bool:
        """The response names descriptors the broker sends with it."""
        return self.method_info.sends_fds


def _unary(service: str, method: str, operation: UnaryOperation, *, session_optional: bool = False) -> Route:
    return Route(service, method, _in_flight(f"{service}.{method}", operation), session_optional=session_optional)


def _in_flight(name: str, operation: UnaryOperation) -> UnaryOperation:
    """*operation*, counted against its session's (and uid's) budget of calls in
    flight while it runs, whichever transport called it — once: a transport
    that counted the call already (the gRPC handler does, before it reads the
    request) is not counted again (see ``Session.call_in_flight``).  Streams
    are bounded as subscriptions instead."""

    async def counted(session: Session | None, request: Any) -> Reply[Any]:
        if session is None:
            return await operation(session, request)
        with session.call_in_flight(name):
            return await operation(session, request)

    return counted


def build_routes(status: broker.BrokerStatus, *, streams_ended: Callable[[], bool]) -> tuple[Route, ...]:
    """Every call of the protocol.  *status* serves the operator's view;
    *streams_ended* says the broker is shutting down (new event streams are refused)."""

    def subscribe(session: Session, request: evtchn_pb2.SubscribeRequest) -> AsyncIterator[evtchn_pb2.Event]:
        return evtchn.subscribe(session, request, refuse_new=streams_ended)

    def open_subscription(session: Session, request: evtchn_pb2.SubscribeRequest) -> AbstractContextManager[Subscription]:
        return evtchn.opened_subscription(session, request, refuse_new=streams_ended)

    return (
        _unary("Broker", "DescribeSession", broker.describe_session),
        _unary("Broker", "Status", status.status, session_optional=True),
        _unary("Gntdev", "Map", gntdev.map_),
        _unary("Gntdev", "MapGrantRef", gntdev.map_grant_ref),
        _unary("Gntdev", "UnmapGrantRef", gntdev.unmap_grant_ref),
        _unary("Gntdev", "MapMemory", gntdev.map_memory),
        _unary("Gntdev", "SetMaxGrants", gntdev.set_max_grants),
        _unary("Gntdev", "SetUnmapNotify", gntdev.set_unmap_notify),
        _unary("Gntdev", "RegisterCopyBuffer", gntdev.register_copy_buffer),
        _unary("Gntdev", "UnregisterCopyBuffer", gntdev.unregister_copy_buffer),
        _unary("Gntdev", "GrantCopy", gntdev.grant_copy),
        _unary("Gntdev", "CreateCopyRing", copyring.create_copy_ring),
        _unary("Gntdev", "SubmitCopyRing", copyring.submit_copy_ring),
        _unary("Gntdev", "DestroyCopyRing", copyring.destroy_copy_ring),
        _unary("Gntdev", "DmabufExportFromRefs", gntdev.dmabuf_export_from_refs),
        _unary("Gntdev", "DmabufExportWaitReleased", gntdev.dmabuf_export_wait_released),
        _unary("Gntdev", "DmabufImportToRefs", gntdev.dmabuf_import_to_refs),
        _unary("Gntdev", "DmabufImportRelease", gntdev.dmabuf_import_release),
        _unary("Gntalloc", "AllocGref", gntalloc.alloc_gref),
        _unary("Gntalloc", "DeallocGref", gntalloc.dealloc_gref),
        _unary("Gntalloc", "SetUnmapNotify", gntalloc.set_unmap_notify),
        _unary("Evtchn", "BindVirq", evtchn.bind_virq),
        _unary("Evtchn", "BindInterdomain", evtchn.bind_interdomain),
        _unary("Evtchn", "BindUnboundPort", evtchn.bind_unbound_port),
        _unary("Evtchn", "Unbind", evtchn.unbind),
        _unary("Evtchn", "Notify", evtchn.notify),
        _unary("Evtchn", "Unmask", evtchn.unmask),
        _unary("Evtchn", "Reset", evtchn.reset),
        _unary("Evtchn", "RestrictDomid", evtchn.restrict_domid),
        Route("Evtchn", "Subscribe", subscribe, streaming=True, subscription=open_subscription),
        _unary("MemBuf", "Alloc", membuf.alloc),
        _unary("MemBuf", "Export", membuf.export),
        _unary("MemBuf", "Import", membuf.import_),
    )

