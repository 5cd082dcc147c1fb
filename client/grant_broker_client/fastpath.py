"""The SDK's end of the fast path: calls as frames on the session's fd channel.

When the broker offers it at the hello, :class:`~grant_broker_client.session.Session`
sends its unary calls here instead of over gRPC: one ``Call`` datagram, one
``CallReply`` datagram back carrying the response's descriptors (see
``fdchannel.proto``).  Replies are matched to calls by id; descriptors of a
reply are put in the session's transfer table under an id of the SDK's own
and the response's ``fd_transfer`` names it, so the device clients take them
exactly as they take the descriptors of a gRPC reply.  Errors are the same
:class:`~grant_broker_client.errors.BrokerClientError`, with the gRPC code
the broker's errno maps to.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from grant_broker_client.errors import BrokerClientError
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import FdChannel
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.methods import FD_TRANSFER_FIELD, METHODS
from grant_broker_protocol.transfers import TransferTable
from grant_broker_protocol.v1 import evtchn_pb2
from grant_broker_protocol.v1.common_pb2 import ErrorDetail
from grant_broker_protocol.v1.fdchannel_pb2 import Call, Cancel, Events, FdFrame

# Transfer ids the SDK gives to a reply's descriptors: far above the
# broker's own, which count up from 1.
_LOCAL_TRANSFER_IDS = 1 << 62

_SUBSCRIBE_OPERATION = "evtchn subscribe"

# Room in a Call frame besides the request itself (call id, method name, framing).
_CALL_OVERHEAD = 256


def error_from_detail(detail: ErrorDetail) -> BrokerClientError:
    """The broker's ErrorDetail as the SDK's error, with the code its errno maps to."""
    error = BrokerError(detail.errno, detail.operation, detail.detail, gntst=detail.gntst if detail.HasField("gntst") else None)
    return BrokerClientError.from_error(error)


class FastCalls:
    """The calls of one session in flight on its fd channel."""

    def __init__(self, channel: FdChannel, incoming: TransferTable, lost: Callable[[str], BrokerClientError]) -> None:
        self._channel = channel
        self._incoming = incoming
        self._lost = lost
        self._ids = itertools.count(1)
        self._local_transfers = itertools.count(_LOCAL_TRANSFER_IDS)
        self._replies: dict[int, asyncio.Future[tuple[FdFrame, list[OwnedFd]]]] = {}
        self._streams: dict[int, FastStream] = {}
        self._failure: BrokerClientError | None = None

    def serves(self, method: str, request: Message) -> bool:
        """Whether *method* with *request* goes on the fast path (else gRPC):
        a unary method whose request fits in a frame."""
        info = METHODS.get(method)
        return (
            self._failure is None
            and info is not None
            and not info.streaming
            and request.ByteSize() + _CALL_OVERHEAD <= self._channel.max_frame_bytes
        )

    async def call(self, method: str, request: Message, *, timeout: float | None) -> Message:
        """Call *method*; its response, or BrokerClientError."""
        info = METHODS[method]
        frame, fds = await self._exchange(method, request, timeout)
        reply = frame.reply
        if reply.WhichOneof("result") == "error":
            _close(fds)
            raise error_from_detail(reply.error)
        try:
            response = info.response_type.FromString(reply.response)
        except DecodeError as exc:
            _close(fds)
            raise BrokerClientError(errno.EPROTO, info.name, f"the broker's reply does not decode: {exc}",
                                    code=grpc.StatusCode.INTERNAL) from None
        if fds:
            transfer_id = next(self._local_transfers)
            self._incoming.deliver(transfer_id, fds)
            setattr(response, FD_TRANSFER_FIELD, transfer_id)
        return response

    async def _exchange(self, method: str, request: Message, timeout: float | None) -> tuple[FdFrame, list[OwnedFd]]:
        if self._failure is not None:
            raise self._failure
        call_id = next(self._ids)
        waiter: asyncio.Future[tuple[FdFrame, list[OwnedFd]]] = asyncio.get_running_loop().create_future()
        self._replies[call_id] = waiter
        try:
            await self._channel.send(FdFrame(call=Call(call_id=call_id, method=method, request=request.SerializeToString())))
            if timeout is None:
                return await waiter
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise BrokerClientError(errno.ETIMEDOUT, METHODS[method].name, f"no reply within {timeout} s",
                                    code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except OSError as exc:
            raise self._lost(f"the session's fd channel failed: {exc}") from None
        finally:
            # A reply that arrives later finds no waiter and is dropped, its descriptors closed.
            self._replies.pop(call_id, None)

    def on_reply(self, frame: FdFrame, fds: list[OwnedFd]) -> None:
        """A CallReply arrived (from the session's frame reader)."""
        call_id = frame.reply.call_id
        stream = self._streams.get(call_id)
        if stream is not None:
            _close(fds)
            stream.started(frame)
            return
        waiter = self._replies.get(call_id)
        if waiter is None or waiter.done():
            _close(fds)  # the call timed out or was cancelled meanwhile
            return
        waiter.set_result((frame, fds))

    def on_stream_frame(self, frame: FdFrame) -> None:
        """A PortFired / EventsLost / StreamEnd / Events arrived."""
        body = frame.WhichOneof("body")
        if body is None:
            return
        if body == "events":
            self._on_events(frame.events)
            return
        stream = self._streams.get(getattr(frame, body).call_id)
        if stream is not None:
            stream.receive(frame)

    def _on_events(self, events: Events) -> None:
        """A session's events of one turn (fast-path version 2): the losses
        first, each right before its stream's event in ``fired``."""
        streams = self._streams
        for lost in events.lost:
            stream = streams.get(lost.call_id)
            if stream is not None:
                stream.deliver(evtchn_pb2.Event(lost=lost.count))
        for fired in events.fired:
            port = fired.port
            stream = streams.get(fired.call_id)
            if stream is not None:
                stream.deliver(evtchn_pb2.Event(port=port))
            for call_id in fired.also_call_ids:
                stream = streams.get(call_id)
                if stream is not None:
                    stream.deliver(evtchn_pb2.Event(port=port))

    def stream(self, method: str, request: Message) -> "FastStream":
        """Start a streaming call (Subscribe); read it from the returned stream."""
        call_id = next(self._ids)
        stream = FastStream(self, call_id)
        self._streams[call_id] = stream
        sending = asyncio.ensure_future(
            self._channel.send(FdFrame(call=Call(call_id=call_id, method=method, request=request.SerializeToString())))
        )
        # A Call that never left ends its stream at once (the reader would
        # otherwise wait for a reply that cannot come).
        sending.add_done_callback(lambda done: self._sent(stream, done))
        stream.sending = sending
        return stream

    def _sent(self, stream: "FastStream", sending: "asyncio.Future[None]") -> None:
        if sending.cancelled():
            stream.fail(BrokerClientError(errno.ECANCELED, _SUBSCRIBE_OPERATION, "the subscription was not sent",
                                          code=grpc.StatusCode.CANCELLED))
            return
        exc = sending.exception()
        if exc is not None:
            stream.fail(self._failure or BrokerClientError(
                errno.EPIPE, _SUBSCRIBE_OPERATION, f"the subscription could not be sent: {exc}",
                code=grpc.StatusCode.UNAVAILABLE))

    def _cancel(self, call_id: int) -> None:
        if call_id in self._streams and self._failure is None and not self._channel.closed:
            frame = FdFrame(cancel=Cancel(call_id=call_id))
            asyncio.ensure_future(self._channel.send(frame)).add_done_callback(_retrieve)

    def _forget(self, call_id: int) -> None:
        self._streams.pop(call_id, None)

    def fail(self, error: BrokerClientError) -> None:
        """The fd channel is gone: every call in flight fails with *error*, and
        so does every stream (one the broker ended got its StreamEnd first)."""
        self._failure = error
        for waiter in self._replies.values():
            if not waiter.done():
                waiter.set_exception(error)
        for stream in list(self._streams.values()):
            stream.fail(error)


class FastStream:
    """A streaming call on the fast path, read like a gRPC stream call:
    :meth:`read` gives its messages (``evtchn_pb2.Event``), then ``None`` at
    its end; a failed stream raises :class:`BrokerClientError`."""

    def __init__(self, calls: FastCalls, call_id: int) -> None:
        self._calls = calls
        self.call_id = call_id
        self.sending: asyncio.Future[None] | None = None
        # A deque and one waiter rather than an asyncio.Queue: a fan-out hands
        # an event to each of a session's streams, and the Queue's own work
        # per item was a good part of it.  One reader at a time.
        self._items: collections.deque[evtchn_pb2.Event | BrokerClientError | None] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ended = False

    def started(self, frame: FdFrame) -> None:
        reply = frame.reply
        if reply.WhichOneof("result") == "error":
            self._end(error_from_detail(reply.error))
            return
        self._put(evtchn_pb2.Event.FromString(reply.response))

    def deliver(self, event: evtchn_pb2.Event) -> None:
        """An event of this stream, from an Events frame."""
        self._put(event)

    def _put(self, item: "evtchn_pb2.Event | BrokerClientError | None") -> None:
        self._items.append(item)
        if item is None or isinstance(item, BrokerClientError):
            while self._waiters:  # the end: every reader sees it
                self._wake_one()
        else:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def receive(self, frame: FdFrame) -> None:
        body = frame.WhichOneof("body")
        if body == "port_fired":
            self._put(evtchn_pb2.Event(port=frame.port_fired.port))
        elif body == "events_lost":
            self._put(evtchn_pb2.Event(lost=frame.events_lost.count))
        elif body == "stream_end":
            end = frame.stream_end
            self._end(error_from_detail(end.error) if end.HasField("error") else None)

    def _end(self, error: BrokerClientError | None) -> None:
        if not self._ended:
            self._ended = True
            self._calls._forget(self.call_id)
            self._put(error)

    def fail(self, error: BrokerClientError) -> None:
        self._end(error)

    async def read(self) -> evtchn_pb2.Event | None:
        """The next message, or ``None`` once the stream ended normally."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken and then cancelled: the item is another reader's
                raise
        item = self._items[0]
        if item is None:
            return None  # left in place: every later read sees the end too
        if isinstance(item, BrokerClientError):
            raise item
        self._items.popleft()
        return item

    def cancel(self) -> None:
        """End the stream from this side; the broker forgets the subscription."""
        if not self._ended:
            self._calls._cancel(self.call_id)
            self._end(None)


def _close(fds: list[OwnedFd]) -> None:
    for fd in fds:
        fd.close()


def _retrieve(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled():
        future.exception()
