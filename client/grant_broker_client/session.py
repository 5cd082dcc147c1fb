"""Connecting to the broker and holding a session.

>>> async with await grant_broker_client.connect() as session:   # doctest: +SKIP
...     print(session.domid)

A :class:`Session` is two connections: gRPC over the broker's Unix socket,
and the fd channel (SOCK_SEQPACKET) that authenticates the session and
carries descriptors.  When the session closes — or the process dies — the
broker releases everything the session held.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
from google.protobuf.message import Message

from grant_broker_client.fastpath import FastCalls
from grant_broker_protocol.fdchannel import (
    FAST_PATH_VERSION,
    MAX_FDS_PER_FRAME,
    PROTOCOL_VERSION,
    ChannelClosed,
    DescriptorsDropped,
    FdChannel,
    ProtocolError,
)
from grant_broker_protocol.endpoints import SESSION_METADATA_KEY, default_socket_path, fd_channel_path
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.status import status_code_for
from grant_broker_protocol.transfers import TransferRefused, TransferTable
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc
from grant_broker_protocol.v1.fdchannel_pb2 import ClientHello, FdFrame
from grant_broker_client.errors import BrokerClientError, from_rpc_error

if TYPE_CHECKING:
    from grant_broker_client.reconnect import Retry
    from grant_broker_client.evtchn import EvtchnClient
    from grant_broker_client.gntalloc import GntallocClient
    from grant_broker_client.gntdev import GntdevClient
    from grant_broker_client.membuf import MemBufClient

DEFAULT_MAX_IN_FLIGHT = 1024
"""Unary calls one session has in flight at most; more wait in the SDK, in order.

A burst of thousands of calls on one connection would otherwise sit in the
broker's grpc backlog (which grpc core sheds with CANCELLED beyond its limits,
see ``grant_broker.daemon.server.MAX_QUEUED_CALLS``); waiting here costs the
caller nothing and keeps the broker's backlog bounded by sessions x this."""
_Response = TypeVar("_Response", bound=Message)

CHANNEL_OPTIONS = (
    # grpc shares one connection (subchannel) between every channel of the
    # process to the same socket, with its reconnect backoff (by default up to
    # 120 s).  A restarted broker is back within a second or two: keep the
    # backoff short so that new sessions do not inherit a long wait.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
CONNECT_TIMEOUT = 10.0
HELLO_TIMEOUT = 10.0


def _refusal(operation: str, error: Any) -> BrokerClientError:
    """The broker's ProtocolError frame as an error: its errno says why (0 from
    brokers that did not say: a refusal, PERMISSION_DENIED)."""
    if not error.errno:
        return BrokerClientError(errno.EPERM, operation, error.message, code=grpc.StatusCode.PERMISSION_DENIED)
    return BrokerClientError(error.errno, operation, error.message, code=status_code_for(error.errno))


# What calls of a session whose broker went away fail with, before the SDK
# says so plainly: the dead connection, or a restarted broker that does not
# know the token.
_LOST_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.CANCELLED})


_STREAM_FRAMES = frozenset({"port_fired", "events_lost", "stream_end", "events"})


def _method_name(method: Any) -> str | None:
    """The gRPC method name of a stub's method (``/grant_broker.v1.Gntdev/Map``):
    grpc.aio keeps it as bytes in ``_method``.  ``None`` when it cannot be
    told: the call then goes over gRPC."""
    name = getattr(method, "_method", None)
    return name.decode() if isinstance(name, bytes) else None


class Session:
    """An open session with the broker.  Use :func:`connect`."""

    def __init__(
        self,
        socket_path: str,
        channel: grpc.aio.Channel,
        fd_channel: FdChannel,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        fast_path: bool = True,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.socket_path = socket_path
        self.grpc_channel = channel
        self._fd_channel = fd_channel
        self.session_id = 0
        self.domid = 0
        self.vmid = 0
        self._token = ""
        self._metadata: tuple[tuple[str, str], ...] = ()
        # The broker's descriptors by transfer id, until the reply naming them is read.
        self._incoming = TransferTable(accumulate=True, missing_errno=errno.ETIMEDOUT)
        self._closed = False
        self._channel_error: BaseException | None = None
        self._broker_lost = False
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._want_fast_path = fast_path
        # Calls as frames on the fd channel, when the broker offers it at the hello.
        self._fast: FastCalls | None = None
        self.broker = broker_pb2_grpc.BrokerStub(channel)

    # Device clients, one per kernel interface, created on first use.  Never
    # after close: grpcio crashes when a stub is made on a closed channel.
    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClientError(errno.EPIPE, "session", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)

    @functools.cached_property
    def gntdev(self) -> "GntdevClient":
        self._check_open()
        from grant_broker_client.gntdev import GntdevClient

        return GntdevClient(self)

    @functools.cached_property
    def gntalloc(self) -> "GntallocClient":
        self._check_open()
        from grant_broker_client.gntalloc import GntallocClient

        return GntallocClient(self)

    @functools.cached_property
    def evtchn(self) -> "EvtchnClient":
        self._check_open()
        from grant_broker_client.evtchn import EvtchnClient

        return EvtchnClient(self)

    @functools.cached_property
    def membuf(self) -> "MemBufClient":
        self._check_open()
        from grant_broker_client.membuf import MemBufClient

        return MemBufClient(self)

    # ------------------------------------------------------------ set-up

    async def _hello(self, client_name: str, domid: int | None, vmid: int | None) -> None:
        hello = ClientHello(
            protocol_version=PROTOCOL_VERSION,
            client_name=client_name,
            fast_path_version=FAST_PATH_VERSION if self._want_fast_path else 0,
        )
        if domid is not None:
            hello.domid = domid
        if vmid is not None:
            hello.vmid = vmid
        try:
            await self._fd_channel.send(FdFrame(client_hello=hello))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the hello arrived: the broker's ProtocolError frame, read next, says why
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                frame, fds = await self._fd_channel.receive()
        except TimeoutError:
            raise BrokerClientError(errno.ETIMEDOUT, "open session", f"the broker did not answer the hello within {HELLO_TIMEOUT} s",
                                    code=grpc.StatusCode.UNAVAILABLE) from None
        for fd in fds:
            fd.close()
        body = frame.WhichOneof("body")
        if body == "error":
            raise _refusal("open session", frame.error)
        if body != "server_hello":
            raise ProtocolError(f"expected ServerHello, got {body}")
        server = frame.server_hello
        self.session_id, self.domid, self.vmid, self._token = server.session_id, server.domid, server.vmid, server.token
        self._metadata = ((SESSION_METADATA_KEY, self._token),)
        if server.fast_path_version > 0 and self._want_fast_path:  # any version: this SDK speaks them all
            self._fd_channel.max_frame_bytes = server.max_frame_bytes
            self._fast = FastCalls(self._fd_channel, self._incoming, lambda why: self._lost_error("call"))
        self._fd_channel.start_reading(self._on_frame, self._on_channel_end, on_dropped=self._on_dropped)

    def _on_frame(self, frame: FdFrame, fds: list[OwnedFd]) -> None:
        """A frame from the broker, straight from the fd channel's reader callback."""
        body = frame.WhichOneof("body")
        if body == "transfer":
            self._incoming.deliver(frame.transfer.transfer_id, fds)
            return
        if self._fast is not None and body == "reply":
            self._fast.on_reply(frame, fds)
            return
        if self._fast is not None and body in _STREAM_FRAMES:
            self._fast.on_stream_frame(frame)
            return
        for fd in fds:
            fd.close()
        if body == "error":
            raise ProtocolError(f"broker ended the session: {frame.error.message}")
        raise ProtocolError(f"unexpected {body} frame from the broker")

    def _on_dropped(self, exc: DescriptorsDropped) -> None:
        # This process is out of descriptors: the call waiting for them fails
        # (RESOURCE_EXHAUSTED); the session goes on.
        self._incoming.fail(exc.transfer_id, BrokerError(errno.EMFILE, "fd channel", f"this process is out of descriptors: {exc}"))

    def _on_channel_end(self, exc: BaseException) -> None:
        self._channel_error = exc
        # A hang-up without a ProtocolError frame: the broker process is
        # gone (stopped, crashed, restarting), not refusing this session.
        self._broker_lost = isinstance(exc, (ChannelClosed, OSError))
        self._incoming.close(BrokerError(errno.EPIPE, "fd channel", f"the session's fd channel is gone: {exc}"))
        if self._fast is not None:
            self._fast.fail(self._lost_error("call") if self._broker_lost else BrokerClientError(
                errno.EPIPE, "fd channel", f"the session's fd channel is gone: {exc}", code=grpc.StatusCode.UNAVAILABLE))

    # ------------------------------------------------------------ calls

    @property
    def broker_lost(self) -> bool:
        """The broker hung up the fd channel without a protocol error: it stopped,
        crashed or is restarting.  The session and everything it held are gone
        in the broker; every call now fails with UNAVAILABLE.  Open a new
        session (see :mod:`grant_broker_client.reconnect`)."""
        return self._broker_lost

    def _lost_error(self, operation: str) -> BrokerClientError:
        return BrokerClientError(
            errno.ECONNRESET, operation,
            f"the broker closed session {self.session_id} (it stopped or restarted: {self._channel_error}); "
            "everything the session held is gone — open a new session",
            code=grpc.StatusCode.UNAVAILABLE,
        )

    async def call(self, method: Any, request: Message, *, timeout: float | None = None) -> Any:
        """Invoke a unary stub *method* within this session; errors become
        :class:`BrokerClientError` with the broker's errno / GNTST / status.

        At most ``max_in_flight`` (see :func:`connect`) calls of the session
        run at once; more wait here, in order, and *timeout* counts the wait.
        A session whose broker went away fails with UNAVAILABLE
        (:attr:`broker_lost`), whatever the new broker would answer its token."""
        if self._closed:
            raise BrokerClientError(errno.EPIPE, "call", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)
        if self._broker_lost:
            raise self._lost_error("call")
        if timeout is not None and self._in_flight.locked():
            started = asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(timeout):
                    await self._in_flight.acquire()
            except TimeoutError:
                raise BrokerClientError(errno.ETIMEDOUT, "call", f"no call slot of the session within {timeout} s",
                                        code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
            timeout = max(0.0, timeout - (asyncio.get_running_loop().time() - started))
        else:
            await self._in_flight.acquire()
        try:
            fast, name = self._fast, _method_name(method)
            if fast is not None and name is not None and fast.serves(name, request):
                return await fast.call(name, request, timeout=timeout)
            return await method(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
        finally:
            self._in_flight.release()
        if self._broker_lost and error.code in _LOST_CODES:
            raise self._lost_error(error.operation) from None
        raise error

    def stream(self, method: Any, request: Message) -> Any:
        """Start a server-streaming call within this session: on the fast path
        a :class:`~grant_broker_client.fastpath.FastStream`, else the gRPC call
        object."""
        name = _method_name(method)
        if self._fast is not None and name is not None:
            return self._fast.stream(name, request)
        return method(request, metadata=self._metadata)

    @property
    def fast_path(self) -> bool:
        """Whether this session's calls travel as frames on its fd channel (the
        broker offered the fast path) rather than over gRPC."""
        return self._fast is not None

    async def receive_fds(self, transfer_id: int, count: int, *, timeout: float = 5.0) -> list[OwnedFd]:
        """The *count* descriptors the broker sent under *transfer_id* (they are
        sent before the response that names them, so normally already here)."""
        if count == 0:
            return []
        try:
            fds = await self._incoming.take("fd channel", transfer_id, count=count, timeout=timeout)
        except BrokerError as exc:
            raise BrokerClientError.from_error(exc) from None
        if len(fds) != count:
            for fd in fds:
                fd.close()
            raise BrokerClientError(errno.EPROTO, "fd channel", f"transfer {transfer_id} carried {len(fds)} descriptors, the response names {count}",
                                    code=grpc.StatusCode.INTERNAL)
        return fds

    async def send_fds(self, fds: Sequence[int]) -> int:
        """Send descriptors (borrowed) ahead of a request; return the transfer id to name in it."""
        if not 0 < len(fds) <= MAX_FDS_PER_FRAME:
            raise ValueError(f"between 1 and {MAX_FDS_PER_FRAME} descriptors per request")
        return await self._fd_channel.send_transfer(fds)

    async def describe(self) -> broker_pb2.SessionInfo:
        """This session as the broker sees it: domain, usage, capabilities."""
        info: broker_pb2.SessionInfo = await self.call(self.broker.DescribeSession, broker_pb2.DescribeSessionRequest())
        return info

    # ------------------------------------------------------------ life

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """End the session: the broker releases everything it held.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fd_channel.close()
        self._incoming.close(BrokerError(errno.EPIPE, "fd channel", "the session is closed"))
        if self._fast is not None:
            self._fast.fail(BrokerClientError(errno.EPIPE, "session", "the session is closed", code=grpc.StatusCode.UNAVAILABLE))
        await self.grpc_channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def connect(
    socket_path: str | None = None,
    *,
    client_name: str = "",
    domid: int | None = None,
    vmid: int | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    retry: "Retry | None" = None,
    fast_path: bool = True,
) -> Session:
    """Open a session with the broker at *socket_path* (default: :func:`default_socket_path`).

    *domid* / *vmid* choose the domain the session acts as; only the emulated
    backend allows it (a real host has one domain: the broker's).
    *max_in_flight* bounds the session's concurrent unary calls (more wait in
    the SDK).  With *retry* (a :class:`grant_broker_client.reconnect.Retry`),
    a broker that is not there (yet) is waited for with exponential backoff
    instead of failing at once with UNAVAILABLE.
    """
    if retry is not None:
        from grant_broker_client.reconnect import connect_with_retry

        return await connect_with_retry(
            socket_path, retry=retry, client_name=client_name, domid=domid, vmid=vmid, max_in_flight=max_in_flight,
            fast_path=fast_path,
        )
    path = socket_path or default_socket_path()
    try:
        fd_channel = await FdChannel.connect(fd_channel_path(path))
    except OSError as exc:
        raise BrokerClientError(exc.errno or errno.ECONNREFUSED, "connect",
                                f"no broker at {path}: {exc.strerror}", code=grpc.StatusCode.UNAVAILABLE) from None
    channel = grpc.aio.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)
    session = Session(path, channel, fd_channel, max_in_flight=max_in_flight, fast_path=fast_path)
    try:
        await session._hello(client_name or f"pid {os.getpid()}", domid, vmid)
        # The broker is there (it answered the hello): wait for the gRPC
        # connection too, so that the first call does not fail fast on a
        # connection still in reconnect backoff from a previous broker.
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await channel.channel_ready()
        except TimeoutError:
            raise BrokerClientError(errno.ETIMEDOUT, "open session", f"no gRPC connection to {path} within {CONNECT_TIMEOUT} s",
                                    code=grpc.StatusCode.UNAVAILABLE) from None
    except BrokerClientError:
        await session.close()
        raise
    except (ChannelClosed, OSError) as exc:
        # The broker went away during the hello (it was stopping or restarting).
        await session.close()
        raise BrokerClientError(errno.ECONNRESET, "open session", f"the broker at {path} hung up during the hello: {exc}",
                                code=grpc.StatusCode.UNAVAILABLE) from None
    except BaseException:
        await session.close()
        raise
    return session
