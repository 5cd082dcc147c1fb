"""The admin listener's gRPC handlers: the ``Admin`` service, and a refusal for every device call.

The listener is TCP with mutual TLS (the daemon makes it:
``daemon/admin.py``); by the time a handler runs, gRPC has checked the
client's certificate against the configured CA.  What the handlers add is
who the certificate names — read from the call's auth context: the
subject's common name, the whole subject, and every subject alternative
name — handed to :class:`~grant_broker.core.admin.Administration`, which
checks the rights the policy gives that identity, runs the operation and
audits it.  Failures become statuses by the one mapping
(:mod:`.status`): an identity without the right is PERMISSION_DENIED.

The device services (``grant_broker.v1.Gntdev`` and the rest, ``Broker``
too) are not served here: their calls pass descriptors on a Unix socket's fd
channel, which TCP has not, and they need a session, which only the fd
channel's hello opens.  Each is answered FAILED_PRECONDITION, before its
request is read.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from typing import TypeAlias

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from grant_broker.core.admin import RIGHT_OF, AdminCaller, Administration
from grant_broker.core.failures import as_broker_error
from grant_broker.transport.grpc.status import abort, is_abort
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.v1 import admin_pb2

_Context: TypeAlias = "grpc.aio.ServicerContext[Message, Message]"
_Handler: TypeAlias = "grpc.RpcMethodHandler[Message, Message]"

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
PROTOCOL_PREFIX = "/grant_broker.v1."
"""Every method of the protocol's package; those not of ``Admin`` are refused."""

# The auth context's properties naming the peer (grpc core's ssl transport security).
_NAME_PROPERTIES = ("x509_common_name", "x509_subject", "x509_subject_alternative_name")


def certificate_names(context: _Context) -> tuple[str, ...]:
    """Every name the peer's certificate carries, as gRPC read it: subject
    common name, the whole subject, subject alternative names (no duplicates,
    in that order)."""
    auth = context.auth_context() or {}
    names: list[str] = []
    for key in _NAME_PROPERTIES:
        for value in auth.get(key, ()):
            name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if name and name not in names:
                names.append(name)
    return tuple(names)


def _decoder(message_type: type[Message], name: str) -> Callable[[bytes], Message]:
    parse = message_type.FromString

    def decode(raw: bytes) -> Message:
        try:
            return parse(raw)
        except DecodeError as exc:
            raise BrokerError(errno.EINVAL, name, f"the request does not decode: {exc}") from None

    return decode


def _admin_handler(admin: Administration, method: str) -> _Handler:
    async def handle(request: Message, context: _Context) -> Message:
        try:
            caller = AdminCaller(certificate_names(context), context.peer())
            return await admin.call(caller, method, request)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
            if is_abort(exc):
                raise
            await abort(context, as_broker_error(exc))

    descriptor = ADMIN_SERVICE.methods_by_name[method]
    request_type = message_factory.GetMessageClass(descriptor.input_type)
    response_type = message_factory.GetMessageClass(descriptor.output_type)
    return grpc.unary_unary_rpc_method_handler(
        handle,
        request_deserializer=_decoder(request_type, f"Admin.{method}"),
        response_serializer=response_type.SerializeToString,
    )


def _refusal(method: str) -> _Handler:
    """A device call on the admin listener: FAILED_PRECONDITION, its request never read."""
    error = BrokerError(
        errno.ENOTCONN,
        method.lstrip("/"),
        "the admin listener serves only grant_broker.v1.Admin: device calls pass descriptors and need a session, "
        "which only the broker's Unix socket and its fd channel give",
    )

    async def handle(requests: object, context: _Context) -> None:
        await abort(context, error)

    return grpc.stream_stream_rpc_method_handler(handle)


class _AdminListenerHandler(grpc.GenericRpcHandler):
    def __init__(self, admin: Administration) -> None:
        self._admin_methods = {
            f"/{ADMIN_SERVICE.full_name}/{method}": _admin_handler(admin, method) for method in RIGHT_OF
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        method: str = handler_call_details.method
        handler = self._admin_methods.get(method)
        if handler is not None:
            return handler
        if method.startswith(PROTOCOL_PREFIX) and not method.startswith(f"/{ADMIN_SERVICE.full_name}/"):
            return _refusal(method)
        return None  # UNIMPLEMENTED: an Admin method this broker does not have, or a service of no protocol of its


def admin_handlers(admin: Administration) -> Iterable[grpc.GenericRpcHandler]:
    """The admin listener's handlers: ``Admin`` served by *admin*, every
    other method of the protocol refused with FAILED_PRECONDITION."""
    return [_AdminListenerHandler(admin)]
