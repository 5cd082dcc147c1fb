"""What the fd channel's frame handling costs per round trip, without the broker.

``python -m bench.frames [--rounds R] [--per-round N]``

The fast path's transport is the SEQPACKET floor plus protobuf framing plus
the way each end waits for frames.  This measures those layers alone, each a
request -> reply-with-a-descriptor -> mmap -> read round trip between this
process and a uvloop server process, in interleaved rounds:

* ``floor``: :mod:`bench.baselines`' ``seqpacket-async`` (raw bytes, a
  reader callback registered once on each end);
* ``callback``: the same waits, with the fast path's frames: the client
  encodes a one-grant ``MapRequest`` in an ``FdFrame{call}``, the server
  parses it and answers an ``FdFrame{reply}`` with ``fd_count=1`` — framing
  cost only;
* ``try_receive``: the same reader callbacks, each receiving with
  ``FdChannel.try_receive`` (its checks, descriptors as ``OwnedFd``);
* ``fdchannel``: both ends use :class:`~grant_broker_protocol.fdchannel.FdChannel`
  as the broker and the SDK do: the server a task looping on ``receive()``
  then ``send()``; the client a reader task looping on ``receive()`` that
  resolves the caller's future (the SDK's ``FastCalls``);
* ``fdchannel_dispatch``: as ``fdchannel``, and the server serves each call
  the way ``FastPath.start`` did before the callback reader: a semaphore
  slot, a task per call, and one ``sleep(0)`` in the frame reader after each
  call frame;
* ``reader_task``: both ends read with ``FdChannel.start_reading`` (frames
  straight from the loop's reader callback), as the broker and the SDK do
  now: the client resolves the caller's future from the callback and sends
  with ``await FdChannel.send``; the server starts a task per call frame
  (``FastPath.submit``) that answers with ``await FdChannel.send``;
* ``reader_inline``: as ``reader_task``, but the server answers from the
  reader callback itself, no task (what serving a call that never waits
  inline would cost).

No broker code runs: the differences between the rows are what each
layer costs on this machine.  Diagnostic only; ``make bench`` does not run it.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import mmap
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.baselines import PAGE, AsyncSeqpacketClient
from grant_broker_protocol.fdchannel import ChannelClosed, FdChannel
from grant_broker_protocol.v1 import gntdev_pb2
from grant_broker_protocol.v1.fdchannel_pb2 import Call, CallReply, FdFrame

MODES = ("callback", "try_receive", "fdchannel", "fdchannel_dispatch", "reader_task", "reader_inline")
_ANCILLARY = socket.CMSG_SPACE(array.array("i").itemsize)


def _memfd() -> int:
    fd = os.memfd_create("bench-frames", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE)
    os.pwrite(fd, b"\x01", 0)
    return fd


def _reply_for(payload: bytes) -> bytes:
    return _reply_to(FdFrame.FromString(payload))


def _reply_to(frame: FdFrame) -> bytes:
    gntdev_pb2.MapRequest.FromString(frame.call.request)
    response = gntdev_pb2.MapResponse(index=0)
    return FdFrame(reply=CallReply(call_id=frame.call.call_id, response=response.SerializeToString(), fd_count=1)).SerializeToString()


# --------------------------------------------------------------------------- server


def serve(path: str, mode: str) -> None:
    import uvloop

    memfd = _memfd()
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd]))]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(16)
    listener.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: None if stop.done() else stop.set_result(None))

        def on_request(conn: socket.socket) -> None:
            try:
                payload = conn.recv(65536)
            except BlockingIOError:
                return
            if not payload:
                loop.remove_reader(conn)
                conn.close()
                return
            conn.sendmsg([_reply_for(payload)], rights)

        def on_frame(channel: FdChannel, conn: socket.socket) -> None:
            try:
                received = channel.try_receive()
            except (ChannelClosed, OSError):
                loop.remove_reader(conn)
                channel.close()
                return
            if received is not None:
                conn.sendmsg([_reply_to(received[0])], rights)

        async def answer(channel: FdChannel, call: Any) -> None:
            gntdev_pb2.MapRequest.FromString(call.request)
            response = gntdev_pb2.MapResponse(index=0).SerializeToString()
            await channel.send(FdFrame(reply=CallReply(call_id=call.call_id, response=response, fd_count=1)), [memfd])

        async def frames(channel: FdChannel) -> None:
            slots = asyncio.Semaphore(256)
            try:
                while True:
                    frame, _ = await channel.receive()
                    if mode == "fdchannel":
                        await answer(channel, frame.call)
                        continue
                    await slots.acquire()
                    task = loop.create_task(answer(channel, frame.call))
                    task.add_done_callback(lambda _: slots.release())
                    await asyncio.sleep(0)
            except (ChannelClosed, OSError):
                channel.close()

        def read_calls(channel: FdChannel, conn: socket.socket) -> None:
            # The broker's way now: frames from the channel's reader callback.
            def on_call(frame: FdFrame, fds: list[Any]) -> None:
                for fd in fds:
                    fd.close()
                if mode == "reader_inline":
                    conn.sendmsg([_reply_to(frame)], rights)
                else:
                    loop.create_task(answer(channel, frame.call))

            channel.start_reading(on_call, lambda _reason: channel.close())

        def on_connect() -> None:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            if mode == "callback":
                loop.add_reader(conn, on_request, conn)
            elif mode == "try_receive":
                loop.add_reader(conn, on_frame, FdChannel(conn), conn)
            elif mode in ("reader_task", "reader_inline"):
                channel = FdChannel(conn)
                channel.max_frame_bytes = 65536
                read_calls(channel, conn)
            else:
                channel = FdChannel(conn)
                channel.max_frame_bytes = 65536
                loop.create_task(frames(channel))

        loop.add_reader(listener, on_connect)
        print("ready", flush=True)
        await stop

    uvloop.run(main())


# --------------------------------------------------------------------------- clients


def _request(call_id: int) -> bytes:
    request = gntdev_pb2.MapRequest(domids=[1], refs=[8], writable=False)
    return FdFrame(call=Call(call_id=call_id, method="/grant_broker.v1.Gntdev/Map",
                             request=request.SerializeToString())).SerializeToString()


def _first_byte(fd: int) -> int:
    try:
        with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as memory:
            return memory[0]
    finally:
        os.close(fd)


class CallbackClient:
    """Frames, with a reader callback registered once (as the floor's client)."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.connect(path)
        self._sock.setblocking(False)
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_readable(self) -> None:
        try:
            payload, ancillary, _, _ = self._sock.recvmsg(65536, _ANCILLARY)
        except BlockingIOError:
            return
        fds = array.array("i")
        for _, _, data in ancillary:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        frame = FdFrame.FromString(payload)
        waiter = self._waiters.pop(frame.reply.call_id, None)
        if waiter is None or waiter.done():
            for fd in fds:
                os.close(fd)
            return
        waiter.set_result(fds[0])

    async def round_trip(self) -> int:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self._sock, self._on_readable)
        self._ids += 1
        waiter: asyncio.Future[int] = loop.create_future()
        self._waiters[self._ids] = waiter
        self._sock.send(_request(self._ids))
        return _first_byte(await waiter)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock)
        self._sock.close()


class TryReceiveClient(CallbackClient):
    """As CallbackClient, receiving with FdChannel.try_receive."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._channel = FdChannel(self._sock)

    def _on_readable(self) -> None:
        received = self._channel.try_receive()
        if received is None:
            return
        frame, fds = received
        waiter = self._waiters.pop(frame.reply.call_id, None)
        if waiter is None or waiter.done():
            for fd in fds:
                fd.close()
            return
        waiter.set_result(fds[0].detach())


class FdChannelClient:
    """Frames through FdChannel, a reader task resolving futures (the SDK's way before the callback reader)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._ids = 0
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, path: str) -> "FdChannelClient":
        channel = await FdChannel.connect(path)
        channel.max_frame_bytes = 65536
        return cls(channel)

    async def _read(self) -> None:
        while True:
            frame, fds = await self._channel.receive()
            waiter = self._waiters.pop(frame.reply.call_id, None)
            if waiter is None or waiter.done():
                for fd in fds:
                    fd.close()
                continue
            waiter.set_result((frame, fds))

    async def round_trip(self) -> int:
        self._ids += 1
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[self._ids] = waiter
        request = gntdev_pb2.MapRequest(domids=[1], refs=[8], writable=False)
        await self._channel.send(FdFrame(call=Call(call_id=self._ids, method="/grant_broker.v1.Gntdev/Map",
                                                   request=request.SerializeToString())))
        frame, fds = await waiter
        gntdev_pb2.MapResponse.FromString(frame.reply.response)
        return _first_byte(fds[0].detach())

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
            pass
        self._channel.close()


class ReaderClient(FdChannelClient):
    """Frames through FdChannel read by ``start_reading``: the reader callback
    resolves the caller's future (the SDK's way since the callback reader)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._ids = 0
        channel.start_reading(self._on_frame, lambda _reason: None)

    def _on_frame(self, frame: FdFrame, fds: list[Any]) -> None:
        waiter = self._waiters.pop(frame.reply.call_id, None)
        if waiter is None or waiter.done():
            for fd in fds:
                fd.close()
            return
        waiter.set_result((frame, fds))

    async def close(self) -> None:
        self._channel.close()


# --------------------------------------------------------------------------- main


async def measure(workdir: Path, rounds: int, per_round: int) -> dict[str, list[float]]:
    servers = []
    try:
        for mode in ("floor", *MODES):
            path = str(workdir / f"{mode}.sock")
            argv = ([sys.executable, "-m", "bench.baselines", "seqpacket-async", path] if mode == "floor"
                    else [sys.executable, "-m", "bench.frames", "serve", path, mode])
            server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
            servers.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready", mode
        floor = AsyncSeqpacketClient(str(workdir / "floor.sock"))
        callback = CallbackClient(str(workdir / "callback.sock"))
        checked = TryReceiveClient(str(workdir / "try_receive.sock"))
        plain = await FdChannelClient.connect(str(workdir / "fdchannel.sock"))
        dispatch = await FdChannelClient.connect(str(workdir / "fdchannel_dispatch.sock"))
        reader_task = await ReaderClient.connect(str(workdir / "reader_task.sock"))
        reader_inline = await ReaderClient.connect(str(workdir / "reader_inline.sock"))
        kinds: dict[str, Callable[[], Awaitable[int]]] = {
            "floor": floor.round_trip, "callback": callback.round_trip, "try_receive": checked.round_trip,
            "fdchannel": plain.round_trip, "fdchannel_dispatch": dispatch.round_trip,
            "reader_task": reader_task.round_trip, "reader_inline": reader_inline.round_trip,
        }
        samples: dict[str, list[float]] = {name: [] for name in kinds}
        clock = time.perf_counter
        for number in range(rounds):
            for name, call in kinds.items():
                for _ in range(per_round):
                    start = clock()
                    if await call() != 1:
                        raise AssertionError(f"{name}: the page does not hold the server's byte")
                    if number:
                        samples[name].append(clock() - start)
        floor.close()
        callback.close()
        checked.close()
        await plain.close()
        await dispatch.close()
        await reader_task.close()
        await reader_inline.close()
        return samples
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        serve(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.frames", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args(argv)
    import uvloop

    workdir = Path(tempfile.mkdtemp(prefix="gb-frames-"))
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        samples = uvloop.run(measure(workdir, args.rounds, args.per_round))
    finally:
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
    floor = statistics.median(samples["floor"])
    print(f"{'round trip with a descriptor, mmap, read':<44} {'median µs':>10} {'p99 µs':>8} {'x floor':>8}")
    for name, values in samples.items():
        values.sort()
        median = statistics.median(values)
        print(f"{name:<44} {median * 1e6:>10.1f} {values[int(0.99 * (len(values) - 1))] * 1e6:>8.1f} {median / floor:>8.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
