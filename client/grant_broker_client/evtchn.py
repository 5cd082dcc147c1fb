"""Event channels through the broker: bind, notify, and receive events as a stream.

Ports are bound through the session (each session has its own evtchn handle
in the broker) and events arrive on subscriptions: async iterators of
:class:`PortFired` and :class:`EventsLost`.  A subscription is live as soon as
``await evtchn.subscribe()`` (or ``async with evtchn.subscribe()``) returns:
any notification sent after that point reaches it.

A fired port stays masked until it is unmasked, so notifications sent in
between coalesce into one event.  By default the broker unmasks a port as
soon as its event is queued for the subscription (``auto_unmask=True``); with
``auto_unmask=False`` call :meth:`EvtchnClient.unmask` once the event is
handled.  A subscription that falls behind its queue (``queue_size``) loses
events and is told how many by an :class:`EventsLost` before the next one.

A subscription that names ports ends when one of them is unbound: it yields
what the broker had already sent, then raises :class:`PortUnbound` (errno
``ENOTCONN``).  It never hears a new channel that gets the same port number;
subscribe again for that.  A subscription to all ports goes on.  Events of an
unbound port that the broker had not sent yet are dropped.

Example — domain 2 offers a port, domain 1 connects, and each side hears the
other (on the emulated backend, where a session may choose its domain)::

    import asyncio
    import grant_broker_client
    from grant_broker_client.evtchn import PortFired

    async def ping_pong(socket_path: str) -> None:
        async with await grant_broker_client.connect(socket_path, domid=2) as server, \\
                   await grant_broker_client.connect(socket_path, domid=1) as client:
            offered = await server.evtchn.bind_unbound_port(remote_domain=1)
            async with server.evtchn.subscribe(ports=[offered]) as server_events:
                port = await client.evtchn.bind_interdomain(remote_domain=2, remote_port=offered)
                async with client.evtchn.subscribe(ports=[port]) as client_events:
                    # A new interdomain port starts out pending once, as on Xen.
                    assert await anext(client_events) == PortFired(port)
                    await client.evtchn.notify(port)                 # client -> server
                    assert await anext(server_events) == PortFired(offered)
                    await server.evtchn.notify(offered)              # server -> client
                    assert await anext(client_events) == PortFired(port)

    # asyncio.run(ping_pong("/run/grant-broker/broker.sock"))

Errors are :class:`~grant_broker_client.errors.BrokerClientError` carrying the
broker's errno: ``ENOTCONN`` (FAILED_PRECONDITION) for a port this session did
not bind, ``ESRCH`` (NOT_FOUND) for an unknown domain, ``EINVAL``
(INVALID_ARGUMENT) for a port that cannot be bound, ``EDQUOT``
(RESOURCE_EXHAUSTED) beyond the session's ports or subscriptions; and from a
subscription's iterator, :class:`PortUnbound` (``ENOTCONN``) once a port it
names is unbound.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc

from grant_broker_protocol.v1 import evtchn_pb2, evtchn_pb2_grpc
from grant_broker_client.errors import BrokerClientError, from_rpc_error
from grant_broker_client.fastpath import FastStream

if TYPE_CHECKING:
    from grant_broker_client.session import Session

__all__ = [
    "EventsLost",
    "EvtchnClient",
    "EvtchnEvent",
    "EvtchnSubscription",
    "PortFired",
    "PortUnbound",
    "Subscribing",
]

_U32_MAX = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class PortFired:
    """*port* fired (one or more notifications, coalesced while it was masked)."""

    port: int


@dataclass(frozen=True, slots=True)
class EventsLost:
    """The subscription's queue was full: *count* events were dropped just before the next one."""

    count: int


EvtchnEvent = PortFired | EventsLost


class PortUnbound(BrokerClientError):
    """A port the subscription names was unbound, so the subscription has ended.

    Raised by :class:`EvtchnSubscription` once it has yielded what the broker
    sent before the end; the broker's stream ended with ``ENOTCONN``
    (FAILED_PRECONDITION) and says which port in :attr:`detail`.

    Attributes:
        ports: the ports the subscription named.
    """

    def __init__(
        self, code_errno: int, operation: str, detail: str = "", *, code: grpc.StatusCode, ports: tuple[int, ...] = ()
    ) -> None:
        super().__init__(code_errno, operation, detail, code=code)
        self.ports = ports

    @classmethod
    def from_client_error(cls, error: BrokerClientError, ports: tuple[int, ...]) -> "PortUnbound":
        return cls(error.errno, error.operation, error.detail, code=error.code, ports=ports)

    def __reduce__(self) -> tuple[Callable[..., PortUnbound], tuple[object, ...]]:
        return (_rebuild_port_unbound, (self.errno, self.operation, self.detail, self.code.name, self.ports))


def _rebuild_port_unbound(code_errno: int, operation: str, detail: str, code: str, ports: tuple[int, ...]) -> PortUnbound:
    return PortUnbound(code_errno, operation, detail, code=grpc.StatusCode[code], ports=ports)


def _u32(operation: str, what: str, value: int) -> int:
    if not 0 <= value <= _U32_MAX:
        raise BrokerClientError(
            errno.EINVAL, operation, f"{what} {value} does not fit in 32 bits", code=grpc.StatusCode.INVALID_ARGUMENT
        )
    return value


class EvtchnClient:
    """Event channels of one session: ``session.evtchn``.

    >>> async def bind_and_wait(session) -> None:          # doctest: +SKIP
    ...     port = await session.evtchn.bind_unbound_port(remote_domain=0)
    ...     async with session.evtchn.subscribe(ports=[port]) as events:
    ...         async for event in events:
    ...             print(event)                             # PortFired(port=...)
    """

    def __init__(self, session: "Session") -> None:
        self._session = session
        self._stub_instance: evtchn_pb2_grpc.EvtchnStub | None = None

    @property
    def _stub(self) -> evtchn_pb2_grpc.EvtchnStub:
        # Made on first use, and never on a closed session: grpcio (1.85)
        # crashes the process when a stub is built on a closed aio channel
        # (registering its methods uses the freed core channel).
        if self._stub_instance is None:
            if self._session.closed:
                raise BrokerClientError(errno.EPIPE, "evtchn", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)
            self._stub_instance = evtchn_pb2_grpc.EvtchnStub(self._session.grpc_channel)
        return self._stub_instance

    # ---------------------------------------------------------------- binding

    async def bind_unbound_port(self, remote_domain: int) -> int:
        """Allocate a local port that *remote_domain* may connect to; return it
        (``IOCTL_EVTCHN_BIND_UNBOUND_PORT``)."""
        request = evtchn_pb2.BindUnboundPortRequest(remote_domain=_u32("evtchn bind unbound port", "domain", remote_domain))
        response = await self._session.call(self._stub.BindUnboundPort, request)
        return int(response.port)

    async def bind_interdomain(self, remote_domain: int, remote_port: int) -> int:
        """Connect to *remote_port*, left unbound for this domain by *remote_domain*;
        return the local port (``IOCTL_EVTCHN_BIND_INTERDOMAIN``).

        The new port is pending once right away, as Xen makes it, so that a
        notification sent before the connection is not lost: the first
        subscription covering it receives one :class:`PortFired`.
        """
        op = "evtchn bind interdomain"
        request = evtchn_pb2.BindInterdomainRequest(
            remote_domain=_u32(op, "domain", remote_domain), remote_port=_u32(op, "port", remote_port)
        )
        response = await self._session.call(self._stub.BindInterdomain, request)
        return int(response.port)

    async def bind_virq(self, virq: int) -> int:
        """Bind virtual IRQ *virq*; return the local port (``IOCTL_EVTCHN_BIND_VIRQ``)."""
        request = evtchn_pb2.BindVirqRequest(virq=_u32("evtchn bind virq", "VIRQ", virq))
        response = await self._session.call(self._stub.BindVirq, request)
        return int(response.port)

    async def unbind(self, port: int) -> None:
        """Close *port* (``IOCTL_EVTCHN_UNBIND``); the remote end becomes unbound."""
        await self._session.call(self._stub.Unbind, evtchn_pb2.UnbindRequest(port=_u32("evtchn unbind", "port", port)))

    # ---------------------------------------------------------------- signalling

    async def notify(self, port: int) -> None:
        """Signal the remote end of *port* (``IOCTL_EVTCHN_NOTIFY``)."""
        await self._session.call(self._stub.Notify, evtchn_pb2.NotifyRequest(port=_u32("evtchn notify", "port", port)))

    async def unmask(self, port: int) -> None:
        """Let *port* fire again (a write of the port to the evtchn device).  A
        notification that arrived while it was masked is delivered now."""
        await self._session.call(self._stub.Unmask, evtchn_pb2.UnmaskRequest(port=_u32("evtchn unmask", "port", port)))

    async def reset(self) -> None:
        """Drop the events the session's handle has pending (``IOCTL_EVTCHN_RESET``)."""
        await self._session.call(self._stub.Reset, evtchn_pb2.ResetRequest())

    async def restrict_domid(self, domid: int) -> None:
        """Allow binds to *domid* only, from now on (``IOCTL_EVTCHN_RESTRICT_DOMID``)."""
        request = evtchn_pb2.RestrictDomidRequest(domid=_u32("evtchn restrict domid", "domain", domid))
        await self._session.call(self._stub.RestrictDomid, request)

    # ---------------------------------------------------------------- events

    def subscribe(
        self, ports: Iterable[int] = (), *, auto_unmask: bool = True, queue_size: int = 0
    ) -> "Subscribing":
        """Receive the events of *ports* (every port of the session when empty).

        Use ``async with evtchn.subscribe(...) as events`` or
        ``events = await evtchn.subscribe(...)`` (then ``await events.close()``);
        either way the subscription is live once that returns.

        Args:
            ports: ports this session bound; empty for all of them.
            auto_unmask: the broker unmasks a port once its event is queued
                for this subscription; off: call :meth:`unmask` yourself.
            queue_size: events the broker buffers for this subscription
                (0: the broker's default).

        Raises (when awaited):
            BrokerClientError: ``ENOTCONN`` for a port the session did not bind,
                ``EDQUOT`` when the session has its maximum of subscriptions.
        """
        op = "evtchn subscribe"
        request = evtchn_pb2.SubscribeRequest(
            ports=[_u32(op, "port", port) for port in ports],
            auto_unmask=auto_unmask,
            queue_size=_u32(op, "queue size", queue_size),
        )
        return Subscribing(self, request)


class Subscribing:
    """What :meth:`EvtchnClient.subscribe` returns: await it for an
    :class:`EvtchnSubscription`, or use it with ``async with`` (which closes
    the subscription on exit)."""

    def __init__(self, client: EvtchnClient, request: evtchn_pb2.SubscribeRequest) -> None:
        self._client = client
        self._session = client._session
        self._request = request
        self._subscription: EvtchnSubscription | None = None

    def __await__(self) -> Generator[Any, None, "EvtchnSubscription"]:
        return self._start().__await__()

    async def _start(self) -> "EvtchnSubscription":
        if self._session.closed:
            raise BrokerClientError(errno.EPIPE, "evtchn subscribe", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)
        call = self._session.stream(self._client._stub.Subscribe, self._request)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        except BaseException:
            call.cancel()
            raise
        ended = first is grpc.aio.EOF or first is None  # gRPC's end of stream, or the fast path's
        if ended or first.WhichOneof("kind") != "subscribed":
            call.cancel()
            got = "the end of the stream" if ended else f"{first.WhichOneof('kind')!r}"
            raise BrokerClientError(
                errno.EPROTO, "evtchn subscribe", f"expected the 'subscribed' marker first, got {got}",
                code=grpc.StatusCode.INTERNAL,
            )
        return EvtchnSubscription(self._session, call, tuple(self._request.ports))

    async def __aenter__(self) -> "EvtchnSubscription":
        self._subscription = await self._start()
        return self._subscription

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._subscription is not None:
            await self._subscription.close()


class EvtchnSubscription:
    """A live subscription: an async iterator of :class:`PortFired` / :class:`EventsLost`.

    Iteration ends when the subscription or its session is closed, or when
    the broker ends the session; it raises :class:`PortUnbound` when a port
    it names is unbound, and :class:`BrokerClientError` if the stream fails.
    Close it (or use ``async with``) to stop receiving.

    Attributes:
        ports: the ports it names (empty: every port of the session).
    """

    def __init__(self, session: "Session", call: Any, ports: tuple[int, ...] = ()) -> None:
        self._session = session
        self._call = call
        self.ports = ports
        self._closed = False
        self._ended = False
        # The read in flight.  grpc.aio cancels the whole call when a read is
        # cancelled, so a caller's timeout (wait_for(anext(events), 1)) would
        # end the subscription; the read runs in a task of its own instead,
        # awaited through a shield, and a cancelled wait leaves it for the
        # next one.
        self._reading: asyncio.Task[Any] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> EvtchnEvent:
        if self._closed or self._ended:
            raise StopAsyncIteration
        message: Any  # an Event, or the end: None (fast path) or grpc.aio.EOF
        try:
            if isinstance(self._call, FastStream):
                # A fast-path stream is read from a queue: a cancelled read
                # loses nothing and leaves the stream as it was, so it needs
                # neither the task nor the shield of a gRPC read (each cost
                # an event tens of microseconds).
                message = await self._call.read()
            else:
                message = await self._read_grpc()
        except grpc.aio.AioRpcError as exc:
            self._reading = None
            self._ended = True
            if self._closed or self._session.closed:
                raise StopAsyncIteration from None
            raise self._stream_error(from_rpc_error(exc)) from None
        except BrokerClientError as exc:  # the fast path's stream failed
            self._reading = None
            self._ended = True
            if self._closed or self._session.closed:
                raise StopAsyncIteration from None
            raise self._stream_error(exc) from None
        self._reading = None
        if message is None:  # the fast path's end of stream
            self._ended = True
            raise StopAsyncIteration
        if message is grpc.aio.EOF:
            self._ended = True
            code = await self._call.code()
            if code != grpc.StatusCode.OK and not (self._closed or self._session.closed):
                failed = grpc.aio.AioRpcError(
                    code, trailing_metadata=await self._call.trailing_metadata(), details=await self._call.details()
                )
                raise self._stream_error(from_rpc_error(failed))
            raise StopAsyncIteration
        kind = message.WhichOneof("kind")
        if kind == "port":
            return PortFired(message.port)
        if kind == "lost":
            return EventsLost(message.lost)
        raise BrokerClientError(
            errno.EPROTO, "evtchn subscribe", f"unexpected event {kind!r} on a live subscription",
            code=grpc.StatusCode.INTERNAL,
        )

    async def _read_grpc(self) -> Any:
        """The gRPC call's next message, read in a task of its own behind a shield (see ``_reading``)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._call.read())
            self._reading.add_done_callback(_retrieve)
        reading = self._reading
        try:
            return await asyncio.shield(reading)
        except asyncio.CancelledError:
            if not reading.done():
                raise  # this task was cancelled; the read goes on for the next call
            self._reading = None
            if reading.cancelled() and (self._closed or self._session.closed):
                # close() (ours or the session's) cancelled the call.
                self._ended = True
                raise StopAsyncIteration from None
            raise

    def _stream_error(self, error: BrokerClientError) -> BrokerClientError:
        if error.errno == errno.ENOTCONN:
            # The ports were checked when the stream started: ENOTCONN on a
            # live stream means one of them has been unbound since.
            return PortUnbound.from_client_error(error, self.ports)
        return error

    async def close(self) -> None:
        """Stop receiving; the broker forgets the subscription.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        reading, self._reading = self._reading, None
        if reading is not None:
            await asyncio.wait([reading])  # the cancelled call ends it

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _retrieve(task: "asyncio.Task[Any]") -> None:
    # A read left behind by a timed-out wait may end with an error nobody
    # awaits (the session closed meanwhile): mark it seen, so asyncio does not
    # report "exception was never retrieved".  A waiter still gets it.
    if not task.cancelled():
        task.exception()
