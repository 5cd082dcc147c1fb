"""The Evtchn service: event channels of a session, and their events as streams.

Each session binds ports through its own evtchn handle (``Session.evtchn``),
so a port is owned by exactly one session; the service also keeps the set of
ports each session bound, so that a request naming someone else's port is
refused with ``ENOTCONN`` — what the Linux driver answers for a port not
bound through the file — before any device is touched.

Events are read by one :class:`~grant_broker.service.events.EventFanout` per
session (the only reader of the session's handle) and delivered to each
``Subscribe`` stream from its own bounded queue.  A stream sends
``Event(subscribed=True)`` first: once the client has it, the subscription is
registered and nothing that fires later is missed.  Streams end when the
client cancels them or the session ends.

Other servicers (gntdev / gntalloc unmap notifications) find the session's
ports with :func:`session_ports`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final

import grpc

from grant_broker_protocol.errors import BrokerError
from grant_broker.service.events import MAX_QUEUE_SIZE, EventFanout, Fired, deliveries
from grant_broker.service.session import Session, SessionRegistry
from grant_broker.service.status import invalid, rpc, rpc_stream
from grant_broker_protocol.v1 import evtchn_pb2, evtchn_pb2_grpc

log = logging.getLogger(__name__)

STATE_KEY: Final = "evtchn"
"""``session.resources`` key of the session's :class:`SessionEvtchn`."""

FANOUT_KEY: Final = "evtchn.fanout"
"""``session.resources`` key of the session's :class:`EventFanout`, once one was needed."""

_DOMID_MAX: Final = 0xFFFF  # domid_t; the ioctl structs carry unsigned int and the kernel truncates


@dataclass
class SessionEvtchn:
    """What the Evtchn service keeps per session."""

    ports: set[int] = field(default_factory=set)
    """Ports this session bound and has not unbound."""

    fanout: EventFanout | None = None


def session_state(session: Session) -> SessionEvtchn:
    """The session's event-channel state, created on first use."""
    return session.service_state(STATE_KEY, SessionEvtchn)


def session_ports(session: Session) -> frozenset[int]:
    """The ports *session* has bound (empty when it never used event channels)."""
    state = session.resources.get(STATE_KEY)
    return frozenset(state.ports) if state is not None else frozenset()


def session_fanout(session: Session) -> EventFanout:
    """The one reader of the session's evtchn handle, started on first use and
    closed when the session is released (before its handle is closed)."""
    state = session_state(session)
    if state.fanout is None or state.fanout.closed:
        if session.closed.is_set():
            # Opening the handle now would leak it: release already ran.
            raise BrokerError(errno.ECANCELED, "evtchn subscribe", "the session has ended")
        fanout = EventFanout(session.evtchn, name=f"session {session.id}", bound_ports=lambda: tuple(state.ports))
        state.fanout = fanout
        session.resources[FANOUT_KEY] = fanout
        session.on_release(fanout.close)
    return state.fanout


def _check_domid(operation: str, domid: int, what: str = "domain") -> None:
    if domid > _DOMID_MAX:
        raise invalid(operation, f"{what} {domid} is not a domid_t (0..{_DOMID_MAX})")


def _owned_port(operation: str, state: SessionEvtchn, port: int) -> None:
    if port not in state.ports:
        raise BrokerError(errno.ENOTCONN, operation, f"port {port} is not bound by this session")


class EvtchnService(evtchn_pb2_grpc.EvtchnServicer):
    """``grant_broker.v1.Evtchn``: a thin adapter from gRPC to the session's evtchn handle."""

    def __init__(self, registry: SessionRegistry) -> None:
        self._registry = registry
        self._ending = False

    def end_streams(self) -> None:
        """End every Subscribe stream (with OK) and refuse new ones: for a
        graceful shutdown, call before ``server.stop(grace)`` so that open
        streams do not hold the grace period up to its end."""
        self._ending = True
        for session in self._registry.sessions:
            state = session.resources.get(STATE_KEY)
            if state is not None and state.fanout is not None:
                state.fanout.close()

    # ---------------------------------------------------------------- binding

    def _bind(self, session: Session, operation: str, bind: Callable[[Session], int]) -> evtchn_pb2.BindResponse:
        state = session_state(session)
        session.check_quota(
            operation, "event channel ports", session.usage.event_channels, 1, session.limits.max_ports_per_session
        )
        port = bind(session)
        state.ports.add(port)
        session.usage.event_channels += 1
        return evtchn_pb2.BindResponse(port=port)

    @rpc
    async def BindVirq(self, request: evtchn_pb2.BindVirqRequest, context: grpc.aio.ServicerContext) -> evtchn_pb2.BindResponse:
        session = self._registry.session_for(context)
        return self._bind(session, "evtchn bind virq", lambda s: s.evtchn.bind_virq(request.virq))

    @rpc
    async def BindInterdomain(
        self, request: evtchn_pb2.BindInterdomainRequest, context: grpc.aio.ServicerContext
    ) -> evtchn_pb2.BindResponse:
        session = self._registry.session_for(context)
        operation = "evtchn bind interdomain"
        _check_domid(operation, request.remote_domain, "remote domain")
        return self._bind(
            session, operation, lambda s: s.evtchn.bind_interdomain(request.remote_domain, request.remote_port)
        )

    @rpc
    async def BindUnboundPort(
        self, request: evtchn_pb2.BindUnboundPortRequest, context: grpc.aio.ServicerContext
    ) -> evtchn_pb2.BindResponse:
        session = self._registry.session_for(context)
        operation = "evtchn bind unbound port"
        _check_domid(operation, request.remote_domain, "remote domain")
        return self._bind(session, operation, lambda s: s.evtchn.bind_unbound_port(request.remote_domain))

    @rpc
    async def Unbind(self, request: evtchn_pb2.UnbindRequest, context: grpc.aio.ServicerContext) -> evtchn_pb2.UnbindResponse:
        session = self._registry.session_for(context)
        operation = "evtchn unbind"
        state = session_state(session)
        _owned_port(operation, state, request.port)
        try:
            session.evtchn.unbind(request.port)
        except BrokerError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            # The handle no longer has it (its domain went away): stop tracking it too.
            self._forget(session, state, request.port)
            raise
        self._forget(session, state, request.port)
        return evtchn_pb2.UnbindResponse()

    @staticmethod
    def _forget(session: Session, state: SessionEvtchn, port: int) -> None:
        state.ports.discard(port)
        session.usage.event_channels -= 1
        if state.fanout is not None:
            state.fanout.forget_port(port)

    # ---------------------------------------------------------------- signalling

    @rpc
    async def Notify(self, request: evtchn_pb2.NotifyRequest, context: grpc.aio.ServicerContext) -> evtchn_pb2.NotifyResponse:
        session = self._registry.session_for(context)
        operation = "evtchn notify"
        _owned_port(operation, session_state(session), request.port)
        session.evtchn.notify(request.port)
        # When the other end is a port of a session of this broker, its event
        # is read on this same event loop: give the fan-outs one turn to read
        # what fired, and if that handed events to subscribers, one more for
        # the subscribers to send them — before this reply, which gRPC would
        # otherwise send first.  The listener's wake-up is what a notifier
        # waits for, not its own reply (measured: the event arrives ~25%
        # sooner; the reply is later only by the sends it let go first).
        delivered = deliveries()
        await asyncio.sleep(0)
        if deliveries() != delivered:
            await asyncio.sleep(0)
        return evtchn_pb2.NotifyResponse()

    @rpc
    async def Unmask(self, request: evtchn_pb2.UnmaskRequest, context: grpc.aio.ServicerContext) -> evtchn_pb2.UnmaskResponse:
        # The driver ignores unknown ports in write(); the broker says so
        # instead, since a client unmasking a port it does not hold has a bug.
        session = self._registry.session_for(context)
        _owned_port("evtchn unmask", session_state(session), request.port)
        session.evtchn.unmask(request.port)
        return evtchn_pb2.UnmaskResponse()

    @rpc
    async def Reset(self, request: evtchn_pb2.ResetRequest, context: grpc.aio.ServicerContext) -> evtchn_pb2.ResetResponse:
        session = self._registry.session_for(context)
        session.evtchn.reset()
        state = session_state(session)
        if state.fanout is not None:
            state.fanout.forget_pending()
        return evtchn_pb2.ResetResponse()

    @rpc
    async def RestrictDomid(
        self, request: evtchn_pb2.RestrictDomidRequest, context: grpc.aio.ServicerContext
    ) -> evtchn_pb2.RestrictDomidResponse:
        session = self._registry.session_for(context)
        operation = "evtchn restrict domid"
        _check_domid(operation, request.domid)
        session.evtchn.restrict_domid(request.domid)
        return evtchn_pb2.RestrictDomidResponse()

    # ---------------------------------------------------------------- events

    @rpc_stream
    async def Subscribe(
        self, request: evtchn_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[evtchn_pb2.Event]:
        session = self._registry.session_for(context)
        operation = "evtchn subscribe"
        if self._ending:
            raise BrokerError(errno.EAGAIN, operation, "the broker is shutting down")
        if request.queue_size > MAX_QUEUE_SIZE:
            raise invalid(operation, f"queue size {request.queue_size} is above the broker's maximum of {MAX_QUEUE_SIZE}")
        if len(request.ports) > session.limits.max_ports_per_session:
            # More ports than the session may bind: some cannot be its own.
            raise BrokerError(
                errno.E2BIG,
                operation,
                f"{len(request.ports)} ports named; a session binds at most {session.limits.max_ports_per_session}",
            )
        state = session_state(session)
        for port in request.ports:
            _owned_port(operation, state, port)
        session.check_quota(
            operation, "subscriptions", session.usage.subscriptions, 1, session.limits.max_subscriptions_per_session
        )
        fanout = session_fanout(session)
        auto_unmask = request.auto_unmask if request.HasField("auto_unmask") else True
        # Registered before the marker is sent: whatever fires after the
        # client sees `subscribed` reaches this stream.
        subscription = fanout.subscribe(request.ports, auto_unmask=auto_unmask, queue_size=request.queue_size)
        session.usage.subscriptions += 1
        try:
            yield evtchn_pb2.Event(subscribed=True)
            while True:
                try:
                    event = await anext(subscription)
                except StopAsyncIteration:
                    return  # the session ended: the stream ends with OK
                except Exception as exc:  # noqa: BLE001 - the device failed under the fan-out
                    raise BrokerError(
                        errno.EIO, operation, f"reading the session's event channel device failed: {exc}"
                    ) from exc
                if isinstance(event, Fired):
                    yield evtchn_pb2.Event(port=event.port)
                else:
                    yield evtchn_pb2.Event(lost=event.count)
        finally:
            subscription.close()
            session.usage.subscriptions -= 1

