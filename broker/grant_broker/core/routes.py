"""The one table of the broker's calls: method name → operation.

Every transport serves the calls from this table and nothing else: the gRPC
adapter builds its handlers from it, and a call added here is served
everywhere.  The request and response types, and whether a call passes
descriptors, are read from the protocol's own service descriptors, so the
table cannot disagree with the schema.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from grant_broker.core.operations import broker, evtchn, gntalloc, gntdev, membuf
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
from grant_broker_protocol.v1 import broker_pb2, evtchn_pb2, gntalloc_pb2, gntdev_pb2, membuf_pb2

SERVICES: dict[str, ServiceDescriptor] = {
    service.name: service
    for module in (broker_pb2, gntdev_pb2, gntalloc_pb2, evtchn_pb2, membuf_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}
"""The protocol's services by short name (``"Gntdev"``)."""

UnaryOperation = Callable[[Any, Any], Awaitable[Reply[Any]]]
StreamOperation = Callable[[Any, Any], AsyncIterator[Any]]

FD_TRANSFER_FIELD = "fd_transfer"
"""The field by which a request or response names the descriptors that go with it."""


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

    @property
    def descriptor(self) -> MethodDescriptor:
        return SERVICES[self.service].methods_by_name[self.method]

    @property
    def full_name(self) -> str:
        """``/grant_broker.v1.Gntdev/Map``: the method as gRPC names it on the wire."""
        return f"/{SERVICES[self.service].full_name}/{self.method}"

    @property
    def request_type(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.input_type)

    @property
    def response_type(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.output_type)

    @property
    def receives_fds(self) -> bool:
        """The request names descriptors the client sends with it."""
        return FD_TRANSFER_FIELD in self.descriptor.input_type.fields_by_name

    @property
    def sends_fds(self) -> bool:
        """The response names descriptors the broker sends with it."""
        return FD_TRANSFER_FIELD in self.descriptor.output_type.fields_by_name


def _unary(service: str, method: str, operation: UnaryOperation, *, session_optional: bool = False) -> Route:
    return Route(service, method, operation, session_optional=session_optional)


def build_routes(status: broker.BrokerStatus, *, streams_ended: Callable[[], bool]) -> tuple[Route, ...]:
    """Every call of the protocol.  *status* serves the operator's view;
    *streams_ended* says the broker is shutting down (new event streams are refused)."""

    def subscribe(session: Session, request: evtchn_pb2.SubscribeRequest) -> AsyncIterator[evtchn_pb2.Event]:
        return evtchn.subscribe(session, request, refuse_new=streams_ended)

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
        Route("Evtchn", "Subscribe", subscribe, streaming=True),
        _unary("MemBuf", "Alloc", membuf.alloc),
        _unary("MemBuf", "Export", membuf.export),
        _unary("MemBuf", "Import", membuf.import_),
    )

