"""A fast-path session's event subscriptions, sent as one frame per turn.

From fast-path version 2 on, a session's ``Subscribe`` calls are not each a
stream with a task of its own sending a frame per event.  They are all
served here: every subscription tells this session's :class:`FastEvents`
when it has something queued (``Subscription.on_ready``), and once per turn
of the loop the events its subscriptions took go out as one ``Events``
frame, a port that fired for many subscriptions named once.  A fan-out of one
notification to a thousand subscriptions of a session is then a handful of
``sendmsg`` calls, not a thousand (and no task wakes per subscription).

The delivery rules are the fan-out's, unchanged (:mod:`grant_broker.core.events`):
each subscription keeps its own bounded queue, where a port that fires again
coalesces and an event that finds no room is counted and reported as lost
before the next one.  The pacing is per session and turn, as there: at most
:data:`SUBSCRIPTIONS_PER_FRAME` subscriptions take an event (and the loss
report before it) a turn, round robin.  Back-pressure comes from the socket: while
a frame waits for the client to read, nothing more is taken, so the
subscriptions' queues fill and their losses are counted — the broker never
blocks on a client and never buffers more than one frame for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
from time import perf_counter
from typing import Any, Final

from google.protobuf.message import Message

from grant_broker.core.events import Lost, Subscription
from grant_broker.core.observe import CallRecorder
from grant_broker.core.routes import SubscriptionOpener
from grant_broker.core.operations.evtchn import subscription_end
from grant_broker.core.session import Session
from grant_broker.transport.eager import start_eagerly
from grant_broker_protocol.errors import BrokerError, error_detail
from grant_broker_protocol.v1 import evtchn_pb2
from grant_broker_protocol.v1.fdchannel_pb2 import CallReply, Events, EventsLost, FdFrame, PortFired, StreamEnd

log = logging.getLogger(__name__)

SUBSCRIPTIONS_PER_FRAME: Final = 256
"""Subscriptions of a session that take an event (and the loss report before
it) per turn of the loop, all in one frame.  Taking one costs a few
microseconds, so a turn of one session stays well under a millisecond (a gRPC
stream message costs ~0.1 ms, hence its pacer's one event a turn); a fan-out
to 1000 subscriptions of a session takes four turns."""

MAX_UNSENT_FRAMES: Final = 1024
"""Answers and stream ends a session may leave unread (its socket full)
before it may open or be refused another subscription: a client that keeps
subscribing and never reads would otherwise grow them without bound.  One
that reads never comes near it (each of its subscriptions leaves two at most)."""

_SUBSCRIBED: Final = evtchn_pb2.Event(subscribed=True).SerializeToString()


class _Live:
    """One subscription being served: what closes it, and how its call is reported."""

    __slots__ = ("subscription", "closer", "recorder", "started")

    def __init__(self, subscription: Subscription, closer: contextlib.ExitStack, recorder: CallRecorder) -> None:
        self.subscription = subscription
        self.closer = closer
        self.recorder = recorder
        self.started = perf_counter()


class FastEvents:
    """The event subscriptions of one fast-path session."""

    def __init__(self, session: Session) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = session
        self._live: dict[int, _Live] = {}
        self._ready: dict[int, None] = {}  # call ids with something to take, oldest first (an ordered set)
        self._outbox: collections.deque[FdFrame] = collections.deque()  # replies and ends, sent before more events
        self._scheduled = False
        self._sending: asyncio.Task[None] | None = None
        self._closed = False

    def __contains__(self, call_id: int) -> bool:
        return call_id in self._live

    @property
    def unsent(self) -> int:
        """Answers and stream ends waiting for the client to read."""
        return len(self._outbox)

    def subscribe(self, call_id: int, opener: SubscriptionOpener, request: Message, recorder: CallRecorder) -> None:
        """Open a subscription for the Subscribe call *call_id* and answer it
        (``Event{subscribed}``); its events follow in Events frames.

        Raises:
            BrokerError: the subscription was refused (the caller answers the call with it).
        """
        with contextlib.ExitStack() as opening:
            subscription = opening.enter_context(opener(self._session, request))
            closer = opening.pop_all()
        live = _Live(subscription, closer, recorder)
        self._live[call_id] = live
        subscription.on_ready(lambda: self._mark_ready(call_id))
        self._post(FdFrame(reply=CallReply(call_id=call_id, response=_SUBSCRIBED)))
        if subscription.takeable:  # ports that fired before anyone listened, queued at once
            self._mark_ready(call_id)

    def refuse(self, call_id: int, error: BrokerError) -> None:
        """Answer the Subscribe call *call_id* with *error* (it was not opened)."""
        self._post(FdFrame(reply=CallReply(call_id=call_id, error=error_detail(error))))

    def cancel(self, call_id: int) -> bool:
        """The client ends the subscription *call_id*: it ends normally (counted
        as cancelled, as over gRPC).  Whether it was one of these."""
        if call_id not in self._live:
            return False
        self._end(call_id, None, errno.ECANCELED)
        return True

    def end_all(self) -> None:
        """The session is released: every subscription ends with StreamEnd,
        if the socket takes it at once (the client may be gone already)."""
        channel = self._session.channel
        for call_id in sorted(self._live):
            self._close(call_id, 0)
            channel.send_nowait(FdFrame(stream_end=StreamEnd(call_id=call_id)))
        self._ready.clear()
        self._outbox.clear()

    def close(self) -> None:
        """Stop: subscriptions closed, nothing more sent (the session ends)."""
        self._closed = True
        for call_id in list(self._live):
            self._close(call_id, errno.ECANCELED)
        self._ready.clear()
        self._outbox.clear()
        if self._sending is not None:
            self._sending.cancel()

    # ------------------------------------------------------------ ending

    def _end(self, call_id: int, error: BrokerError | None, code: int) -> None:
        """Close the subscription and tell the client, after what was already sent."""
        self._close(call_id, code)
        end = StreamEnd(call_id=call_id, error=error_detail(error)) if error is not None else StreamEnd(call_id=call_id)
        self._post(FdFrame(stream_end=end))

    def _close(self, call_id: int, code: int) -> None:
        live = self._live.pop(call_id)
        self._ready.pop(call_id, None)
        live.subscription.on_ready(None)
        try:
            live.closer.close()
        finally:
            live.recorder.record(code, perf_counter() - live.started)

    # ------------------------------------------------------------ sending

    def _mark_ready(self, call_id: int) -> None:
        self._ready[call_id] = None
        self._schedule()

    def _post(self, frame: FdFrame) -> None:
        self._outbox.append(frame)
        self._schedule()

    def _schedule(self) -> None:
        # One flush a turn, and none while a frame waits for the socket: then
        # the subscriptions' queues take the back-pressure.
        if not self._scheduled and self._sending is None and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._closed or self._session.closed.is_set():
            return
        task = start_eagerly(self._send_due())
        if task is not None:
            self._sending = task
            task.add_done_callback(self._sent)
        elif self._ready or self._outbox:
            self._schedule()

    def _sent(self, task: "asyncio.Task[None]") -> None:
        self._sending = None
        if self._ready or self._outbox:
            self._schedule()

    async def _send_due(self) -> None:
        channel = self._session.channel
        try:
            while self._outbox:
                await channel.send(self._outbox.popleft())
            events = self._take()
            if events is not None:
                await channel.send(events)
        except OSError as exc:
            # The client is gone: its session ends with the channel's reader.
            log.debug("session %d: event frame not sent: %s", self._session.id, exc, extra=self._session.log_fields)
            self._ready.clear()
            self._outbox.clear()

    def _take(self) -> FdFrame | None:
        """This turn's events as one frame (``None``: nothing to send), taken
        round robin, at most one per subscription; subscriptions that ended
        are closed and their StreamEnd posted behind the frame."""
        fired: dict[int, list[int]] = {}
        lost: list[EventsLost] = []
        ended: list[tuple[int, BrokerError | None]] = []
        ready, live_by_id = self._ready, self._live
        if len(ready) <= SUBSCRIPTIONS_PER_FRAME:
            turn = list(ready)
            ready.clear()
        else:
            turn = list(itertools.islice(ready, SUBSCRIPTIONS_PER_FRAME))
            for call_id in turn:
                del ready[call_id]
        again: list[int] = []
        for call_id in turn:
            live = live_by_id.get(call_id)
            if live is None:
                continue
            subscription = live.subscription
            try:
                event = subscription.get_nowait()
                if isinstance(event, Lost):
                    lost.append(EventsLost(call_id=call_id, count=event.count))
                    event = subscription.get_nowait()  # the event the loss was reported before
            except Exception as exc:  # noqa: BLE001 - the subscription's end, told as such
                ended.append((call_id, subscription_end(exc)))
                continue
            if event is not None:
                fired.setdefault(event.port, []).append(call_id)  # type: ignore[union-attr]
            if subscription.takeable:
                again.append(call_id)  # behind the others: round robin
        for call_id in again:
            ready[call_id] = None
        for call_id, error in ended:
            self._end(call_id, error, error.errno if error is not None else 0)
        if not fired and not lost:
            return None
        return FdFrame(
            events=Events(
                lost=lost,
                fired=[PortFired(call_id=ids[0], port=port, also_call_ids=ids[1:]) for port, ids in fired.items()],
            )
        )
