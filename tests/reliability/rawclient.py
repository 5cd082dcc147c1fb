"""A client without the SDK, for feeding the broker what the SDK never would.

Synchronous on purpose (hypothesis drives it example by example): a raw fd
channel socket to write any bytes and descriptors to, and a synchronous gRPC
channel with any session metadata.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from grant_broker_protocol.fdchannel import MAX_FRAME_BYTES
from grant_broker_protocol.v1 import (
    broker_pb2_grpc,
    evtchn_pb2_grpc,
    gntalloc_pb2_grpc,
    gntdev_pb2_grpc,
    membuf_pb2_grpc,
)
from grant_broker_protocol.v1.fdchannel_pb2 import ClientHello, FdFrame, FdTransfer

SESSION_KEY = "x-grant-broker-session"

STUBS = {
    "Broker": broker_pb2_grpc.BrokerStub,
    "Gntdev": gntdev_pb2_grpc.GntdevStub,
    "Gntalloc": gntalloc_pb2_grpc.GntallocStub,
    "Evtchn": evtchn_pb2_grpc.EvtchnStub,
    "MemBuf": membuf_pb2_grpc.MemBufStub,
}


class RawChannel:
    """The fd channel as a bare SOCK_SEQPACKET socket."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        self.sock.connect(socket_path + ".fds")

    def send(self, payload: bytes | FdFrame, fds: Sequence[int] = ()) -> None:
        data = payload.SerializeToString() if isinstance(payload, FdFrame) else payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], ancillary)

    def receive(self, timeout: float = 10) -> FdFrame | None:
        """The broker's next frame, or ``None`` once it closed the channel."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(MAX_FRAME_BYTES, socket.CMSG_SPACE(64 * 4))
        except ConnectionResetError:
            # The broker closed with frames of ours unread: Linux says so
            # once, then delivers what the broker sent before closing.
            try:
                data, ancillary, _, _ = self.sock.recvmsg(MAX_FRAME_BYTES, socket.CMSG_SPACE(64 * 4))
            except ConnectionResetError:
                return None
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(raw[: len(raw) - len(raw) % 4])
                for fd in received:
                    os.close(fd)
        if not data:
            return None
        return FdFrame.FromString(data)

    def hello(self, domid: int | None = None, **fields) -> FdFrame | None:  # type: ignore[no-untyped-def]
        hello = ClientHello(protocol_version=1, client_name="raw", **fields)
        if domid is not None:
            hello.domid = domid
        self.send(FdFrame(client_hello=hello))
        return self.receive()

    def close(self) -> None:
        self.sock.close()


@dataclass
class RawSession:
    """An authenticated raw fd channel and its token."""

    channel: RawChannel
    token: str
    session_id: int

    @classmethod
    def open(cls, socket_path: str, domid: int | None = None) -> "RawSession":
        channel = RawChannel(socket_path)
        reply = channel.hello(domid)
        assert reply is not None and reply.WhichOneof("body") == "server_hello", reply
        return cls(channel, reply.server_hello.token, reply.server_hello.session_id)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SESSION_KEY, self.token),)

    def send_fds(self, transfer_id: int, fds: Sequence[int]) -> None:
        self.channel.send(FdFrame(transfer=FdTransfer(transfer_id=transfer_id, fd_count=len(fds))), fds)

    def close(self) -> None:
        self.channel.close()


# --------------------------------------------------------------------------- descriptors of every kind

FD_KINDS = ("memfd", "sealed-memfd", "pipe", "socket", "directory", "devnull", "eventfd", "regular-file", "seqpacket")


@contextlib.contextmanager
def descriptors(kinds: Sequence[str]) -> Iterator[list[int]]:
    """One open descriptor of each kind in *kinds* (all closed on exit): what a
    hostile client could send where a memfd is expected."""
    given: list[int] = []
    extra: list[int] = []  # the other ends of pipes and socket pairs
    try:
        for kind in kinds:
            if kind in ("memfd", "sealed-memfd"):
                fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, 8192)
                if kind == "sealed-memfd":
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
                given.append(fd)
            elif kind == "pipe":
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                given.append(read_end)
                extra.append(write_end)
            elif kind in ("socket", "seqpacket"):
                kind_ = socket.SOCK_STREAM if kind == "socket" else socket.SOCK_SEQPACKET
                one, two = socket.socketpair(socket.AF_UNIX, kind_)
                given.append(one.detach())
                extra.append(two.detach())
            elif kind == "directory":
                given.append(os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            elif kind == "devnull":
                given.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
            elif kind == "eventfd":
                given.append(os.eventfd(0, os.EFD_CLOEXEC))
            elif kind == "regular-file":
                given.append(os.open(__file__, os.O_RDONLY | os.O_CLOEXEC))
            else:
                raise ValueError(kind)
        yield list(given)
    finally:
        for fd in given + extra:
            os.close(fd)


def grpc_channel(socket_path: str) -> grpc.Channel:
    return grpc.insecure_channel(
        f"unix:{socket_path}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
