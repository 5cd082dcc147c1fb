"""The fast path: a session's calls as frames on its own fd channel.

The session's SOCK_SEQPACKET connection is authenticated at the hello,
ordered and able to carry descriptors, so a call can travel on it as one
datagram and its reply — with the reply's descriptors — as another, with no
rendezvous between two sockets.  Calls are served by the same route table,
hence the same operations, as gRPC (see ``fdchannel.proto`` for the frames).

Per session: many calls in flight, at most ``Limits.max_fast_calls_in_flight``
unary calls at once — at the bound the frame reader waits, so the client's
further frames stay in its own socket buffer.  A call is served straight from
the reader callback up to its first wait (:mod:`.eager`): one that never waits
is answered there, one that does goes on in a task of its own.  Streams are
bounded by the subscription budget instead.  Event subscriptions deliver from
their own bounded queue (the fan-out's): a client that does not read fills
the queue and is told what it lost, the broker never blocks on it.  From
fast-path version 2 on, a session's subscriptions send their events together,
one ``Events`` frame a turn (:mod:`.fastevents`); version 1 clients get a
``PortFired``/``EventsLost`` frame per event from a stream per subscription.

Every call is reported, once it ends, to its method's
:class:`~grant_broker.core.observe.CallRecorder` (``FastPath._serve``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
from collections.abc import AsyncIterator, Mapping
from time import perf_counter
from typing import Any, cast

from google.protobuf.message import DecodeError, Message

from grant_broker.core.failures import as_broker_error
from grant_broker.core.observe import NO_RECORDER, CallRecorder
from grant_broker.core.reply import Reply
from grant_broker.core.routes import Route, StreamOperation, UnaryOperation
from grant_broker.core.session import Session
from grant_broker.transport.eager import start_eagerly
from grant_broker.transport.fastevents import MAX_UNSENT_FRAMES, FastEvents
from grant_broker_protocol.errors import BrokerError, error_detail
from grant_broker_protocol.fdchannel import FAST_PATH_EVENTS_FRAME, FAST_PATH_VERSION, MAX_FDS_PER_FRAME, ProtocolError
from grant_broker_protocol.methods import FD_TRANSFER_FIELD
from grant_broker_protocol.v1 import evtchn_pb2
from grant_broker_protocol.v1.fdchannel_pb2 import (
    Call,
    CallReply,
    EventsLost,
    FdFrame,
    PortFired,
    StreamEnd,
)

log = logging.getLogger(__name__)


class FastPath:
    """Serves the fast-path calls of one session."""

    def __init__(
        self,
        session: Session,
        routes: Mapping[str, Route],
        max_in_flight: int,
        recorders: Mapping[str, CallRecorder] | None = None,
        unknown: CallRecorder = NO_RECORDER,
        *,
        version: int = FAST_PATH_VERSION,
    ) -> None:
        self._session = session
        # From version 2 on, subscriptions are the session's FastEvents (one frame a turn), not streams.
        self._events = FastEvents(session) if version >= FAST_PATH_EVENTS_FRAME else None
        self._routes = routes
        # By method name as *routes*: how each call ended (the metrics); *unknown* for a name no route has.
        self._recorders: Mapping[str, CallRecorder] = recorders or {}
        self._unknown = unknown
        self._max_in_flight = max_in_flight
        self._unary_in_flight = 0
        self._waiting: collections.deque[Call] = collections.deque()
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._streams: set[int] = set()  # the calls of self._calls that are streams
        session.on_release(self.end_streams)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def submit(self, call: Call) -> None:
        """Serve *call* (from the session's frame reader callback).  At the
        session's bound of unary calls in flight, the call waits and the
        reader pauses: the client's further frames stay in its socket.

        Raises:
            ProtocolError: call id 0, or one already in flight.
        """
        call_id = call.call_id
        if call_id == 0:
            raise ProtocolError("call id 0 is reserved")
        if (
            call_id in self._calls
            or (self._events is not None and call_id in self._events)
            or any(waiting.call_id == call_id for waiting in self._waiting)
        ):
            raise ProtocolError(f"call id {call_id} is already in flight")
        route = self._routes.get(call.method)
        if route is not None and route.subscription is not None and self._events is not None:
            self._subscribe(call_id, route, call.request)
            return
        # A stream lives as long as its subscription, bounded by the
        # subscription budget: it takes no call slot, or a session's long-lived
        # streams would leave its calls (and its Cancel frames) unserved.
        if route is not None and route.streaming:
            # Live streams are bounded by the subscription budget; refused ones
            # wait (as tasks) until the client reads their answer: a client
            # that keeps subscribing without reading must not grow them unbounded.
            streams = len(self._calls) - self._unary_in_flight  # the tasks of streams, live or answering a refusal
            if streams >= self._session.limits.max_subscriptions_per_session + MAX_UNSENT_FRAMES:
                raise ProtocolError(f"{streams} streams in flight: the client subscribes without reading its channel")
            self._streams.add(call_id)  # from now on, so that a Cancel right behind it finds it
            self._launch(call, counted=False)
        elif self._unary_in_flight >= self._max_in_flight:
            self._waiting.append(call)
            self._session.channel.pause_reading()
        else:
            self._launch(call, counted=True)

    def _launch(self, call: Call, *, counted: bool) -> None:
        call_id = call.call_id
        if counted:
            self._unary_in_flight += 1
        # Served from the reader callback up to its first wait: a call that
        # never waits is answered with no task at all (see transport/eager.py).
        task = start_eagerly(self._serve(call_id, call.method, call.request))
        if task is None:
            self._finished(call_id, counted)
            return
        self._calls[call_id] = task
        task.add_done_callback(lambda _: self._finished(call_id, counted))

    def _finished(self, call_id: int, counted: bool) -> None:
        self._calls.pop(call_id, None)
        self._streams.discard(call_id)
        if not counted:
            return
        self._unary_in_flight -= 1
        if self._waiting and not self._session.closed.is_set():
            self._launch(self._waiting.popleft(), counted=True)
            if not self._waiting:
                self._session.channel.resume_reading()

    def _subscribe(self, call_id: int, route: Route, payload: bytes) -> None:
        """A Subscribe call, served by the session's FastEvents: opened and
        answered now, from the reader callback."""
        assert self._events is not None and route.subscription is not None
        if self._events.unsent >= MAX_UNSENT_FRAMES:
            raise ProtocolError(
                f"{self._events.unsent} answers to subscriptions are unread: the client subscribes without reading its channel"
            )
        recorder = self._recorders.get(route.full_name, self._unknown)
        started = perf_counter()
        try:
            try:
                request = route.request_type.FromString(payload)
            except DecodeError as exc:
                raise BrokerError(errno.EINVAL, route.method, f"the request does not decode: {exc}") from None
            self._events.subscribe(call_id, route.subscription, request, recorder)
        except Exception as exc:  # noqa: BLE001 - told to the client, never swallowed
            error = as_broker_error(exc)
            recorder.record(error.errno, perf_counter() - started)
            self._events.refuse(call_id, error)

    def cancel(self, call_id: int) -> None:
        """The client ends a stream; an unknown id is ignored — the stream may
        have ended on its own meanwhile.  A unary call runs to its end: cut
        short at an await, what it already got from a device (a descriptor
        from a worker thread) would have no owner."""
        if self._events is not None and self._events.cancel(call_id):
            return
        task = self._calls.get(call_id)
        if task is not None and call_id in self._streams:
            task.cancel()

    def end_streams(self) -> None:
        """Tell the client its streams ended, as gRPC streams end with OK when
        their session does — if the socket takes it at once: the client may
        be gone already.  Runs when the session is released, before its
        connection closes."""
        for call_id in sorted(self._streams):
            self._session.channel.send_nowait(FdFrame(stream_end=StreamEnd(call_id=call_id)))
        self._streams.clear()
        if self._events is not None:
            self._events.end_all()

    async def close(self) -> None:
        """Stop serving every call (the session ends)."""
        if self._events is not None:
            self._events.close()
        tasks = list(self._calls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ serving

    async def _serve(self, call_id: int, method: str, payload: bytes) -> None:
        started = perf_counter()
        code = errno.ECANCELED  # unless it ends otherwise: the client or the session's end cancelled it
        route = self._routes.get(method)
        try:
            try:
                if route is None:
                    raise BrokerError(errno.ENOSYS, "fast path", f"no method {method!r} on the fast path; call it over gRPC")
                try:
                    request = route.request_type.FromString(payload)
                except DecodeError as exc:
                    raise BrokerError(errno.EINVAL, route.method, f"the request does not decode: {exc}") from None
                if route.streaming:
                    code = await self._stream(call_id, route, request)
                    return
                reply = await cast(UnaryOperation, route.operation)(self._session, request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - told to the client, never swallowed
                error = as_broker_error(exc)
                code = error.errno
                await self._send(FdFrame(reply=CallReply(call_id=call_id, error=error_detail(error))))
                return
            code = await self._reply(call_id, reply)
        finally:
            self._recorders.get(method, self._unknown).record(code, perf_counter() - started)

    async def _reply(self, call_id: int, reply: Reply[Any]) -> int:
        """The reply's message and descriptors in one datagram — or, past
        MAX_FDS_PER_FRAME descriptors, the descriptors as a transfer ahead of
        it, named by the response's fd_transfer as over gRPC.  Answers the
        errno the client was told (0: none)."""
        channel = self._session.channel
        code = 0
        try:
            message: Message = reply.message
            fds = [fd.fileno() for fd in reply.fds]
            if len(fds) > MAX_FDS_PER_FRAME:
                setattr(message, FD_TRANSFER_FIELD, await channel.send_transfer(fds))
                fds = []
            frame = FdFrame(reply=CallReply(call_id=call_id, response=message.SerializeToString(), fd_count=len(fds)))
            if frame.ByteSize() > channel.max_frame_bytes:
                # The operation did its work: say why its answer is missing.
                error = BrokerError(
                    errno.EMSGSIZE,
                    "fast path",
                    f"the reply of {frame.ByteSize()} bytes exceeds the fast path's {channel.max_frame_bytes}; "
                    "make this call over gRPC",
                )
                frame, fds = FdFrame(reply=CallReply(call_id=call_id, error=error_detail(error))), []
                code = error.errno
            await self._send(frame, fds)
        finally:
            reply.close()
        return code

    async def _stream(self, call_id: int, route: Route, request: Message) -> int:
        """Serve a streaming call until it ends; answer how (an errno, 0: normally)."""
        messages: AsyncIterator[Message] = cast(StreamOperation, route.operation)(self._session, request)
        self._streams.add(call_id)
        try:
            try:
                first = await anext(messages)
            except StopAsyncIteration:
                await self._send(FdFrame(stream_end=StreamEnd(call_id=call_id)))
                return 0
            # The first message (Event{subscribed}) answers the call: the stream is live.
            await self._send(FdFrame(reply=CallReply(call_id=call_id, response=first.SerializeToString())))
            try:
                async for message in messages:
                    await self._send(_stream_frame(call_id, message))
            except asyncio.CancelledError:
                if self._session.closed.is_set():
                    raise
                # Cancel from the client: the stream ends normally (counted as cancelled, as over gRPC).
                await self._send(FdFrame(stream_end=StreamEnd(call_id=call_id)))
                return errno.ECANCELED
            except Exception as exc:  # noqa: BLE001 - told to the client
                error = as_broker_error(exc)
                await self._send(FdFrame(stream_end=StreamEnd(call_id=call_id, error=error_detail(error))))
                return error.errno
            await self._send(FdFrame(stream_end=StreamEnd(call_id=call_id)))
            return 0
        finally:
            self._streams.discard(call_id)
            await messages.aclose()  # type: ignore[attr-defined]

    async def _send(self, frame: FdFrame, fds: list[int] | None = None) -> None:
        channel = self._session.channel
        if channel.closed:
            return
        try:
            await channel.send(frame, fds or ())
        except OSError as exc:
            # The client is gone: its session ends with the channel's reader.
            log.debug("session %d: fast-path send failed: %s", self._session.id, exc, extra=self._session.log_fields)


def _stream_frame(call_id: int, message: Message) -> FdFrame:
    """A message of a streaming call as its frame (the events of Subscribe)."""
    event = cast(evtchn_pb2.Event, message)
    kind = event.WhichOneof("kind")
    if kind == "port":
        return FdFrame(port_fired=PortFired(call_id=call_id, port=event.port))
    if kind == "lost":
        return FdFrame(events_lost=EventsLost(call_id=call_id, count=event.lost))
    raise ValueError(f"no fast-path frame for a stream message of kind {kind}")
