"""Security: who may connect, when descriptors are accepted, what a token is worth, and isolation.

What the broker guarantees (README "Guarantees"), each checked here:

* The sockets are mode 0660: another user cannot connect to either; a member
  of the socket's group can.
* No descriptor of an unauthenticated peer is ever installed in the broker:
  the hello is read without a control buffer (the kernel drops descriptors
  attached to it unopened), and a peer refused by the policy is disconnected
  before anything after its hello is read.
* A session token is a 256-bit secret handed only to the SO_PEERCRED-checked
  peer of the fd channel, never shown by Status, DescribeSession or the log,
  and dead the moment that fd channel is gone — checked on every call, not
  when the broker gets round to reading the hang-up.  (gRPC over a Unix
  socket carries no peer credentials, so while the session lives the token
  is a bearer capability: a process the owner gives it to can use it.)
* A session cannot touch another session's mappings, allocations, ports,
  subscriptions, copy buffers, dma-bufs or pending descriptors — not even a
  session of the same domain.
"""

from __future__ import annotations

import array
import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

import grant_broker_client
import grant_broker_protocol.fdchannel as fdchannel_module
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.daemon.server import BrokerServer
from grant_broker.core.policy import Policy
from grant_broker_protocol.endpoints import SESSION_METADATA_KEY
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc, common_pb2, gntdev_pb2, gntdev_pb2_grpc
from grant_broker_protocol.v1.fdchannel_pb2 import ClientHello, FdFrame, FdTransfer
from grant_broker_client import BrokerClientError

from .conftest import Daemon, start_daemon, stop_daemon
from .rawclient import RawChannel, descriptors

NOBODY = 65534
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or SYSTEM_PYTHON is None, reason="needs root and a system python3 to act as another user")

HELLO = FdFrame(client_hello=ClientHello(protocol_version=1, client_name="stranger")).SerializeToString()
TRANSFER = FdFrame(transfer=FdTransfer(transfer_id=1, fd_count=2)).SerializeToString()

# Runs as another user, with the standard library only (the project's venv
# lives under /root): tries both sockets, says hello with or without
# descriptors, sends a transfer frame, and reports what happened as JSON.
STRANGER = textwrap.dedent(
    """
    import array, errno, json, os, socket, sys
    path, hello, transfer, attach = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4]
    out = {"uid": os.getuid()}
    grpc_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        grpc_sock.connect(path)
        out["grpc"] = "connected"
    except OSError as exc:
        out["grpc"] = errno.errorcode[exc.errno]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    try:
        sock.connect(path + ".fds")
    except OSError as exc:
        out["fds"] = errno.errorcode[exc.errno]
    else:
        out["fds"] = "connected"
        read_end, write_end = os.pipe()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read_end, write_end]))]
        sock.sendmsg([hello], rights if attach == "hello" else [])
        if attach == "after":
            try:
                sock.sendmsg([transfer], rights)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused already: the broker closed before this frame
        try:
            reply = sock.recv(4096)
        except ConnectionResetError:
            reply = sock.recv(4096)
        out["reply"] = reply.hex()
    print(json.dumps(out), flush=True)
    """
)


async def run_stranger(socket_path: str, attach: str, *, groups: tuple[int, ...] = ()) -> dict:  # type: ignore[type-arg]
    assert SYSTEM_PYTHON is not None
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-I", "-c", STRANGER, socket_path, HELLO.hex(), TRANSFER.hex(), attach,
        user=NOBODY, group=NOBODY, extra_groups=list(groups), cwd="/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    if "reply" in result:
        result["frame"] = FdFrame.FromString(bytes.fromhex(result["reply"])) if result["reply"] else None
    return result


@pytest.fixture
def open_dir(short_tmp: Path) -> Path:
    short_tmp.chmod(0o755)  # only the sockets' own mode decides
    return short_tmp


class Recorder:
    """Counts descriptors the fd channel code takes ownership of (i.e. received)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.received: list[int] = []
        recorder = self

        class RecordingOwnedFd(OwnedFd):
            __slots__ = ()

            def __init__(self, fd: int) -> None:
                recorder.received.append(fd)
                super().__init__(fd)

        monkeypatch.setattr(fdchannel_module, "OwnedFd", RecordingOwnedFd)


# --------------------------------------------------------------------------- who may connect


@needs_root
async def test_the_sockets_keep_other_users_out_and_let_the_group_in(open_dir: Path) -> None:
    daemon = start_daemon(str(open_dir / "broker.sock"))
    try:
        for path in (daemon.socket_path, daemon.socket_path + ".fds"):
            assert os.stat(path).st_mode & 0o777 == 0o660
        outsider = await run_stranger(daemon.socket_path, "none")
        assert (outsider["grpc"], outsider["fds"]) == ("EACCES", "EACCES"), outsider
        member = await run_stranger(daemon.socket_path, "none", groups=(os.stat(daemon.socket_path).st_gid,))
        assert (member["grpc"], member["fds"]) == ("connected", "connected"), member
        assert member["frame"].WhichOneof("body") == "server_hello"
    finally:
        stop_daemon(daemon)


# --------------------------------------------------------------------------- descriptors before authentication


async def test_descriptors_sent_with_the_hello_are_never_installed(
    in_process: tuple[str, BrokerServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, server = in_process
    recorder = Recorder(monkeypatch)
    loop = asyncio.get_running_loop()
    for kinds in (["pipe"] * 2, ["memfd"] * 32, ["socket", "directory", "devnull"]):
        channel = RawChannel(path)
        try:
            with descriptors(kinds) as fds:
                channel.send(FdFrame.FromString(HELLO), fds)
            reply = await loop.run_in_executor(None, channel.receive)
            assert reply is not None and reply.WhichOneof("body") == "error"
            assert reply.error.errno == errno.EPROTO and "before the session was authenticated" in reply.error.message
        finally:
            channel.close()
    assert recorder.received == [], "the broker installed descriptors of a peer it had not authenticated"
    assert server.registry is not None and server.registry.sessions == []


@needs_root
async def test_a_peer_the_policy_refuses_never_gets_a_descriptor_in(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grant_broker.daemon.server import ServerConfig

    config = ServerConfig(
        socket_path=str(open_dir / "broker.sock"), backend="emulated", grace_seconds=0, socket_mode=0o666,
        policy=Policy(allowed_uids=frozenset({4242})),
    )
    async with BrokerServer(config) as server:
        recorder = Recorder(monkeypatch)
        # Descriptors with the hello, or right behind it (sent before the refusal could arrive).
        for attach in ("hello", "after"):
            result = await run_stranger(config.socket_path, attach)
            frame = result["frame"]
            assert frame is not None and frame.WhichOneof("body") == "error", result
            expected = errno.EPROTO if attach == "hello" else errno.EPERM
            assert frame.error.errno == expected, frame
        assert recorder.received == []
        assert server.registry is not None and server.registry.sessions == []
        # Root is always admitted: the same broker serves it.
        async with await grant_broker_client.connect(config.socket_path) as session:
            assert session.session_id > 0


async def test_a_refused_client_is_told_why_by_its_errno(in_process: tuple[str, BrokerServer]) -> None:
    path, _ = in_process
    with pytest.raises(BrokerClientError) as raised:
        await grant_broker_client.connect(path, domid=0x7FF0)
    assert (raised.value.code, raised.value.errno) == (grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)


# --------------------------------------------------------------------------- tokens


async def test_a_token_dies_with_its_fd_channel_at_once(in_process: tuple[str, BrokerServer]) -> None:
    path, server = in_process
    registry = server.registry
    assert registry is not None
    channel = RawChannel(path)
    reply = await asyncio.get_running_loop().run_in_executor(None, channel.hello)
    assert reply is not None
    token = reply.server_hello.token

    assert registry.lookup(token).token == token
    channel.close()
    # No await in between: the broker's reader has not seen the hang-up yet,
    # and still the token is refused.
    assert not registry.sessions[0].closed.is_set()
    with pytest.raises(BrokerError) as raised:
        registry.lookup(token)
    assert raised.value.errno == errno.EPERM


KILLED_CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import grant_broker_client

    async def main():
        session = await grant_broker_client.connect(sys.argv[1], domid=1)
        print(session._token, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_the_token_of_a_killed_client_is_refused_right_after_its_death(daemon: Daemon) -> None:
    async with grpc.aio.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        for _ in range(5):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", KILLED_CLIENT, daemon.socket_path, stdout=asyncio.subprocess.PIPE
            )
            assert process.stdout is not None
            token = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
            metadata = ((SESSION_METADATA_KEY, token),)
            assert (await stub.DescribeSession(broker_pb2.DescribeSessionRequest(), metadata=metadata)).domid == 1
            process.send_signal(signal.SIGKILL)
            await process.wait()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.DescribeSession(broker_pb2.DescribeSessionRequest(), metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tokens_are_unguessable_and_never_shown(daemon: Daemon) -> None:
    sessions = await asyncio.gather(*(grant_broker_client.connect(daemon.socket_path, domid=1 + n % 4) for n in range(200)))
    try:
        tokens = {session._token for session in sessions}
        assert len(tokens) == 200 and min(len(t) for t in tokens) >= 43  # 32 random bytes, base64url
        status = await daemon.status()
        described = await sessions[0].describe()
        shown = str(status) + str(described) + daemon.log()
        assert not [t for t in tokens if t in shown]
    finally:
        await asyncio.gather(*(session.close() for session in sessions))


# --------------------------------------------------------------------------- isolation


async def expect_refused(call, code: grpc.StatusCode, errno_: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BrokerClientError) as raised:
        await call
    assert (raised.value.code, raised.value.errno) == (code, errno_), str(raised.value)


@pytest.fixture
def quick_daemon(short_tmp: Path):  # type: ignore[no-untyped-def]
    # A call naming a transfer that never comes waits 0.5 s, not 5.
    daemon = start_daemon(str(short_tmp / "broker.sock"), options={"limits": {"fd_frame_wait_seconds": 0.5}})
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


@pytest.mark.parametrize("intruder_domid", [2, 9], ids=["same-domain", "other-domain"])
async def test_a_session_cannot_touch_another_sessions_things(quick_daemon: Daemon, intruder_domid: int) -> None:
    from grant_broker_client.gntdev import CopySegment, Foreign, Local

    path = quick_daemon.socket_path
    async with await grant_broker_client.connect(path, domid=1) as sharer, \
            await grant_broker_client.connect(path, domid=2) as owner, \
            await grant_broker_client.connect(path, domid=intruder_domid) as intruder:
        pages = await sharer.gntalloc.share(2, 2)
        pages.view[0:5] = b"owner"
        mapping = await owner.gntdev.map([(1, pages.refs[0])])
        own_share = await owner.gntalloc.share(1, 1)
        offered = await sharer.evtchn.bind_unbound_port(2)
        port = await owner.evtchn.bind_interdomain(1, offered)
        buffer = await owner.gntdev.copy_buffer(4096)
        whole = await sharer.gntalloc.share(2, 1)  # a dma-buf export takes a whole allocation (emulated)
        exported = await owner.gntdev.dmabuf_export(1, list(whole.refs))
        with descriptors(["sealed-memfd"]) as fds:
            pending = await owner.send_fds(fds)  # a frame waiting in the broker for owner's next call
        NOT_FOUND, INVALID, PRECONDITION = (
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
        )
        gntdev = gntdev_pb2_grpc.GntdevStub(intruder.grpc_channel)

        # Mappings: the intruder's indexes are its own.
        await expect_refused(intruder.gntdev.unmap_grant_ref(mapping.index, 1), NOT_FOUND, errno.ENOENT)
        await expect_refused(intruder.call(gntdev.MapMemory, gntdev_pb2.MapMemoryRequest(index=mapping.index, count=1)), INVALID, errno.EINVAL)
        await expect_refused(intruder.gntdev.set_unmap_notify(mapping.index, 0x1), NOT_FOUND, errno.ENOENT)
        # Allocations.
        await expect_refused(intruder.gntalloc.dealloc_gref(own_share.index, 1), INVALID, errno.EINVAL)
        # Ports and their events.
        for call in (intruder.evtchn.notify(port), intruder.evtchn.unmask(port), intruder.evtchn.unbind(port),
                     intruder.evtchn.subscribe([port])):
            await expect_refused(call, PRECONDITION, errno.ENOTCONN)
        await expect_refused(intruder.gntdev.set_unmap_notify(0, 0x2, port), INVALID, errno.EINVAL)
        # Copy buffers and dma-bufs, by their ids.
        await expect_refused(intruder.call(gntdev.UnregisterCopyBuffer, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=buffer.buffer_id)), NOT_FOUND, errno.ENOENT)
        forged = Local.__new__(Local)
        object.__setattr__(forged, "buffer", buffer)
        object.__setattr__(forged, "offset", 0)
        await expect_refused(intruder.gntdev.grant_copy([CopySegment(Foreign(1, pages.refs[0]), forged, 4)]), INVALID, errno.EINVAL)
        await expect_refused(intruder.gntdev.dmabuf_wait_released(exported.dmabuf_id, 0), NOT_FOUND, errno.ENOENT)
        await expect_refused(intruder.gntdev.dmabuf_import_release(exported.dmabuf_id), NOT_FOUND, errno.ENOENT)
        # Descriptors the owner sent: another session cannot claim them.
        claim = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=pending, fd=common_pb2.FdRef(index=0), length=4096)
        await expect_refused(intruder.call(gntdev.RegisterCopyBuffer, claim, timeout=30), INVALID, errno.EBADF)

        # The owner's things are intact and still its own.
        assert bytes(mapping.view[0:5]) == b"owner"
        response = await owner.call(gntdev_pb2_grpc.GntdevStub(owner.grpc_channel).RegisterCopyBuffer, claim)
        assert response.buffer_id
        async with sharer.evtchn.subscribe([offered]) as events:
            await owner.evtchn.notify(port)
            assert (await asyncio.wait_for(anext(events), 5)).port == offered
        info = await owner.describe()
        assert (info.usage.mappings, info.usage.allocations, info.usage.event_channels, info.usage.dmabufs) == (1, 1, 1, 1)
        exported.close()
        await exported.wait_released(5000)
        await buffer.aclose()
        await mapping.aclose()
        await own_share.aclose()
        await pages.aclose()
        await whole.aclose()
    assert array and socket  # (stdlib modules the stranger script uses, imported here for linters)
