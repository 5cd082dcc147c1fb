"""The protocol's methods by their gRPC names, read from the service descriptors.

Both transports name a call by its gRPC method name
(``/grant_broker.v1.Gntdev/Map``): gRPC on the wire, the fast path in its
``Call`` frame.  This table gives the request and response types of each, so
neither side writes them down a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from grant_broker_protocol.v1 import broker_pb2, evtchn_pb2, gntalloc_pb2, gntdev_pb2, membuf_pb2

SERVICES: dict[str, ServiceDescriptor] = {
    service.name: service
    for module in (broker_pb2, gntdev_pb2, gntalloc_pb2, evtchn_pb2, membuf_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}
"""The protocol's services by short name (``"Gntdev"``)."""

FD_TRANSFER_FIELD = "fd_transfer"
"""The field by which a request or response names the descriptors that go with it."""


@dataclass(frozen=True, slots=True)
class Method:
    """One method of the protocol."""

    service: str
    name: str
    descriptor: MethodDescriptor
    request_type: type[Message]
    response_type: type[Message]

    @property
    def full_name(self) -> str:
        """``/grant_broker.v1.Gntdev/Map``: the method as gRPC names it on the wire."""
        return f"/{SERVICES[self.service].full_name}/{self.name}"

    @property
    def streaming(self) -> bool:
        return self.descriptor.server_streaming

    @property
    def receives_fds(self) -> bool:
        """The request names descriptors the client sends with it."""
        return FD_TRANSFER_FIELD in self.descriptor.input_type.fields_by_name

    @property
    def sends_fds(self) -> bool:
        """The response names descriptors the broker sends with it."""
        return FD_TRANSFER_FIELD in self.descriptor.output_type.fields_by_name


def _method(service: str, descriptor: MethodDescriptor) -> Method:
    return Method(
        service,
        descriptor.name,
        descriptor,
        message_factory.GetMessageClass(descriptor.input_type),
        message_factory.GetMessageClass(descriptor.output_type),
    )


METHODS: dict[str, Method] = {
    method.full_name: method
    for service_name, service in SERVICES.items()
    for method in (_method(service_name, descriptor) for descriptor in service.methods)
}
"""Every method of the protocol, by its full gRPC name."""


def method(service: str, name: str) -> Method:
    """The method *name* of *service* (``method("Gntdev", "Map")``)."""
    return METHODS[f"/{SERVICES[service].full_name}/{name}"]
