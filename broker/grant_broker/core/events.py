"""Fan-out of one event-channel handle to many subscribers, on the event loop.

An evtchn handle cannot be shared between readers (``xenevtchn.h``): a port
read by one is gone for the others.  So each handle gets exactly one reader,
an :class:`EventFanout`, registered with ``loop.add_reader`` on the handle's
non-blocking descriptor.  When it becomes readable the fan-out reads the
pending ports and hands each one to every :class:`Subscription` that asked
for it.

Delivery rules, in the order they matter:

* **Own bounded queue per subscriber.**  A full queue never blocks the
  reader or the other subscribers: the event is dropped *for that
  subscriber*, counted, and the subscriber sees :class:`Lost` (the count)
  right before its next delivered event.
* **A queued port is not queued again.**  A port that fires while its
  previous event still waits in a subscriber's queue is coalesced into that
  event, as Xen coalesces a port that fires while it is pending: the
  subscriber hears it once, and nothing is lost.  So a queue holds each port
  at most once, and for an auto-unmask subscriber that has not taken it yet
  the port stays masked (below), so the device coalesces further
  notifications without the broker reading them.
* **Paced per fan-out.**  The subscribers of one fan-out — one session —
  take at most :data:`EVENTS_PER_TURN` events per turn of the event loop
  between them; beyond that they wait for the next turn.  Whatever a
  session's subscribers do with their events (send them to clients that do
  not read), the work is bounded per session and turn, and other sessions'
  calls get their turns in between.  Events wait in the queues meanwhile,
  where the rule above coalesces them: a session notifying its own ports in
  a loop makes its ports stay masked, not the broker busy.
* **Nothing fired is forgotten for want of a listener.**  A port that fires
  while nobody is subscribed to it is remembered (once, however often it
  fires) and handed to the next subscription that covers it.  This is what
  makes the pending event of a fresh ``BIND_INTERDOMAIN`` arrive exactly once.
* **Auto-unmask.**  A fired port stays masked in the device until it is
  unmasked, so notifications coalesce.  Once a port's event sits in the queue
  of at least one auto-unmask subscriber, the fan-out unmasks it so the next
  notification fires.  When every auto-unmask subscriber that wanted it was
  full, the port is *held* masked — the source coalesces while the reader is
  behind — and unmasked as soon as an auto-unmask subscriber takes an event
  off its queue.
  Subscribers without auto-unmask unmask themselves.
* **An unbound port is forgotten at once** (:meth:`EventFanout.forget_port`,
  called right after the device's unbind).  The device keeps an unbound
  port's already fired event in its queue (Linux ``evtchn_unbind_from_user``
  leaves the ring alone), and a new channel may get the same number at the
  next bind; so the fan-out first reads what the handle has queued right now
  (the other ports in it are delivered as usual), then drops every event of
  the port it holds: the pending one nobody took, and those still queued for
  subscribers (events a subscriber already took are its own).  Nothing of
  the old channel is handed out afterwards, least of all as an event of the
  new one.  A subscription that names the port **ends**: it first yields what
  it had queued of its other ports, then raises :class:`PortUnbound`.  A
  subscription to all ports goes on (it never hears the old port again; a
  new channel on that number is a port like any other).

The readers of one broker share an :class:`EventHub`: it refuses a second
reader for a descriptor and counts what they all delivered.  The module holds
no state of its own.

Example, with a handle of the emulated backend::

    fanout = EventFanout(handle, EventHub())
    try:
        with fanout.subscribe(ports={port}) as subscription:
            async for event in subscription:
                if isinstance(event, Fired):
                    print("port", event.port, "fired")
                else:
                    print(event.count, "events lost")
    except PortUnbound:
        print("port", port, "was unbound")
    finally:
        fanout.close()

The fan-out never closes the handle: whoever opened it (the session) does,
after closing the fan-out.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import errno
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NoReturn, Self

from grant_broker.backend.contract import EvtchnHandle
from grant_broker_protocol.errors import BrokerError

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE: Final = 1024
"""Queue size of a subscription that does not choose one."""

MAX_QUEUE_SIZE: Final = 65536
"""A subscriber may not make the broker buffer more than this many events."""

READ_BATCH: Final = 256
"""Ports read per readable callback: bounded so one busy handle cannot starve the loop."""

EVENTS_PER_TURN: Final = 1
"""Events the subscribers of one fan-out (one session) take per turn of the event
loop, between them (a turn may see twice as many: those granted at its start,
and as many again after the count is reset within it).  A session's events
then cost at most a couple of sends per turn (a gRPC stream message is ~0.1 ms
of the loop), so other sessions' calls, which need a few turns each, keep
their latency; and events that wait their turn coalesce per port, so a
session notifying its own ports in a loop costs less the more it floods.  An
idle loop turns in microseconds: a fan-out to 1000 subscribers takes ~4 ms
longer than all at once (measured), and a lone busy session is not slowed.
See bench/run.py, ``bystander_under_flood``."""


@dataclass(frozen=True, slots=True)
class Fired:
    """*port* fired."""

    port: int


@dataclass(frozen=True, slots=True)
class Lost:
    """*count* events were dropped for this subscriber (its queue was full)
    between the previous event and the next one."""

    count: int


FanoutEvent = Fired | Lost


class FanoutClosed(Exception):
    """Raised by :meth:`EventFanout.subscribe` when the fan-out is already closed."""


class PortUnbound(Exception):
    """How a subscription that names *port* ends once the port is unbound.

    Raised by the subscription's iterator (and :meth:`Subscription.get_nowait`)
    after it has yielded what it had queued of its other ports, and on every
    call after that, until the subscription is closed.
    """

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.port = port

    def __str__(self) -> str:
        return f"port {self.port} was unbound"


class EventHub:
    """What the event fan-outs of one broker share: one per broker, passed to
    each :class:`EventFanout`.

    It keeps the live readers by (event loop, descriptor) — a second
    ``add_reader`` on a descriptor would silently replace the first reader
    and events would go missing, so a second fan-out is refused instead —
    and counts the events all of them handed to subscribers, those the
    subscribers took, and those subscribers lost (the metrics show them).
    """

    def __init__(self) -> None:
        self._deliveries = 0
        self._taken = 0
        self._lost = 0
        self._readers: dict[tuple[int, int], EventFanout] = {}

    @property
    def deliveries(self) -> int:
        """How many fired ports the hub's fan-outs have handed to subscribers
        so far: a caller can tell whether a turn of the event loop delivered
        anything."""
        return self._deliveries

    @property
    def lost(self) -> int:
        """How many events subscribers have lost so far (their queue was full:
        each loss counted once per subscriber that lost it)."""
        return self._lost

    @property
    def taken(self) -> int:
        """How many events (fired ports and loss reports) subscribers have
        taken off their queues so far: the work the fan-outs' consumers do,
        which each fan-out paces (:data:`EVENTS_PER_TURN`)."""
        return self._taken


class _Pacer:
    """At most *per_turn* events taken per turn of *loop*; the others wait
    their turn, first come first served.

    A turn ends when the loop has run what was ready when it began: the count
    is reset by a callback scheduled with ``call_soon``, which runs in the
    loop's next turn and grants the next *per_turn* waiters there.  Only
    granted waiters wake (not every waiter at every turn), so a paced fan-out
    with many subscribers costs the loop its grants, not its subscribers.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, per_turn: int) -> None:
        self._loop = loop
        self._per_turn = per_turn
        self._taken = 0
        self._scheduled = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def admit(self) -> None:
        """Count one event taken; first wait for a turn with room for it."""
        if self._taken < self._per_turn and not self._waiters:
            self._taken += 1
            self._schedule()
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        self._schedule()
        await waiter  # granted, and counted, by _next_turn

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._taken = 0
        while self._waiters and self._taken < self._per_turn:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled reader
                waiter.set_result(None)
                self._taken += 1
        if self._taken:
            self._schedule()


# A queue entry: (events lost just before this one, the port).  Carrying the
# lost count inside the entry keeps "Lost before the next event" in one queue
# slot, so a queue with room for one event always has room for its report.
_Entry = tuple[int, int]
_WAKE: Final = (-1, -1)  # wakes a reader blocked on the empty queue of an ended subscription (counts are >= 0)


class EventFanout:
    """The one reader of *handle*, fanning its events out to subscriptions.

    Created live: the reader is registered with the running loop at once and
    stays registered until :meth:`close`.  Ports read while nobody listens are
    kept as pending (see the module docstring).

    Args:
        handle: the evtchn handle to read; borrowed, never closed here.
        hub: the broker's :class:`EventHub`.
        name: how log lines name this fan-out (e.g. ``"session 3"``).
        bound_ports: the ports bound through *handle* right now.  With it, a
            ring overflow (``EFBIG`` from the read) is recovered from: the
            handle is reset and every bound port is reported as fired, since
            any of them may have fired into the lost part of the ring
            (spurious events are harmless; event-channel users re-check
            their state on every event).  Without it, an overflow ends the
            fan-out like any other read failure.
        events_per_turn: events its subscribers take per turn of the loop,
            between them (:data:`EVENTS_PER_TURN`).

    Raises:
        RuntimeError: *handle* already has a live fan-out in *hub*, or no loop is running.
    """

    def __init__(
        self,
        handle: EvtchnHandle,
        hub: EventHub,
        *,
        name: str = "evtchn",
        bound_ports: Callable[[], Iterable[int]] | None = None,
        events_per_turn: int = EVENTS_PER_TURN,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._pacer = _Pacer(self._loop, events_per_turn)
        self._hub = hub
        self._fd = handle.fileno()
        self._key = (id(self._loop), self._fd)
        if self._key in self._hub._readers:
            raise RuntimeError(f"{name}: the evtchn handle already has a reader (one reader per handle)")
        self._handle = handle
        self._name = name
        self._bound_ports = bound_ports
        self._closed = False
        self._error: BaseException | None = None
        self._all: set[Subscription] = set()  # subscriptions without a port filter
        self._by_port: dict[int, set[Subscription]] = {}
        self._pending: dict[int, None] = {}  # fired, nobody listening: an ordered set
        self._held: set[int] = set()  # masked because every auto-unmask taker was full
        self.events_read = 0
        self.overflows = 0
        self._loop.add_reader(self._fd, self._on_readable)
        self._hub._readers[self._key] = self

    # ---------------------------------------------------------------- public

    @property
    def hub(self) -> EventHub:
        return self._hub

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def error(self) -> BaseException | None:
        """Why the fan-out closed itself (a failed read of the device), else ``None``."""
        return self._error

    @property
    def subscriber_count(self) -> int:
        return len(self._all) + len({s for subs in self._by_port.values() for s in subs})

    @property
    def pending_ports(self) -> tuple[int, ...]:
        """Ports that fired while nobody was subscribed to them, oldest first."""
        return tuple(self._pending)

    def subscribe(self, ports: Iterable[int] = (), *, auto_unmask: bool = True, queue_size: int = 0) -> "Subscription":
        """Start receiving events, from now on, of *ports* (all ports when empty).

        The subscription is registered before this returns, so no event read
        after this call is missed.  Pending ports it covers are queued to it
        right away.  Use it as a (sync or async) context manager or close it:
        an unclosed subscription keeps a slot in the fan-out.

        Args:
            ports: the ports of interest; empty means every port.
            auto_unmask: unmask a port once its event is queued here.
            queue_size: events buffered for a slow reader; 0 means
                :data:`DEFAULT_QUEUE_SIZE`.

        Raises:
            ValueError: *queue_size* negative or above :data:`MAX_QUEUE_SIZE`.
            FanoutClosed: the fan-out is closed.
        """
        if self._closed:
            raise FanoutClosed(f"{self._name}: the event fan-out is closed")
        if not 0 <= queue_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {queue_size} not in 0..{MAX_QUEUE_SIZE}")
        subscription = Subscription(self, frozenset(ports), auto_unmask, queue_size or DEFAULT_QUEUE_SIZE)
        if subscription.ports:
            for port in subscription.ports:
                self._by_port.setdefault(port, set()).add(subscription)
        else:
            self._all.add(subscription)
        # Hand over what fired before anyone listened.
        for port in [p for p in self._pending if subscription.wants(p)]:
            del self._pending[port]
            self._dispatch(port)
        return subscription

    def forget_port(self, port: int) -> None:
        """*port* was just unbound from the handle: hand out nothing of it any more.

        Call it right after the device's unbind returned (from then on the
        device queues nothing more of the port, but keeps what it had
        queued).  Reads what the handle has queued now, delivering the other
        ports in it as usual; drops the port's pending event and its events
        still queued for subscribers; ends every subscription that names the
        port (:class:`PortUnbound`, after what it queued of its other ports).
        Subscriptions to all ports go on.  See the module docstring.
        """
        if self._closed:
            return
        self._drain(skip=port)
        self._pending.pop(port, None)
        self._held.discard(port)
        ending = self._by_port.pop(port, set())
        for subscription in self._all:
            subscription._drop(port)
        for subscription in ending:
            subscription._drop(port)
            self._unregister(subscription)
            subscription._end(unbound=port)

    def forget_pending(self) -> None:
        """The handle was reset (``IOCTL_EVTCHN_RESET``): what it fired and
        nobody took is dropped with its ring.  Ports held masked for a full
        subscriber are still unmasked once it makes room: that is a promise
        to the subscriber, not a pending event."""
        self._pending.clear()

    def close(self) -> None:
        """Stop reading and end every subscription (they finish cleanly).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._fd)
        finally:
            if self._hub._readers.get(self._key) is self:
                del self._hub._readers[self._key]
            subscriptions = self._all | {s for subs in self._by_port.values() for s in subs}
            self._all.clear()
            self._by_port.clear()
            self._pending.clear()
            self._held.clear()
            for subscription in subscriptions:
                subscription._end()

    # ---------------------------------------------------------------- reading

    def _on_readable(self) -> None:
        if self._closed:  # a callback already scheduled when close() ran
            return
        for port in self._read() or ():
            self._dispatch(port)

    def _drain(self, skip: int) -> None:
        """Read until the handle's queue is empty (a short read), now; deliver
        what was read except *skip*."""
        while not self._closed:
            ports = self._read()
            if ports is None:
                return
            for port in ports:
                if port != skip:
                    self._dispatch(port)
            if len(ports) < READ_BATCH:
                return

    def _read(self) -> list[int] | None:
        """One read of the handle; None when it failed (the fan-out is closed then)."""
        try:
            ports = self._handle.read_pending(READ_BATCH)
        except BrokerError as exc:
            if exc.errno == errno.EFBIG and self._bound_ports is not None:
                ports = self._recover_overflow()
            else:
                self._fail(exc)
                return None
        except Exception as exc:  # noqa: BLE001 - a dead device ends the fan-out, it must not spin
            self._fail(exc)
            return None
        self.events_read += len(ports)
        return ports

    def _fail(self, exc: BaseException) -> None:
        log.error("%s: reading the evtchn device failed, ending its subscriptions: %s", self._name, exc)
        self._error = exc
        self.close()

    def _recover_overflow(self) -> list[int]:
        # Linux evtchn_read fails with EFBIG once its ring overflowed, until
        # RESET.  Whatever was in the ring is gone, and the ports in it stay
        # masked; so report every bound port as fired (delivery then unmasks
        # it, or its subscriber does).
        assert self._bound_ports is not None
        log.warning("%s: the evtchn ring overflowed; resetting it and reporting every bound port", self._name)
        self.overflows += 1
        try:
            self._handle.reset()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return []
        self._pending.clear()
        self._held.clear()
        return sorted(self._bound_ports())

    def _dispatch(self, port: int) -> None:
        takers = self._all.union(self._by_port.get(port, ()))
        if not takers:
            # Left masked in the device, so further notifications coalesce
            # until someone subscribes; remembered once.
            self._pending[port] = None
            return
        self._hub._deliveries += 1
        queued_for_unmasker = False
        wanted_by_unmasker = False
        for subscription in takers:
            queued = subscription._offer(port)
            if subscription.auto_unmask:
                wanted_by_unmasker = True
                queued_for_unmasker = queued_for_unmasker or queued
        if queued_for_unmasker:
            self._unmask(port)
        elif wanted_by_unmasker:
            self._held.add(port)

    def _unmask(self, port: int) -> None:
        try:
            self._handle.unmask(port)
        except Exception as exc:  # noqa: BLE001 - the port may just have been unbound
            log.warning("%s: unmask of port %d failed: %s", self._name, port, exc)

    def _room_made(self) -> None:
        """An auto-unmask subscriber took an event: let held ports fire again."""
        if self._held:
            held, self._held = self._held, set()
            for port in held:
                self._unmask(port)

    def _unregister(self, subscription: "Subscription") -> None:
        if subscription.ports:
            for port in subscription.ports:
                subs = self._by_port.get(port)
                if subs is not None:
                    subs.discard(subscription)
                    if not subs:
                        del self._by_port[port]
        else:
            self._all.discard(subscription)
        if subscription.auto_unmask:
            # It may be the full subscriber a port is held masked for.
            self._room_made()


class Subscription:
    """Events of an :class:`EventFanout` for one subscriber, in order.

    An async iterator of :class:`Fired` / :class:`Lost`.  It ends cleanly
    when the subscription or the fan-out is closed (what is still queued is
    discarded: closed means closed), raises the device error that closed the
    fan-out, or — once a port it names is unbound — yields what it had
    queued of its other ports and then raises :class:`PortUnbound`.  Also a
    sync and async context manager that closes it.  Create with
    :meth:`EventFanout.subscribe`.
    """

    def __init__(self, fanout: EventFanout, ports: frozenset[int], auto_unmask: bool, queue_size: int) -> None:
        self._fanout = fanout
        self.ports = ports
        self.auto_unmask = auto_unmask
        self.queue_size = queue_size
        # A deque and waiters rather than an asyncio.Queue, whose own work per
        # event was a good part of a fan-out to many subscriptions.
        self._queue: collections.deque[_Entry] = collections.deque()
        self._getters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._queued: set[int] = set()  # ports with an entry not yet taken: coalesced, not queued again
        self._waited: _Entry | None = None  # taken off the queue by a reader that then waited for its turn
        self._lost = 0  # dropped since the last queued event
        self.lost_total = 0
        self.delivered_total = 0
        self._ended = False  # nothing more will be queued
        self._unbound: int | None = None  # ended by the unbind of this port: the queue is yielded first
        self._carry: int | None = None  # port to yield after its Lost report
        self._on_ready: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        """Nothing more will be queued (closed, or ended by an unbind)."""
        return self._ended

    def wants(self, port: int) -> bool:
        return not self.ports or port in self.ports

    def on_ready(self, callback: Callable[[], None] | None) -> None:
        """Call *callback* whenever an event is queued here or the
        subscription ends — synchronously, from the fan-out, so it must only
        take note — for a consumer that takes events with :meth:`get_nowait`
        instead of iterating (the fast path's per-session event frames).
        ``None`` stops it."""
        self._on_ready = callback

    @property
    def takeable(self) -> bool:
        """:meth:`get_nowait` has something for the consumer now: an event, or
        the subscription's end to raise."""
        return self._ended or self._carry is not None or self._waited is not None or bool(self._queue)

    def close(self) -> None:
        """Stop receiving; the iterator ends (StopAsyncIteration), and what is
        still queued is discarded.  Idempotent."""
        if not self._ended:
            self._fanout._unregister(self)
        self._end()

    # ------------------------------------------------------------ fan-out side

    def _offer(self, port: int) -> bool:
        """Queue *port* if there is room; otherwise count it as lost.  Never
        blocks.  True when it was queued now; False when it was lost, or
        coalesced into its event already queued here."""
        if port in self._queued:
            return False
        if len(self._queue) >= self.queue_size:
            self._lost += 1
            self.lost_total += 1
            self._fanout._hub._lost += 1
            return False
        self._put((self._lost, port))
        self._queued.add(port)
        self._lost = 0
        if self._on_ready is not None:
            self._on_ready()
        return True

    def _drop(self, port: int) -> None:
        """Forget the queued events of *port* (it was unbound).  A loss
        reported with a dropped event moves to the next event kept."""
        if self._carry == port:
            self._carry = None  # its Lost report was already taken
        self._queued.discard(port)
        kept: list[_Entry] = []
        carried = 0
        if self._waited is not None and self._waited != _WAKE and self._waited[1] == port:
            # The head of the queue, taken off it: its loss moves to the next event kept.
            carried, self._waited = self._waited[0], None
        while self._queue:
            entry = self._queue.popleft()
            lost, queued = entry
            if entry != _WAKE and queued == port:
                carried += lost
                continue
            if carried and entry != _WAKE:
                entry, carried = (lost + carried, queued), 0
            kept.append(entry)
        self._lost += carried
        self._queue.extend(kept)

    def _end(self, *, unbound: int | None = None) -> None:
        """Nothing more will be queued.  Closed (*unbound* None): what is
        queued is discarded.  Ended by the unbind of *unbound*: the queue is
        yielded first, then :class:`PortUnbound`."""
        if unbound is not None:
            if self._ended:
                return
            self._unbound = unbound
        else:
            self._unbound = None
            self._queue.clear()
            self._queued.clear()
            self._waited = None
        self._ended = True
        if not self._queue:
            # A reader can only be blocked on an empty queue: wake it to see the end.
            self._put(_WAKE)
        if self._on_ready is not None:
            self._on_ready()

    def _put(self, entry: _Entry) -> None:
        self._queue.append(entry)
        self._wake_next_getter()

    async def _get(self) -> _Entry:
        """The next entry, waiting for one (as ``asyncio.Queue.get``)."""
        while not self._queue:
            getter = self._fanout._loop.create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                if getter.done() and not getter.cancelled() and self._queue:
                    self._wake_next_getter()  # woken, then cancelled: the entry is another reader's
                raise
        return self._queue.popleft()

    def _wake_next_getter(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    # ------------------------------------------------------------ consumer side

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FanoutEvent:
        while True:
            if self._carry is None and self._waited is None and not self._queue and not self._ended:
                # Held here, not consumed, until this reader's turn comes: its
                # port stays coalescing (_queued) and, if held, masked.
                self._waited = await self._get()
            # Something to take (or the end to raise): wait for the fan-out's
            # turn first, then take it.
            await self._fanout._pacer.admit()
            event = self._take()
            if event is not None:
                return event

    def get_nowait(self) -> FanoutEvent | None:
        """The next event if one is queued, else ``None``.

        Raises:
            StopAsyncIteration, PortUnbound, or the device error: the
                subscription has ended (as the iterator would).
        """
        return self._take()

    def _take(self) -> FanoutEvent | None:
        if self._carry is not None:
            port, self._carry = self._carry, None
            return Fired(port)
        if self._ended and self._unbound is None:
            self._raise_end()
        if self._waited is not None:
            entry, self._waited = self._waited, None
            event = self._consume(entry)
            if event is not None:
                return event
        while True:
            if not self._queue:
                if self._ended:
                    self._raise_end()
                return None
            event = self._consume(self._queue.popleft())
            if event is not None:
                return event

    def _consume(self, entry: _Entry) -> FanoutEvent | None:
        if entry == _WAKE:
            return None
        if self._ended and self._unbound is None:
            self._raise_end()
        lost, port = entry
        self._queued.discard(port)
        self.delivered_total += 1
        self._fanout._hub._taken += 1
        if self.auto_unmask:
            self._fanout._room_made()
        if lost:
            self._carry = port
            return Lost(lost)
        return Fired(port)

    def _raise_end(self) -> NoReturn:
        if self._unbound is not None:
            raise PortUnbound(self._unbound) from None
        error = self._fanout.error
        if error is not None:
            # A copy per subscriber: raising one object from many tasks would
            # chain their tracebacks together.
            raise copy.copy(error) from None
        raise StopAsyncIteration

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        which = sorted(self.ports) if self.ports else "all"
        queued = len(self._queue) + (self._waited is not None)
        return f"<Subscription ports={which} queued={queued}/{self.queue_size} lost={self.lost_total}>"

