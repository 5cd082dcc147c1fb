"""Event-channel operations: a session's ports, and their events as streams.

Each session binds ports through its own evtchn handle (``Session.evtchn``),
so a port is owned by exactly one session; the session's state also keeps the
set of ports it bound, so that a request naming someone else's port is
refused with ``ENOTCONN`` — what the Linux driver answers for a port not
bound through the file — before any device is touched.

Events are read by one :class:`~grant_broker.core.events.EventFanout` per
session (the only reader of the session's handle), started with the
session's first bind so that the broker sees every event, and delivered to
each subscription from its own bounded queue.  A subscription yields
``Event(subscribed=True)`` first: once the client has it, the subscription is
registered and nothing that fires later is missed.  Subscriptions end when
the client cancels them or the session ends (normally), and with
``ENOTCONN`` ("port N was unbound") when a port they name is unbound — after
the events they had queued of their other ports.  ``Unbind`` tells the
fan-out after the device: the port's events not yet delivered (pending for a
first subscriber, or queued for a subscription) are dropped, so a new channel
that reuses the number starts clean.  The fan-outs of a broker share its
:class:`~grant_broker.core.events.EventHub` (``session.event_hub``).

The gntdev / gntalloc unmap notifications find the session's ports with
:func:`check_port_of_session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from grant_broker.core import audit
from grant_broker.core.budgets import PORTS, SUBSCRIPTIONS
from grant_broker.core.checks import check_domid, check_peers, invalid
from grant_broker.core.events import MAX_QUEUE_SIZE, EventFanout, Fired, PortUnbound, Subscription
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
from grant_broker_protocol.abi import UNMAP_NOTIFY_SEND_EVENT
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.v1 import evtchn_pb2

log = logging.getLogger(__name__)

STATE_KEY: Final = "evtchn"
"""``session.resources`` key of the session's :class:`SessionEvtchn`."""

FANOUT_KEY: Final = "evtchn.fanout"
"""``session.resources`` key of the session's :class:`EventFanout`, once one was needed."""


@dataclass
class SessionEvtchn:
    """What a session holds through evtchn."""

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


def check_port_of_session(operation: str, session: Session, action: int, port: int) -> None:
    """With UNMAP_NOTIFY_SEND_EVENT the port must be one this session bound
    (EINVAL, as the kernel answers for a port it cannot use).

    The kernel only asks that the port be bound in the domain, but every
    session of a domain shares the domain's ports: without this check a client
    could have the broker signal another client's port.
    """
    if not action & UNMAP_NOTIFY_SEND_EVENT:
        return
    if port not in session_ports(session):
        raise invalid(operation, f"event channel port {port} is not bound by this session")


def session_fanout(session: Session, operation: str = "evtchn subscribe") -> EventFanout:
    """The one reader of the session's evtchn handle, started on first use — the
    session's first bind or subscription — and closed when the session is
    released (before its handle is closed)."""
    state = session_state(session)
    if state.fanout is None or state.fanout.closed:
        # Opening the handle now would leak it if release already ran.
        session.check_live(operation)
        fanout = EventFanout(
            session.evtchn, session.event_hub, name=f"session {session.id}", bound_ports=lambda: tuple(state.ports)
        )
        state.fanout = fanout
        session.resources[FANOUT_KEY] = fanout
        session.on_release(fanout.close)
    return state.fanout


def end_subscriptions(registry: SessionRegistry) -> None:
    """End every subscription of every session (they end as if the session
    ended): for a graceful shutdown, so that open streams do not hold the
    grace period up to its end."""
    for session in registry.sessions:
        state = session.resources.get(STATE_KEY)
        if state is not None and state.fanout is not None:
            state.fanout.close()


def _owned_port(operation: str, state: SessionEvtchn, port: int) -> None:
    if port not in state.ports:
        raise BrokerError(errno.ENOTCONN, operation, f"port {port} is not bound by this session")


# ---------------------------------------------------------------- binding


def _bind(
    session: Session,
    operation: str,
    bind: Callable[[], int],
    *,
    remote_domain: int | None = None,
    remote_port: int | None = None,
    virq: int | None = None,
) -> Reply[evtchn_pb2.BindResponse]:
    state = session_state(session)
    session.charge(operation, PORTS)
    try:
        # The reader exists before the first port does: every event is read by
        # the broker, so an unbind can forget what its port fired.
        session_fanout(session, operation)
        port = bind()
    except BaseException:
        session.credit(PORTS)
        raise
    state.ports.add(port)
    session.usage.event_channels += 1
    audit.port_bound(session, operation, port, remote_domain=remote_domain, remote_port=remote_port, virq=virq)
    return Reply(evtchn_pb2.BindResponse(port=port))


async def bind_virq(session: Session, request: evtchn_pb2.BindVirqRequest) -> Reply[evtchn_pb2.BindResponse]:
    return _bind(session, "evtchn bind virq", lambda: session.evtchn.bind_virq(request.virq), virq=request.virq)


async def bind_interdomain(session: Session, request: evtchn_pb2.BindInterdomainRequest) -> Reply[evtchn_pb2.BindResponse]:
    operation = "evtchn bind interdomain"
    check_domid(operation, request.remote_domain, "remote domain")
    check_peers(session, operation, "bind to", domains=(request.remote_domain,))
    return _bind(
        session,
        operation,
        lambda: session.evtchn.bind_interdomain(request.remote_domain, request.remote_port),
        remote_domain=request.remote_domain,
        remote_port=request.remote_port,
    )


async def bind_unbound_port(session: Session, request: evtchn_pb2.BindUnboundPortRequest) -> Reply[evtchn_pb2.BindResponse]:
    operation = "evtchn bind unbound port"
    check_domid(operation, request.remote_domain, "remote domain")
    check_peers(session, operation, "bind to", domains=(request.remote_domain,))
    return _bind(
        session, operation, lambda: session.evtchn.bind_unbound_port(request.remote_domain), remote_domain=request.remote_domain
    )


async def unbind(session: Session, request: evtchn_pb2.UnbindRequest) -> Reply[evtchn_pb2.UnbindResponse]:
    operation = "evtchn unbind"
    state = session_state(session)
    _owned_port(operation, state, request.port)
    try:
        session.evtchn.unbind(request.port)
    except BrokerError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        # The handle no longer has it (its domain went away): stop tracking it too.
        _forget(session, state, request.port)
        raise
    _forget(session, state, request.port)
    return Reply(evtchn_pb2.UnbindResponse())


def _forget(session: Session, state: SessionEvtchn, port: int) -> None:
    # After the device's unbind (it queues nothing more of the port) and
    # after the port left state.ports (an overflow recovery during the
    # fan-out's drain must not report it): the fan-out drains the device,
    # drops the port's events and ends the subscriptions that name it.
    state.ports.discard(port)
    session.usage.event_channels -= 1
    session.credit(PORTS)
    audit.port_unbound(session, "evtchn unbind", port)
    if state.fanout is not None:
        state.fanout.forget_port(port)


# ---------------------------------------------------------------- signalling


async def notify(session: Session, request: evtchn_pb2.NotifyRequest) -> Reply[evtchn_pb2.NotifyResponse]:
    operation = "evtchn notify"
    _owned_port(operation, session_state(session), request.port)
    session.evtchn.notify(request.port)
    # When the other end is a port of a session of this broker, its event
    # is read on this same event loop: give the fan-outs one turn to read
    # what fired, and if that handed events to subscribers, one more for
    # the subscribers to send them — before this reply, which the transport
    # would otherwise send first.  The listener's wake-up is what a notifier
    # waits for, not its own reply (measured: the event arrives ~25%
    # sooner; the reply is later only by the sends it let go first).
    hub = session.event_hub
    delivered = hub.deliveries
    await asyncio.sleep(0)
    if hub.deliveries != delivered:
        await asyncio.sleep(0)
    return Reply(evtchn_pb2.NotifyResponse())


async def unmask(session: Session, request: evtchn_pb2.UnmaskRequest) -> Reply[evtchn_pb2.UnmaskResponse]:
    # The driver ignores unknown ports in write(); the broker says so
    # instead, since a client unmasking a port it does not hold has a bug.
    _owned_port("evtchn unmask", session_state(session), request.port)
    session.evtchn.unmask(request.port)
    return Reply(evtchn_pb2.UnmaskResponse())


async def reset(session: Session, request: evtchn_pb2.ResetRequest) -> Reply[evtchn_pb2.ResetResponse]:
    session.evtchn.reset()
    state = session_state(session)
    if state.fanout is not None:
        state.fanout.forget_pending()
    return Reply(evtchn_pb2.ResetResponse())


async def restrict_domid(session: Session, request: evtchn_pb2.RestrictDomidRequest) -> Reply[evtchn_pb2.RestrictDomidResponse]:
    operation = "evtchn restrict domid"
    check_domid(operation, request.domid)
    session.evtchn.restrict_domid(request.domid)
    return Reply(evtchn_pb2.RestrictDomidResponse())


# ---------------------------------------------------------------- events


SUBSCRIBE_OPERATION: Final = "evtchn subscribe"


@contextlib.contextmanager
def opened_subscription(
    session: Session, request: evtchn_pb2.SubscribeRequest, *, refuse_new: Callable[[], bool] = lambda: False
) -> Iterator[Subscription]:
    """A subscription to the ports *request* names (every port of the session
    if none), checked and counted against the session's budget while it is
    open; registered before this yields, so nothing that fires from then on
    is missed.  *refuse_new* says the broker is shutting down (EAGAIN).

    Both deliveries open it here: :func:`subscribe` (a stream of ``Event``
    messages, what gRPC serves) and the fast path's per-session event frames,
    which take events with ``Subscription.get_nowait`` and tell a
    subscription's end by :func:`subscription_end`.
    """
    operation = SUBSCRIBE_OPERATION
    if refuse_new():
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
    session.charge(operation, SUBSCRIPTIONS)
    try:
        fanout = session_fanout(session)
        auto_unmask = request.auto_unmask if request.HasField("auto_unmask") else True
        subscription = fanout.subscribe(request.ports, auto_unmask=auto_unmask, queue_size=request.queue_size)
    except BaseException:
        session.credit(SUBSCRIPTIONS)
        raise
    session.usage.subscriptions += 1
    try:
        yield subscription
    finally:
        subscription.close()
        session.usage.subscriptions -= 1
        session.credit(SUBSCRIPTIONS)


def subscription_end(exc: Exception) -> BrokerError | None:
    """How a subscription ended, from what taking its next event raised:
    ``None`` when it ended normally (closed, or its session ended), else the
    error its stream ends with (ENOTCONN: a port it names was unbound; EIO: the
    device failed under the fan-out)."""
    if isinstance(exc, StopAsyncIteration):
        return None
    if isinstance(exc, PortUnbound):
        return BrokerError(errno.ENOTCONN, SUBSCRIBE_OPERATION, f"{exc}: the subscription has ended")
    error = BrokerError(errno.EIO, SUBSCRIBE_OPERATION, f"reading the session's event channel device failed: {exc}")
    error.__cause__ = exc
    return error


async def subscribe(
    session: Session, request: evtchn_pb2.SubscribeRequest, *, refuse_new: Callable[[], bool] = lambda: False
) -> AsyncIterator[evtchn_pb2.Event]:
    """The events of the ports *request* names (every port of the session if
    none), first ``Event(subscribed=True)``; ends when the session does.
    *refuse_new* says the broker is shutting down (EAGAIN)."""
    with opened_subscription(session, request, refuse_new=refuse_new) as subscription:
        # Registered before the marker is yielded: whatever fires after the
        # client sees `subscribed` reaches this stream.
        yield evtchn_pb2.Event(subscribed=True)
        while True:
            try:
                event = await anext(subscription)
            except Exception as exc:  # noqa: BLE001 - the end of the subscription, told as such
                error = subscription_end(exc)
                if error is None:
                    return  # the session ended: the stream ends with OK
                raise error from error.__cause__
            if isinstance(event, Fired):
                yield evtchn_pb2.Event(port=event.port)
            else:
                yield evtchn_pb2.Event(lost=event.count)

