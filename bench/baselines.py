"""The floors the broker is measured against, each served by a process of its own.

* ``grpc-echo``: a bare ``grpc.aio`` server on uvloop (as the broker runs) with
  one unary method that answers the request bytes.  No protobuf, no servicer
  code: what is left is the transport — the least any broker call can cost.
* ``seqpacket``: a blocking SOCK_SEQPACKET server that answers each request
  datagram with a small reply carrying a descriptor by SCM_RIGHTS (a one-page
  memfd): the least a "give me an fd" exchange between two processes can cost.
* ``seqpacket-async``: the same exchange served by a uvloop event loop — one
  reader callback per connection (``loop.add_reader``), registered once, that
  receives the request and answers with ``sendmsg`` + SCM_RIGHTS; its client
  (:class:`AsyncSeqpacketClient`) awaits a future woken by a reader callback
  of its own loop.  No task, no protobuf, no per-call registration: the least
  any asyncio server and client can pay for one round trip with a descriptor.
* :func:`memcpy_seconds`: a copy between two shared mappings in this process,
  for grant-copy bandwidth.

Run a server with ``python -m bench.baselines {grpc-echo|seqpacket|seqpacket-async} SOCKET``;
it prints ``ready`` on stdout once it listens and serves until SIGTERM.
The client halves live here too, so that the benchmark and the server agree.
"""

from __future__ import annotations

import array
import asyncio
import mmap
import os
import signal
import socket
import sys
import threading
import time

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
SEQPACKET_REPLY = b"fd"
PAGE = mmap.PAGESIZE


# --------------------------------------------------------------------------- servers


async def _serve_grpc_echo(path: str) -> None:
    import grpc

    async def echo(request: bytes, context: object) -> bytes:
        return request

    # The broker's own server options, so the floor is the same server.
    try:
        from grant_broker.daemon.server import SERVER_OPTIONS as options
    except ImportError:  # a broker from before SERVER_OPTIONS
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.max_concurrent_streams", 100_000)]
    server = grpc.aio.server(options=list(options))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),)
    )
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(0)


def serve_grpc_echo(path: str) -> None:
    import asyncio

    import uvloop

    async def main() -> None:
        task = asyncio.ensure_future(_serve_grpc_echo(path))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    uvloop.run(main())


def serve_seqpacket(path: str) -> None:
    """One thread per connection, blocking calls: nothing between the kernel and the reply."""
    memfd = os.memfd_create("bench-seqpacket", os.MFD_CLOEXEC)
    os.ftruncate(memfd, PAGE)
    os.pwrite(memfd, b"\x01", 0)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd]))]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = conn.recv(4096)
                except OSError:
                    return
                if not request:
                    return
                conn.sendmsg([SEQPACKET_REPLY], rights)

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def serve_seqpacket_async(path: str) -> None:
    """The SCM_RIGHTS exchange on a uvloop loop: a reader callback per
    connection, one ``recv`` and one ``sendmsg`` per request."""
    import uvloop

    memfd = os.memfd_create("bench-seqpacket-async", os.MFD_CLOEXEC)
    os.ftruncate(memfd, PAGE)
    os.pwrite(memfd, b"\x01", 0)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd]))]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(16)
    listener.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()

        def terminate() -> None:
            if not stop.done():
                stop.set_result(None)

        loop.add_signal_handler(signal.SIGTERM, terminate)

        def on_request(conn: socket.socket) -> None:
            try:
                request = conn.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                request = b""
            if not request:
                loop.remove_reader(conn)
                conn.close()
                return
            # One request in flight per client: the reply always fits the socket buffer.
            conn.sendmsg([SEQPACKET_REPLY], rights)

        def on_connect() -> None:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            loop.add_reader(conn, on_request, conn)

        loop.add_reader(listener, on_connect)
        print("ready", flush=True)
        await stop

    uvloop.run(main())


# --------------------------------------------------------------------------- clients


class SeqpacketClient:
    """The client half of the SCM_RIGHTS floor: request, receive the fd, mmap it,
    read the first byte, let go — the same steps as a broker map round trip."""

    _ANCILLARY = socket.CMSG_SPACE(array.array("i").itemsize)

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.connect(path)

    def round_trip(self) -> int:
        self._sock.send(b"map")
        _, ancillary, flags, _ = self._sock.recvmsg(64, self._ANCILLARY)
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if len(fds) != 1 or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"seqpacket floor: expected one descriptor, got {len(fds)}")
        try:
            with mmap.mmap(fds[0], PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as memory:
                return memory[0]
        finally:
            os.close(fds[0])

    def close(self) -> None:
        self._sock.close()


def _one_descriptor(ancillary: list[tuple[int, int, bytes]], flags: int) -> int:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"seqpacket floor: expected one descriptor, got {len(fds)}")
    return fds[0]


def _read_first_byte(fd: int) -> int:
    try:
        with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as memory:
            return memory[0]
    finally:
        os.close(fd)


class AsyncSeqpacketClient:
    """The client half of the asyncio floor: send the request, await a future
    that a reader callback (registered once on the running loop) resolves
    with the reply's descriptor, then mmap it and read the first byte — the
    steps of :class:`SeqpacketClient`, with the waits an asyncio client has."""

    _ANCILLARY = socket.CMSG_SPACE(array.array("i").itemsize)

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.connect(path)
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[int] | None = None

    def _on_readable(self) -> None:
        try:
            payload, ancillary, flags, _ = self._sock.recvmsg(64, self._ANCILLARY)
        except BlockingIOError:
            return
        waiter, self._waiter = self._waiter, None
        try:
            if not payload and not ancillary:
                raise ConnectionResetError("the seqpacket-async server hung up")
            fd = _one_descriptor(ancillary, flags)
        except Exception as exc:  # noqa: BLE001 - given to the waiting round trip
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            else:
                assert self._loop is not None
                self._loop.remove_reader(self._sock)
            return
        if waiter is None or waiter.done():
            os.close(fd)
            return
        waiter.set_result(fd)

    async def round_trip(self) -> int:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self._sock, self._on_readable)
        waiter: asyncio.Future[int] = loop.create_future()
        self._waiter = waiter
        self._sock.send(b"map")
        return _read_first_byte(await waiter)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock)
        self._sock.close()


def memcpy_seconds(size: int, repeat: int) -> list[float]:
    """Seconds per copy of *size* bytes between two shared memfd mappings (the
    kinds of memory grant copy moves between), *repeat* times after a warm-up."""
    fds = [os.memfd_create("bench-memcpy", os.MFD_CLOEXEC) for _ in range(2)]
    try:
        for fd in fds:
            os.ftruncate(fd, size)
        src_map, dst_map = (mmap.mmap(fd, size, mmap.MAP_SHARED) for fd in fds)
        src, dst = memoryview(src_map), memoryview(dst_map)
        try:
            src[:] = os.urandom(size)
            for _ in range(max(3, repeat // 10)):
                dst[:] = src
            samples = []
            clock = time.perf_counter
            for _ in range(repeat):
                start = clock()
                dst[:] = src
                samples.append(clock() - start)
            if dst[size - 1] != src[size - 1]:
                raise AssertionError("memcpy baseline copied nothing")
            return samples
        finally:
            src.release()
            dst.release()
            src_map.close()
            dst_map.close()
    finally:
        for fd in fds:
            os.close(fd)


def main(argv: list[str]) -> int:
    servers = {"grpc-echo": serve_grpc_echo, "seqpacket": serve_seqpacket, "seqpacket-async": serve_seqpacket_async}
    if len(argv) != 2 or argv[0] not in servers:
        print(f"usage: python -m bench.baselines {{{'|'.join(servers)}}} SOCKET", file=sys.stderr)
        return 2
    kind, path = argv
    servers[kind](path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
