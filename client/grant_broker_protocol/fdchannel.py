"""The session fd channel: protobuf frames and SCM_RIGHTS descriptors over SOCK_SEQPACKET.

Both the broker and the SDK speak it (see ``proto/grant_broker/v1/fdchannel.proto``).
SEQPACKET keeps message boundaries, so the descriptors of one datagram can
never be attributed to another frame — the failure stream sockets invite.
Every receive checks ``MSG_CTRUNC``/``MSG_TRUNC`` and that the number of
descriptors equals what the frame announces; any mismatch is a
:class:`ProtocolError` and the descriptors that did arrive are closed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno as _errno
import select
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.v1.fdchannel_pb2 import FdFrame, FdTransfer
from grant_broker_protocol.v1.fdchannel_pb2 import ProtocolError as ProtocolErrorFrame

PROTOCOL_VERSION = 1
MAX_FDS_PER_FRAME = 32
MAX_FRAME_BYTES = 4096
"""The largest datagram before the hello has agreed on more (and without the fast path)."""
FAST_PATH_VERSION = 2
"""The newest fast path this side speaks (see fdchannel.proto): 1, calls as
frames on the fd channel and one frame per event; 2, a session's events of
one turn in one ``Events`` frame.  Two ends speak the lower of their versions."""
FAST_PATH_EVENTS_FRAME = 2
"""The first fast-path version with the ``Events`` frame."""
FAST_PATH_FRAME_BYTES = 65536
"""The largest datagram once the fast path is agreed: a packed map of 1024 refs fits."""
_FD_SIZE = array.array("i").itemsize
# As plain ints: the socket module's are enum flags, whose `&` runs Python
# code — measurable on a path taken twice per call.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * _FD_SIZE)


class ProtocolError(Exception):
    """The peer broke the fd channel protocol (or was refused); the channel must
    be closed.  *errno* says why, for the peer (``ProtocolError.errno`` in the
    frame): EPROTO unless the refusal has a more precise reason."""

    def __init__(self, message: str, *, errno: int = _errno.EPROTO) -> None:
        super().__init__(message)
        self.errno = errno


class ChannelClosed(EOFError):
    """The peer closed the fd channel."""


class DescriptorsDropped(Exception):
    """A well-formed transfer frame arrived, but the kernel could not install all
    of its descriptors in this process (it is at its descriptor limit: the
    kernel drops the rest and flags ``MSG_CTRUNC``).  Not the peer's fault: the
    channel goes on; the descriptors that did arrive are closed."""

    def __init__(self, transfer_id: int, announced: int, received: int) -> None:
        super().__init__(f"{received} of the {announced} descriptors of transfer {transfer_id} could be received")
        self.transfer_id = transfer_id
        self.announced = announced
        self.received = received


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """``SO_PEERCRED`` of the connected peer, as the kernel recorded it at connect()."""

    pid: int
    uid: int
    gid: int


def _wake(waiter: "asyncio.Future[None]") -> None:
    # The selector may report readiness again before the woken task runs.
    if not waiter.done():
        waiter.set_result(None)


def _dropped_here(payload: bytes, received: int) -> DescriptorsDropped | None:
    """For a truncated receive: a transfer frame announcing at most
    MAX_FDS_PER_FRAME descriptors, of which fewer arrived, fitted the control
    buffer — so the kernel stopped installing them because this process ran
    out of descriptors, not because the peer sent too many."""
    frame = FdFrame()
    try:
        frame.ParseFromString(payload)
    except DecodeError:
        return None
    if frame.WhichOneof("body") != "transfer":
        return None
    announced = frame.transfer.fd_count
    if received < announced <= MAX_FDS_PER_FRAME:
        return DescriptorsDropped(frame.transfer.transfer_id, announced, received)
    return None


def _announced_fds(frame: FdFrame) -> int:
    body = frame.WhichOneof("body")
    if body == "transfer":
        return frame.transfer.fd_count
    if body == "reply":
        return frame.reply.fd_count
    return 0


class FdChannel:
    """One end of an fd channel, driven by the running asyncio loop.

    Sends and receives never block the loop: the socket is non-blocking and
    waits go through the loop's reader/writer callbacks.  One task may
    receive at a time.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("the fd channel needs a SOCK_SEQPACKET socket")
        sock.setblocking(False)
        self._sock = sock
        self._receiving = False
        self.max_frame_bytes = MAX_FRAME_BYTES
        """The largest datagram this end sends or accepts (raised by the hellos)."""
        self._on_frame: Callable[[FdFrame, list[OwnedFd]], None] | None = None
        self._on_end: Callable[[BaseException], None] | None = None
        self._on_dropped: Callable[[DescriptorsDropped], None] | None = None
        self._batch = 16
        self._reading_paused = False
        self._reset_seen = False
        self._watched: dict[str, asyncio.AbstractEventLoop] = {}
        self._dispatching = False
        self._sync_scheduled = False
        self._next_transfer = 1
        self._transfer_lock = asyncio.Lock()
        self._writable_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0) -> "FdChannel":
        """Connect to the listener at *path*.

        An AF_UNIX connect never completes later: it succeeds at once or, on
        a non-blocking socket whose listener's backlog is full, fails with
        EAGAIN — which ``loop.sock_connect`` mistakes for "in progress",
        leaving a socket that is not connected (ENOTCONN on the first send).
        So a full backlog (a thousand clients reconnecting at once after a
        broker restart) is retried here until *timeout*."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            deadline = asyncio.get_running_loop().time() + timeout
            pause = 0.001
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:
                    if asyncio.get_running_loop().time() + pause > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.05)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def peer_credentials(self) -> PeerCredentials:
        raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCredentials(pid, uid, gid)

    async def send(self, frame: FdFrame, fds: Sequence[int] = ()) -> None:
        """Send *frame* with *fds* (borrowed: the caller still owns and closes them)."""
        if len(fds) > MAX_FDS_PER_FRAME:
            raise ValueError(f"{len(fds)} descriptors in one frame; at most {MAX_FDS_PER_FRAME}")
        if len(fds) != _announced_fds(frame):
            raise ValueError(f"frame announces {_announced_fds(frame)} descriptors but {len(fds)} are attached")
        payload = frame.SerializeToString()
        if len(payload) > self.max_frame_bytes:
            raise ValueError(f"frame of {len(payload)} bytes exceeds {self.max_frame_bytes}")
        ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                self._sock.sendmsg([payload], ancillary)
                return
            except BlockingIOError:
                # One waiter at a time: a second add_writer on the socket would
                # silently replace the first one's callback.
                async with self._writable_lock:
                    await self._writable()

    async def _writable(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._watch("writer", _wake, waiter)
        try:
            await waiter
        finally:
            self._unwatch("writer")

    def _watch(self, kind: str, callback: Callable[..., None], *args: Any) -> None:
        loop = asyncio.get_running_loop()
        if kind == "reader":
            loop.add_reader(self._sock, callback, *args)
        else:
            loop.add_writer(self._sock, callback, *args)
        self._watched[kind] = loop

    def _unwatch(self, kind: str) -> None:
        # Every registration is undone before the socket closes (see close()):
        # the loop keys them by descriptor number, and one left behind would
        # belong to whatever socket is given that number next.
        loop = self._watched.pop(kind, None)
        if loop is None or loop.is_closed() or self.closed:
            return
        if kind == "reader":
            loop.remove_reader(self._sock)
        else:
            loop.remove_writer(self._sock)

    async def send_transfer(self, fds: Sequence[int]) -> int:
        """Send *fds* (borrowed) as one transfer under a new id, and return the
        id for the message that names them.  More than MAX_FDS_PER_FRAME go
        as several frames under the same id, in order; none at all as one
        empty frame (the peer still learns the id)."""
        transfer_id = self._next_transfer
        self._next_transfer += 1
        chunks = [fds[i : i + MAX_FDS_PER_FRAME] for i in range(0, len(fds), MAX_FDS_PER_FRAME)] or [[]]
        # One transfer's frames must not interleave with another's.
        async with self._transfer_lock:
            for chunk in chunks:
                await self.send(FdFrame(transfer=FdTransfer(transfer_id=transfer_id, fd_count=len(chunk))), chunk)
        return transfer_id

    def try_receive(self, *, accept_fds: bool = True) -> tuple[FdFrame, list[OwnedFd]] | None:
        """Receive one frame if one is queued, else ``None``; never blocks.

        With ``accept_fds=False`` no control buffer is offered: descriptors
        attached to the frame are never installed in this process (the kernel
        drops them and flags ``MSG_CTRUNC``), and the frame is refused."""
        try:
            payload, ancillary, flags, _ = self._sock.recvmsg(self.max_frame_bytes, _ANCILLARY_SPACE if accept_fds else 0)
        except BlockingIOError:
            return None
        fds: list[OwnedFd] = []
        for level, kind, data in ancillary:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
                fds.extend(OwnedFd(fd) for fd in received)
        try:
            if not payload and not ancillary and not flags & _MSG_CTRUNC:
                raise ChannelClosed("the peer closed the fd channel")
            if flags & _MSG_CTRUNC:
                if not accept_fds:
                    raise ProtocolError("descriptors sent where none are accepted (they were dropped unopened)")
                dropped = _dropped_here(payload, len(fds))
                if dropped is not None:
                    raise dropped
                raise ProtocolError("descriptors were truncated (MSG_CTRUNC): too many in one frame")
            if flags & _MSG_TRUNC:
                raise ProtocolError(f"frame larger than {self.max_frame_bytes} bytes")
            frame = FdFrame()
            try:
                frame.ParseFromString(payload)
            except DecodeError as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            if frame.WhichOneof("body") is None:
                raise ProtocolError("empty or unknown frame")
            if len(fds) != _announced_fds(frame):
                raise ProtocolError(
                    f"frame announces {_announced_fds(frame)} descriptors but {len(fds)} arrived"
                )
        except BaseException:
            for fd in fds:
                fd.close()
            raise
        return frame, fds

    async def receive(self, *, accept_fds: bool = True) -> tuple[FdFrame, list[OwnedFd]]:
        """Wait for the next frame (see :meth:`try_receive` for *accept_fds*).

        Raises:
            ChannelClosed: the peer closed the channel.
            ProtocolError: the frame broke the protocol (its descriptors are closed).
        """
        if self._receiving:
            raise RuntimeError("another task is already receiving on this fd channel")
        self._receiving = True
        loop = asyncio.get_running_loop()
        reset = False
        try:
            while True:
                try:
                    received = self.try_receive(accept_fds=accept_fds)
                except ConnectionResetError:
                    # The peer closed with frames of ours unread.  Linux reports
                    # that first (once) and then still delivers what the peer
                    # sent before closing — typically the ProtocolError frame
                    # saying why — so read on to the end.
                    if reset:
                        raise ChannelClosed("the peer reset the fd channel") from None
                    reset = True
                    continue
                if received is not None:
                    return received
                waiter = loop.create_future()
                self._watch("reader", _wake, waiter)
                try:
                    await waiter
                finally:
                    self._unwatch("reader")
        finally:
            self._receiving = False

    def send_nowait(self, frame: FdFrame) -> bool:
        """Send *frame* (no descriptors) if the socket takes it at once; never
        waits.  Whether it was sent."""
        try:
            self._sock.send(frame.SerializeToString(), socket.MSG_DONTWAIT)
        except (OSError, ValueError):
            return False
        return True

    def send_error_nowait(self, message: str, code: int) -> None:
        """Tell the peer why the channel ends (a ``ProtocolError`` frame), if the
        socket takes it at once; never waits, never raises: the channel is
        being given up anyway."""
        frame = FdFrame(error=ProtocolErrorFrame(message=message, errno=code))
        with contextlib.suppress(OSError, ValueError):
            self._sock.send(frame.SerializeToString(), socket.MSG_DONTWAIT)

    def hung_up(self) -> bool:
        """Whether the peer is gone, asked of the kernel now (one non-blocking
        ``poll``), not when a reader gets to the hang-up."""
        fd = self._sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, _HUNG_UP)
        return bool(poller.poll(0))

    # ------------------------------------------------------------ reading by callback

    def start_reading(
        self,
        on_frame: Callable[[FdFrame, list[OwnedFd]], None],
        on_end: Callable[[BaseException], None],
        *,
        on_dropped: Callable[[DescriptorsDropped], None] | None = None,
        batch: int = 16,
    ) -> None:
        """Hand every frame, with its descriptors (now the callee's), to
        *on_frame* straight from the loop's reader callback — no task, no
        future per frame — at most *batch* frames a turn of the loop, so that
        one busy channel cannot keep the others waiting.

        *on_end* is called once, with why reading ended: ChannelClosed,
        ProtocolError, OSError, or what *on_frame* raised.  *on_dropped*
        gets a transfer whose descriptors could not be received (without it,
        that ends the reading too).  Not to be mixed with :meth:`receive`.
        """
        if self._on_frame is not None:
            raise RuntimeError("this fd channel is already being read")
        self._on_frame, self._on_end, self._on_dropped, self._batch = on_frame, on_end, on_dropped, batch
        self._reading_paused = False
        self._reset_seen = False
        self._watch("reader", self._on_readable)

    def pause_reading(self) -> None:
        """Stop taking frames (they wait in the socket) until :meth:`resume_reading`."""
        if self._on_frame is not None and not self._reading_paused:
            self._reading_paused = True
            self._sync_reader()

    def resume_reading(self) -> None:
        if self._on_frame is not None and self._reading_paused and not self.closed:
            self._reading_paused = False
            self._sync_reader()

    def _sync_reader(self) -> None:
        """Register the reader callback exactly while frames are wanted.  Never
        from inside the callback itself: the loop would drop the registration
        it is dispatching and re-create it for the same descriptor, which
        uvloop can leave deaf to a later hang-up; the change is made on the
        loop's next turn instead."""
        if self._dispatching:
            if not self._sync_scheduled:
                self._sync_scheduled = True
                asyncio.get_running_loop().call_soon(self._sync_reader_now)
            return
        self._sync_reader_now()

    def _rearm_reader(self) -> None:
        if "reader" in self._watched:
            self._unwatch("reader")
        self._sync_reader_now()

    def _sync_reader_now(self) -> None:
        self._sync_scheduled = False
        wanted = self._on_frame is not None and not self._reading_paused and not self.closed
        if wanted and "reader" not in self._watched:
            self._watch("reader", self._on_readable)
        elif not wanted and "reader" in self._watched:
            self._unwatch("reader")

    def stop_reading(self) -> None:
        """Stop for good; *on_end* is not called."""
        if self._on_frame is not None:
            self._on_frame = None
            self._sync_reader()

    def _on_readable(self) -> None:
        self._dispatching = True
        try:
            self._dispatch_frames()
        finally:
            self._dispatching = False

    def _dispatch_frames(self) -> None:
        on_frame = self._on_frame
        for _ in range(self._batch):
            if on_frame is not self._on_frame or self._reading_paused:
                return  # stopped or paused by a callee
            assert on_frame is not None
            try:
                received = self.try_receive()
            except ConnectionResetError:
                # The peer closed with frames of ours unread.  Linux reports
                # that first (once) and then still delivers what the peer sent
                # before closing — typically the ProtocolError frame saying why.
                if self._reset_seen:
                    self._reading_ended(ChannelClosed("the peer reset the fd channel"))
                    return
                self._reset_seen = True
                # The socket's error (POLLERR) made libuv stop polling it
                # without telling the loop: register the reader afresh, or
                # what is left in the socket — and its end — is never read.
                asyncio.get_running_loop().call_soon(self._rearm_reader)
                continue
            except DescriptorsDropped as exc:
                if self._on_dropped is None:
                    self._reading_ended(exc)
                    return
                self._on_dropped(exc)
                continue
            except (ChannelClosed, ProtocolError, OSError) as exc:
                self._reading_ended(exc)
                return
            if received is None:
                return
            try:
                on_frame(*received)
            except Exception as exc:  # noqa: BLE001 - handed to on_end, which decides
                self._reading_ended(exc)
                return

    def _reading_ended(self, reason: BaseException) -> None:
        on_end = self._on_end
        self.stop_reading()
        if on_end is not None:
            self._on_end = None
            on_end(reason)

    def close(self) -> None:
        self._on_frame = None
        self._unwatch("reader")
        self._unwatch("writer")
        self._sock.close()

    def shutdown(self) -> None:
        """End the connection both ways without closing the descriptor: the
        peer sees the channel end, and so does this side's reader (its
        *on_end* gets ChannelClosed), as when the peer goes away.  Whoever
        reads the channel then tears it down by its usual path."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL
