"""gRPC handlers built from the route table.

Each handler does what only the transport can: find the call's session from
its metadata token, run the route's operation, deliver the reply's
descriptors as a transfer on the session's fd channel (naming it in the
response's ``fd_transfer``), and map a failure to a status
(:mod:`.status`).  One generic handler per service serves all its methods —
grpc.aio keeps one pending call request per *registered* method and waits on
all of them for every call, which cost ~40 µs of event-loop time per call.
A call is authenticated, and counted among its session's calls in flight,
before its request is read; the request is checked against its route's size
limit before it is decoded (:class:`_Gate`).  Each handler tells its method's
:class:`~grant_broker.core.observe.CallRecorder` how the call ended and how
long it took (the daemon's metrics; nothing by default).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable, Iterable
from time import perf_counter
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError, Message

from grant_broker.backend.contract import PAGE_SIZE
from grant_broker.core.failures import as_broker_error
from grant_broker.core.observe import NO_OBSERVER, TRANSPORT_GRPC, CallObserver, CallRecorder
from grant_broker.core.operations.gntdev import MAX_COPY_SEGMENTS
from grant_broker.core.policy import Limits
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.reply import Reply
from grant_broker.core.routes import Route, StreamOperation, UnaryOperation
from grant_broker_protocol.methods import SERVICES
from grant_broker.core.session import Session
from grant_broker.transport.grpc.status import abort, is_abort
from grant_broker_protocol.endpoints import SESSION_METADATA_KEY
from grant_broker_protocol.errors import BrokerError


# The stubs make these generic; at run time they are plain classes.
_Context: TypeAlias = "grpc.aio.ServicerContext[Message, Message]"
_Handler: TypeAlias = "grpc.RpcMethodHandler[Message, Message]"


def session_token(context: _Context) -> str | None:
    """The session token the call carries in its metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA_KEY:
            return str(value)
    return None


SMALL_REQUEST_BYTES = 64 * 1024
"""What a request that names no list of grants, ports or segments may weigh:
such requests are a few dozen bytes; the rest is room for fields added later."""


def request_size_limit(route: Route, limits: Limits) -> int:
    """The largest request *route* accepts, in bytes: :data:`SMALL_REQUEST_BYTES`
    plus, for a request that lists grants, ports or copy segments, as many
    entries as a session may ever use, each at its largest encoding.

    grpc-python has no per-method receive limit, and a request is in the
    broker's memory once grpc has read it: this limit spares the decoding (a
    million-entry list decodes to far more than its bytes); the server-wide
    ``grpc.max_receive_message_length`` (16 MiB, the largest legitimate
    request: a GrantCopy with a page of inline bytes per segment) bounds
    what is read, and calls without a valid session are refused before their
    request is read at all (:class:`_Gate`).
    """
    entries, entry_bytes = {
        # packed uint32 refs and domids: 5 bytes each at most
        ("Gntdev", "Map"): (limits.max_grants_per_session, 5 + 5),
        # GrantRef{domid, ref}: two 5-byte varints, their tags, the entry's tag and length
        ("Gntdev", "MapGrantRef"): (limits.max_grants_per_session, 14),
        ("Gntdev", "DmabufExportFromRefs"): (limits.max_grants_per_session, 5),
        # a segment with a page of inline source bytes, and its framing
        ("Gntdev", "GrantCopy"): (MAX_COPY_SEGMENTS, PAGE_SIZE + 64),
        ("Evtchn", "Subscribe"): (limits.max_ports_per_session, 5),
    }.get((route.service, route.method), (0, 0))
    return SMALL_REQUEST_BYTES + entries * entry_bytes


class _Gate:
    """What is decided about a call before grpc reads its request.

    grpc.aio reads the request of a unary handler before it runs it, and the
    request of a request-streaming handler only when the handler asks
    (``context.read()``); so every route is served as request-streaming, and
    its handler first authenticates the call — a call without a valid token
    is refused before its body is read: a flood of large unauthenticated
    requests costs the broker their headers, not their bodies — and takes
    one of its session's calls in flight (``Session.call_in_flight``, the
    ``max_calls_per_session`` / ``max_calls_per_uid`` budgets: EDQUOT
    beyond them, again before the body is read).  The request is then read
    and checked against :func:`request_size_limit` before it is decoded.
    """

    def __init__(self, registry: SessionRegistry) -> None:
        self._registry = registry

    def authenticate(self, route: Route, context: _Context) -> Session | None:
        """The call's live session (``None`` for a session-optional call that names none).

        Raises:
            BrokerError: EPERM for no token, an unknown one or an ended session's.
        """
        token = session_token(context)
        if route.session_optional and token is None:
            return None
        return self._registry.lookup(token)

    def deserializer(self, route: Route) -> Callable[[bytes], Message]:
        """*route*'s request decoder: EMSGSIZE past :func:`request_size_limit`
        (before decoding), EINVAL for bytes that do not decode."""
        limit = request_size_limit(route, self._registry.limits)
        parse = route.request_type.FromString
        name = f"{route.service}.{route.method}"

        def deserialize(raw: bytes) -> Message:
            if len(raw) > limit:
                raise BrokerError(errno.EMSGSIZE, name, f"the request has {len(raw)} bytes; this call accepts at most {limit}")
            try:
                return parse(raw)
            except DecodeError as exc:
                raise BrokerError(errno.EINVAL, name, f"the request does not decode: {exc}") from None

        return deserialize


async def deliver(session: Session, reply: Reply[Any]) -> Message:
    """The reply's message, its descriptors sent ahead of it as a transfer
    on the session's fd channel (then closed here, whatever happens)."""
    try:
        transfer_id = await session.channel.send_transfer([fd.fileno() for fd in reply.fds])
    finally:
        reply.close()
    message: Message = reply.message
    setattr(message, "fd_transfer", transfer_id)  # every route that sends_fds has the field
    return message


def _unary_handler(gate: "_Gate", route: Route, recorder: CallRecorder) -> _Handler:
    operation = cast(UnaryOperation, route.operation)
    sends_fds = route.sends_fds
    name = f"{route.service}.{route.method}"
    record = recorder.record

    # Served as request-streaming: grpc reads a unary handler's request before
    # calling it, a request-streaming one's only when it asks (see _Gate).
    async def handle(requests: object, context: _Context) -> Message:
        started = perf_counter()
        code = errno.ECANCELED  # unless it ends otherwise: the client (or the broker's shutdown) cancelled it
        try:
            session = gate.authenticate(route, context)
            if session is None:  # a session-optional call without one
                message: Message = (await operation(None, await _read_request(route, context))).message
                code = 0
                return message
            with session.call_in_flight(name):
                reply = await operation(session, await _read_request(route, context))
                if sends_fds:
                    message = await deliver(session, reply)
                else:
                    message = reply.message
            code = 0
            return message
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
            if is_abort(exc):
                raise
            error = as_broker_error(exc)
            code = error.errno
            await abort(context, error)
        finally:
            record(code, perf_counter() - started)

    return grpc.stream_unary_rpc_method_handler(
        handle, request_deserializer=gate.deserializer(route), response_serializer=route.response_type.SerializeToString
    )


def _stream_handler(gate: "_Gate", route: Route, recorder: CallRecorder) -> _Handler:
    operation = cast(StreamOperation, route.operation)
    name = f"{route.service}.{route.method}"
    record = recorder.record

    async def handle(requests: object, context: _Context) -> AsyncIterator[Message]:
        started = perf_counter()
        code = errno.ECANCELED  # unless it ends otherwise: the client (or the broker's shutdown) cancelled it
        try:
            session = gate.authenticate(route, context)
            # A call in flight while its request is read; then the stream
            # lives on under the subscriptions budget.
            if session is None:
                request = await _read_request(route, context)
            else:
                with session.call_in_flight(name):
                    request = await _read_request(route, context)
            async for message in operation(session, request):
                yield message
            code = 0
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
            if is_abort(exc):
                raise
            error = as_broker_error(exc)
            code = error.errno
            await abort(context, error)
        finally:
            record(code, perf_counter() - started)

    return grpc.stream_stream_rpc_method_handler(
        handle, request_deserializer=gate.deserializer(route), response_serializer=route.response_type.SerializeToString
    )


async def _read_request(route: Route, context: _Context) -> Message:
    """The call's one request message (read now, after the call was admitted)."""
    request: object = await context.read()
    if not isinstance(request, Message):  # grpc.aio.EOF: the client sent none
        raise BrokerError(errno.EINVAL, f"{route.service}.{route.method}", "the call carries no request message")
    return request


def generic_handlers(
    registry: SessionRegistry, routes: Iterable[Route], observer: CallObserver = NO_OBSERVER
) -> list[grpc.GenericRpcHandler]:
    """One generic handler per service, serving every route of that service;
    each call is reported to *observer*'s recorder of its method."""
    gate = _Gate(registry)
    by_service: dict[str, dict[str, _Handler]] = {}
    for route in routes:
        make = _stream_handler if route.streaming else _unary_handler
        recorder = observer.recorder(route.service, route.method, TRANSPORT_GRPC)
        by_service.setdefault(route.service, {})[route.method] = make(gate, route, recorder)
    return [
        grpc.method_handlers_generic_handler(SERVICES[service].full_name, methods) for service, methods in by_service.items()
    ]
