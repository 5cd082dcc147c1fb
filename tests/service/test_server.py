"""The daemon: sockets, sessions, health, reflection, shutdown — through real sockets."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import stat
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import grant_broker_client
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import open_fd_count
from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc
from grant_broker_protocol.v1.fdchannel_pb2 import ClientHello, FdFrame
from grant_broker_client import BrokerClientError

from waiting import eventually

from .conftest import InProcessBroker, start_broker_process


async def test_health_reports_serving(broker: InProcessBroker) -> None:
    async with grpc.aio.insecure_channel(f"unix:{broker.socket_path}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="grant_broker.v1.Gntdev")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_every_service(broker: InProcessBroker) -> None:
    async with grpc.aio.insecure_channel(f"unix:{broker.socket_path}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def one_request():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: set[str] = set()
        async for reply in stub.ServerReflectionInfo(one_request()):
            names.update(service.name for service in reply.list_services_response.service)
    assert {
        "grant_broker.v1.Broker",
        "grant_broker.v1.Gntdev",
        "grant_broker.v1.Gntalloc",
        "grant_broker.v1.Evtchn",
        "grant_broker.v1.MemBuf",
        "grpc.health.v1.Health",
    } <= names


async def test_sockets_are_mode_0660(broker: InProcessBroker) -> None:
    for path in (broker.socket_path, broker.socket_path + ".fds"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


async def test_refuses_to_start_over_a_live_broker(broker: InProcessBroker) -> None:
    with pytest.raises(BrokerError) as raised:
        await BrokerServer(ServerConfig(socket_path=broker.socket_path, backend="emulated")).start()
    assert raised.value.errno == errno.EADDRINUSE
    assert "another broker" in str(raised.value)


async def test_removes_a_stale_socket(short_tmp: Path) -> None:
    path = str(short_tmp / "broker.sock")
    for stale, kind in ((path, socket.SOCK_STREAM), (path + ".fds", socket.SOCK_SEQPACKET)):
        leftover = socket.socket(socket.AF_UNIX, kind)
        leftover.bind(stale)
        leftover.close()  # the file stays, nobody listens: what a crashed broker leaves
    async with BrokerServer(ServerConfig(socket_path=path, backend="emulated")):
        async with await grant_broker_client.connect(path) as session:
            assert session.session_id > 0
    assert not os.path.exists(path) and not os.path.exists(path + ".fds")


async def test_refuses_a_path_that_is_not_a_socket(short_tmp: Path) -> None:
    path = short_tmp / "broker.sock"
    path.write_text("precious")
    with pytest.raises(BrokerError, match="not a socket"):
        await BrokerServer(ServerConfig(socket_path=str(path), backend="emulated")).start()
    assert path.read_text() == "precious"


def _devnull_fds() -> int:
    devnull = os.stat(os.devnull)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed meanwhile
        count += (info.st_dev, info.st_ino) == (devnull.st_dev, devnull.st_ino)
    return count


async def test_a_started_broker_already_holds_its_spare_descriptor(short_tmp: Path) -> None:
    # The spare (kept to refuse clients precisely when descriptors run out) is
    # taken before start() returns — before the broker says READY=1 — so that
    # the descriptors a broker holds are the same from then on until a client
    # comes: tests and operators take their baseline at READY.
    before = _devnull_fds()
    server = BrokerServer(ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0))
    await server.start()
    try:
        assert _devnull_fds() == before + 1
    finally:
        await server.stop()
    assert _devnull_fds() == before


async def test_session_acts_as_the_domain_it_declares(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=3, client_name="tester") as session:
        info = await session.describe()
        assert (session.domid, info.domid, info.client_name, info.pid) == (3, 3, "tester", os.getpid())
        assert info.capabilities.backend == "emulated"


async def test_call_without_session_is_permission_denied(broker: InProcessBroker) -> None:
    async with grpc.aio.insecure_channel(f"unix:{broker.socket_path}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await broker_pb2_grpc.BrokerStub(channel).DescribeSession(broker_pb2.DescribeSessionRequest())
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_token_of_an_ended_session_is_refused(broker: InProcessBroker) -> None:
    session = await grant_broker_client.connect(broker.socket_path)
    metadata = session._metadata
    await session.close()
    await eventually(lambda: not broker.registry.sessions, "the session ended")
    async with grpc.aio.insecure_channel(f"unix:{broker.socket_path}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await broker_pb2_grpc.BrokerStub(channel).DescribeSession(broker_pb2.DescribeSessionRequest(), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_descriptors_before_the_hello_end_the_connection(broker: InProcessBroker) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(broker.socket_path + ".fds")
    sock.setblocking(False)
    read_end, write_end = os.pipe()
    try:
        import array

        hello = FdFrame(client_hello=ClientHello(protocol_version=1)).SerializeToString()
        sock.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read_end]))])
        reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 5)
        assert FdFrame.FromString(reply).WhichOneof("body") == "error"
        assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 5) == b""
        assert broker.registry.sessions == []
    finally:
        sock.close()
        os.close(read_end)
        os.close(write_end)


async def test_garbage_on_one_fd_channel_ends_only_that_session(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=1) as good:
        bad = await grant_broker_client.connect(broker.socket_path, domid=2)
        try:
            bad._fd_channel._sock.send(b"\xff\xfe not a frame")
            await eventually(lambda: len(broker.registry.sessions) == 1, "one session")
            with pytest.raises(BrokerClientError) as raised:
                await bad.describe()
            assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert (await good.describe()).domid == 1
        finally:
            await bad.close()


async def test_closing_a_session_releases_it_and_its_descriptors(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path) as warmup:
        await warmup.describe()
    await eventually(lambda: not broker.registry.sessions, "the session ended")
    baseline = open_fd_count()
    session = await grant_broker_client.connect(broker.socket_path, domid=5)
    await session.describe()
    assert len(broker.registry.sessions) == 1
    await session.close()
    await eventually(lambda: not broker.registry.sessions, "the session ended")
    assert open_fd_count() == baseline


async def test_status_lists_sessions(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=4, client_name="listed") as session:
        # Within a session of root (an administrator): every session.
        status = await session.call(session.broker.Status, broker_pb2.StatusRequest())
        assert [(s.session_id, s.domid, s.client_name) for s in status.sessions] == [(session.session_id, 4, "listed")]
        assert status.capabilities.backend == "emulated"
        # Without a session the caller could be anyone: no session (the default view, "own").
        async with grpc.aio.insecure_channel(f"unix:{broker.socket_path}") as channel:
            stranger = await broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest())
        assert list(stranger.sessions) == [] and stranger.capabilities.backend == "emulated"


async def test_connect_without_a_broker_is_unavailable(short_tmp: Path) -> None:
    with pytest.raises(BrokerClientError) as raised:
        await grant_broker_client.connect(str(short_tmp / "nobody.sock"))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no broker at" in str(raised.value)


def test_sigterm_shuts_down_gracefully_and_removes_the_sockets(short_tmp: Path) -> None:
    broker = start_broker_process(str(short_tmp / "broker.sock"))
    try:
        assert broker.stop(signal.SIGTERM) == 0
        output = broker.process.stdout.read() if broker.process.stdout else ""
        assert "listening on" in output and "backend: emulated" in output
        assert not os.path.exists(broker.socket_path)
        assert not os.path.exists(broker.socket_path + ".fds")
    finally:
        if broker.process.poll() is None:
            broker.process.kill()
            broker.process.wait()
        if broker.process.stdout:
            broker.process.stdout.close()
        broker.close_notify_socket()
