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
import itertools
import os
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
from google.protobuf.message import Message

from grant_broker.fdchannel import ChannelClosed, FdChannel, ProtocolError, PROTOCOL_VERSION, MAX_FDS_PER_FRAME
from grant_broker.fds import OwnedFd
from grant_broker.v1 import broker_pb2, broker_pb2_grpc
from grant_broker.v1.fdchannel_pb2 import ClientHello, FdFrame, FdTransfer
from grant_broker_client.errors import BrokerClientError, from_rpc_error

if TYPE_CHECKING:
    from grant_broker_client.evtchn import EvtchnClient
    from grant_broker_client.gntalloc import GntallocClient
    from grant_broker_client.gntdev import GntdevClient
    from grant_broker_client.membuf import MemBufClient

SESSION_METADATA_KEY = "x-grant-broker-session"
_Response = TypeVar("_Response", bound=Message)


def default_socket_path() -> str:
    """Where ``grant-broker serve`` listens by default: ``$GRANT_BROKER_SOCKET``,
    else ``$XDG_RUNTIME_DIR/grant-broker/broker.sock``, else (root) ``/run/grant-broker/broker.sock``."""
    if path := os.environ.get("GRANT_BROKER_SOCKET"):
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.geteuid() != 0:
        return os.path.join(runtime, "grant-broker", "broker.sock")
    return "/run/grant-broker/broker.sock"


def fd_channel_path(socket_path: str) -> str:
    """The fd channel's socket lives beside the gRPC socket."""
    return socket_path + ".fds"


class Session:
    """An open session with the broker.  Use :func:`connect`."""

    def __init__(self, socket_path: str, channel: grpc.aio.Channel, fd_channel: FdChannel) -> None:
        self.socket_path = socket_path
        self.grpc_channel = channel
        self._fd_channel = fd_channel
        self.session_id = 0
        self.domid = 0
        self.vmid = 0
        self._token = ""
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._incoming: dict[int, list[OwnedFd]] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._channel_error: BaseException | None = None
        self._next_transfer = itertools.count(1)
        self._send_lock = asyncio.Lock()
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
        hello = ClientHello(protocol_version=PROTOCOL_VERSION, client_name=client_name)
        if domid is not None:
            hello.domid = domid
        if vmid is not None:
            hello.vmid = vmid
        await self._fd_channel.send(FdFrame(client_hello=hello))
        frame, fds = await self._fd_channel.receive()
        for fd in fds:
            fd.close()
        body = frame.WhichOneof("body")
        if body == "error":
            raise BrokerClientError(errno.EPERM, "open session", frame.error.message, code=grpc.StatusCode.PERMISSION_DENIED)
        if body != "server_hello":
            raise ProtocolError(f"expected ServerHello, got {body}")
        server = frame.server_hello
        self.session_id, self.domid, self.vmid, self._token = server.session_id, server.domid, server.vmid, server.token
        self._metadata = ((SESSION_METADATA_KEY, self._token),)
        self._reader = asyncio.get_running_loop().create_task(self._read_frames())

    async def _read_frames(self) -> None:
        try:
            while True:
                frame, fds = await self._fd_channel.receive()
                body = frame.WhichOneof("body")
                if body == "error":
                    for fd in fds:
                        fd.close()
                    raise ProtocolError(f"broker ended the session: {frame.error.message}")
                if body != "transfer":
                    for fd in fds:
                        fd.close()
                    raise ProtocolError(f"unexpected {body} frame from the broker")
                self._incoming.setdefault(frame.transfer.transfer_id, []).extend(fds)
                waiter = self._waiters.get(frame.transfer.transfer_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        except (ChannelClosed, ProtocolError, OSError) as exc:
            self._channel_error = exc
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(
                        BrokerClientError(errno.EPIPE, "fd channel", f"the session's fd channel is gone: {exc}",
                                          code=grpc.StatusCode.UNAVAILABLE)
                    )

    # ------------------------------------------------------------ calls

    async def call(self, method: Any, request: Message, *, timeout: float | None = None) -> Any:
        """Invoke a unary stub *method* within this session; errors become
        :class:`BrokerClientError` with the broker's errno / GNTST / status."""
        if self._closed:
            raise BrokerClientError(errno.EPIPE, "call", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)
        try:
            return await method(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    def stream(self, method: Any, request: Message) -> Any:
        """Start a server-streaming call within this session (the call object)."""
        return method(request, metadata=self._metadata)

    async def receive_fds(self, transfer_id: int, count: int, *, timeout: float = 5.0) -> list[OwnedFd]:
        """The *count* descriptors the broker sent under *transfer_id* (they are
        sent before the response that names them, so normally already here)."""
        if count == 0:
            fds = self._incoming.pop(transfer_id, [])
            if fds:
                for fd in fds:
                    fd.close()
            return []
        try:
            async with asyncio.timeout(timeout):
                while len(self._incoming.get(transfer_id, ())) < count:
                    if self._channel_error is not None:
                        raise BrokerClientError(errno.EPIPE, "fd channel", f"the session's fd channel is gone: {self._channel_error}",
                                                code=grpc.StatusCode.UNAVAILABLE)
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters[transfer_id] = waiter
                    try:
                        await waiter
                    finally:
                        self._waiters.pop(transfer_id, None)
        except TimeoutError:
            raise BrokerClientError(errno.ETIMEDOUT, "fd channel", f"descriptors of transfer {transfer_id} never arrived",
                                    code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        fds = self._incoming.pop(transfer_id)
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
        transfer_id = next(self._next_transfer)
        async with self._send_lock:
            await self._fd_channel.send(FdFrame(transfer=FdTransfer(transfer_id=transfer_id, fd_count=len(fds))), fds)
        return transfer_id

    async def describe(self) -> broker_pb2.SessionInfo:
        """This session as the broker sees it: domain, usage, capabilities."""
        return await self.call(self.broker.DescribeSession, broker_pb2.DescribeSessionRequest())

    # ------------------------------------------------------------ life

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """End the session: the broker releases everything it held.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._fd_channel.close()
        for fds in self._incoming.values():
            for fd in fds:
                fd.close()
        self._incoming.clear()
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
) -> Session:
    """Open a session with the broker at *socket_path* (default: :func:`default_socket_path`).

    *domid* / *vmid* choose the domain the session acts as; only the emulated
    backend allows it (a real host has one domain: the broker's).
    """
    path = socket_path or default_socket_path()
    try:
        fd_channel = await FdChannel.connect(fd_channel_path(path))
    except OSError as exc:
        raise BrokerClientError(exc.errno or errno.ECONNREFUSED, "connect",
                                f"no broker at {path}: {exc.strerror}", code=grpc.StatusCode.UNAVAILABLE) from None
    channel = grpc.aio.insecure_channel(f"unix:{path}")
    session = Session(path, channel, fd_channel)
    try:
        await session._hello(client_name or f"pid {os.getpid()}", domid, vmid)
    except BaseException:
        await session.close()
        raise
    return session
