"""gRPC handlers built from the route table.

Each handler does what only the transport can: find the call's session from
its metadata token, run the route's operation, deliver the reply's
descriptors as a transfer on the session's fd channel (naming it in the
response's ``fd_transfer``), and map a failure to a status
(:mod:`.status`).  One generic handler serves every method — grpc.aio keeps
one pending call request per *registered* method and waits on all of them
for every call, which cost ~40 µs of event-loop time per call.
A call is authenticated, and counted among its session's calls in flight,
before its request is read — when grpc asks for its handler
(:class:`_Admission`); the request is checked against its route's size limit
before it is decoded (:func:`request_decoder`).  Each handler tells its
method's :class:`~grant_broker.core.observe.CallRecorder` how the call ended
and how long it took (the daemon's metrics; nothing by default).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from time import perf_counter
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError, Message

from grant_broker.backend.contract import PAGE_SIZE
from grant_broker.core.failures import as_broker_error
from grant_broker.core.observe import NO_OBSERVER, NO_RECORDER, TRANSPORT_GRPC, CallObserver, CallRecorder
from grant_broker.core.operations.gntdev import MAX_COPY_SEGMENTS
from grant_broker.core.policy import Limits
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.reply import Reply
from grant_broker.core.routes import Route, StreamOperation, UnaryOperation
from grant_broker.core.session import CallSlot, Session
from grant_broker.transport.grpc.status import abort, is_abort
from grant_broker_protocol.endpoints import SESSION_METADATA_KEY
from grant_broker_protocol.errors import BrokerError


# The stubs make these generic; at run time they are plain classes.
_Context: TypeAlias = "grpc.aio.ServicerContext[Message, Message]"
_Handler: TypeAlias = "grpc.RpcMethodHandler[Message, Message]"
_Metadata: TypeAlias = "Sequence[tuple[str, str | bytes]] | None"


def session_token(metadata: _Metadata) -> str | None:
    """The session token a call carries in its metadata (the call's
    ``invocation_metadata``), if any."""
    for key, value in metadata or ():
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
    request is read at all (:class:`_Admission`).
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


class Unreadable:
    """What a route's decoder hands on in place of a request it refused
    (EMSGSIZE, EINVAL): grpc.aio decodes a unary call's request before the
    handler runs, and an exception there would reach the client as UNKNOWN,
    without its errno.  The handler raises :attr:`error`."""

    __slots__ = ("error",)

    def __init__(self, error: BrokerError) -> None:
        self.error = error


def request_decoder(route: Route, limits: Limits) -> Callable[[bytes], "Message | Unreadable"]:
    """*route*'s request decoder: :class:`Unreadable` (EMSGSIZE) past
    :func:`request_size_limit`, checked before decoding, or (EINVAL) for
    bytes that do not decode."""
    limit = request_size_limit(route, limits)
    parse = route.request_type.FromString
    name = f"{route.service}.{route.method}"

    def deserialize(raw: bytes) -> Message | Unreadable:
        if len(raw) > limit:
            return Unreadable(BrokerError(
                errno.EMSGSIZE, name, f"the request has {len(raw)} bytes; this call accepts at most {limit}"
            ))
        try:
            return parse(raw)
        except DecodeError as exc:
            return Unreadable(BrokerError(errno.EINVAL, name, f"the request does not decode: {exc}"))

    return deserialize


class _Admission:
    """What is decided about a call before grpc reads its request.

    grpc.aio asks the generic handler for a call's method handler
    (``service(handler_call_details)``, with the call's metadata) before it
    reads anything of the request, in the task that then serves the call; so
    the call is admitted there: authenticated — a call without a valid token
    is refused before its body is read: a flood of large unauthenticated
    requests costs the broker their headers, not their bodies — and given
    one of its session's calls in flight (:meth:`Session.take_call`, the
    ``max_calls_per_session`` / ``max_calls_per_uid`` budgets: EDQUOT beyond
    them, again before the body is read).  An admitted call gets a plain
    handler, which grpc runs once it has read (and :func:`request_decoder`
    checked) the request; a refused one gets a request-streaming handler,
    whose request grpc reads only when asked — it never is: the handler
    ends the call with the refusal.

    The place is given back when the handler ends, or — if the call dies
    before its handler runs (cancelled while its request was being read,
    the server stopping) — when the call's task ends (a done callback): the
    first of the two gives it back (:class:`~grant_broker.core.session.CallSlot`).
    (A call whose client half-closes without any request message is ended
    by grpc.aio without running the handler, and without an answer: the
    client waits for its deadline; its place comes back with its task.)
    """

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    def admit(self, route: Route, metadata: _Metadata, operation: str) -> tuple[Session, CallSlot] | None:
        """The call's live session and its place among the session's calls in
        flight; ``None`` for a session-optional call that names no session
        (it takes no place).

        Raises:
            BrokerError: EPERM for no token, an unknown one or an ended
                session's; EDQUOT past a budget of calls in flight; EIO when
                not run in the call's task (nothing would give its place
                back: grpc.aio looks handlers up in the call's task).
        """
        token = session_token(metadata)
        if token is None and route.session_optional:
            return None
        session = self.registry.lookup(token)
        return session, session.take_call(operation)


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


_MethodHandlers: TypeAlias = Callable[[_Metadata], _Handler]
"""A route's handler for a call, given the call's metadata (see :class:`_Admission`)."""


class _UnaryCall:
    """An admitted unary call's handler: what ``grpc.unary_unary_rpc_method_handler``
    makes, without what that costs per call (an import and a namedtuple);
    grpc.aio reads these attributes only."""

    __slots__ = ("unary_unary", "request_deserializer", "response_serializer")
    request_streaming = False
    response_streaming = False
    unary_stream = None
    stream_unary = None
    stream_stream = None

    def __init__(self, behaviour: Callable[..., Any], decode: Callable[[bytes], Any], encode: Callable[[Any], bytes]) -> None:
        self.unary_unary = behaviour
        self.request_deserializer = decode
        self.response_serializer = encode


def _refusal(error: BrokerError, started: float, record: Callable[[int, float], None], *, streaming: bool) -> _Handler:
    """A handler that ends the call with *error* without reading its request:
    request-streaming (grpc reads such a request only when the handler asks),
    and for a stream a coroutine (grpc.aio's reader-writer form: it writes nothing)."""

    async def refuse(requests: object, context: _Context) -> Any:
        record(error.errno, perf_counter() - started)
        await abort(context, error)

    if streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


def _unary_handlers(admission: _Admission, route: Route, recorder: CallRecorder) -> _MethodHandlers:
    operation = cast(UnaryOperation, route.operation)
    sends_fds = route.sends_fds
    name = f"{route.service}.{route.method}"
    record = None if recorder is NO_RECORDER else recorder.record  # (metrics off: nothing to time)
    decode = request_decoder(route, admission.registry.limits)
    encode = route.response_type.SerializeToString
    admit = admission.admit

    def handler(metadata: _Metadata) -> _Handler:
        started = perf_counter()
        try:
            admitted = admit(route, metadata, name)
        except BrokerError as error:
            return _refusal(error, started, recorder.record, streaming=False)

        async def serve(request: Message | Unreadable, context: _Context) -> Message:
            code = errno.ECANCELED  # unless it ends otherwise: the client (or the broker's shutdown) cancelled it
            try:
                if admitted is None:  # a session-optional call without a session
                    if type(request) is Unreadable:
                        raise request.error
                    message: Message = (await operation(None, request)).message
                else:
                    session, slot = admitted
                    try:
                        if type(request) is Unreadable:
                            raise request.error
                        reply = await operation(session, request)
                        message = await deliver(session, reply) if sends_fds else reply.message
                    finally:
                        slot.release()  # the place taken at admission
                code = 0
                return message
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
                if is_abort(exc):
                    raise
                error = as_broker_error(exc)
                code = error.errno
                await abort(context, error)
            finally:
                if record is not None:
                    record(code, perf_counter() - started)

        return cast(_Handler, _UnaryCall(serve, decode, encode))

    return handler


def _stream_handlers(admission: _Admission, route: Route, recorder: CallRecorder) -> _MethodHandlers:
    operation = cast(StreamOperation, route.operation)
    name = f"{route.service}.{route.method}"
    record = recorder.record
    decode = request_decoder(route, admission.registry.limits)
    encode = route.response_type.SerializeToString

    def handler(metadata: _Metadata) -> _Handler:
        started = perf_counter()
        try:
            admitted = admission.admit(route, metadata, name)
        except BrokerError as error:
            return _refusal(error, started, record, streaming=True)
        session, slot = admitted if admitted is not None else (None, None)

        async def stream(request: Message | Unreadable, context: _Context) -> AsyncIterator[Message]:
            code = errno.ECANCELED  # unless it ends otherwise: the client (or the broker's shutdown) cancelled it
            try:
                # A call in flight while its request was read; the stream
                # lives on under the subscriptions budget.
                if slot is not None:
                    slot.release()
                if type(request) is Unreadable:
                    raise request.error
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

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=cast(Callable[[bytes], Message], decode), response_serializer=encode
        )

    return handler


class _Routes(grpc.GenericRpcHandler):
    """The generic handler of every route: a handler made for each call, by
    its route, from the call's metadata (:class:`_Admission`).  One for all
    services: grpc.aio asks each generic handler in turn for every call."""

    def __init__(self, methods: dict[str, _MethodHandlers]) -> None:
        self._methods = methods

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        handlers = self._methods.get(handler_call_details.method)
        if handlers is None:
            return None
        return handlers(handler_call_details.invocation_metadata)


def generic_handlers(
    registry: SessionRegistry, routes: Iterable[Route], observer: CallObserver = NO_OBSERVER
) -> list[grpc.GenericRpcHandler]:
    """The generic handler serving every route (a list, as grpc's server takes
    them); each call is reported to *observer*'s recorder of its method."""
    admission = _Admission(registry)
    methods: dict[str, _MethodHandlers] = {}
    for route in routes:
        make = _stream_handlers if route.streaming else _unary_handlers
        recorder = observer.recorder(route.service, route.method, TRANSPORT_GRPC)
        methods[route.full_name] = make(admission, route, recorder)
    return [_Routes(methods)]
