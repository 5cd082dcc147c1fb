"""The fast path: calls as frames on the session's fd channel (fdchannel.proto, 5-9).

The other service tests run every SDK call through both transports (the
``transport`` fixture); these are about the fast path itself: the hello that
offers it, replies matched by id with their descriptors in the same
datagram, and frames a client should never send.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

import grant_broker_client
from grant_broker.core.policy import Limits
from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker.transport.fastevents import MAX_UNSENT_FRAMES
from grant_broker_client import BrokerClientError
from grant_broker_protocol.fdchannel import (
    FAST_PATH_FRAME_BYTES,
    FAST_PATH_VERSION,
    FdChannel,
)
from grant_broker_protocol.fds import open_fd_count
from grant_broker_protocol.v1 import broker_pb2, evtchn_pb2, gntdev_pb2
from grant_broker_protocol.v1.fdchannel_pb2 import Call, Cancel, ClientHello, FdFrame

from waiting import eventually

from .conftest import InProcessBroker

SHARER, MAPPER = 1, 2


@pytest.fixture
def broker_limits() -> Limits:
    """This module's broker serves at most 4 calls of a session at once (every
    test here runs into that bound), and allows more subscriptions than that:
    streams must not hold call slots."""
    return Limits(max_fast_calls_in_flight=4, max_subscriptions_per_session=16)


@pytest.fixture(params=["fast-path"], autouse=True)
def transport(request: pytest.FixtureRequest) -> str:
    """These tests are about the fast path alone (overrides the conftest's two transports)."""
    return str(request.param)


async def test_the_sdk_uses_the_fast_path_when_the_broker_offers_it(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path) as session:
        assert session.fast_path


async def test_a_client_that_does_not_ask_gets_grpc_only(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, fast_path=False) as session:
        assert not session.fast_path
        assert (await session.describe()).session_id == session.session_id


async def test_a_broker_without_the_fast_path_serves_the_sdk_over_grpc(short_tmp: Path) -> None:
    config = ServerConfig(socket_path=str(short_tmp / "b.sock"), backend="emulated", grace_seconds=0, fast_path=False)
    async with BrokerServer(config):
        async with await grant_broker_client.connect(config.socket_path, domid=SHARER) as sharer, \
                await grant_broker_client.connect(config.socket_path, domid=MAPPER) as mapper:
            assert not sharer.fast_path and not mapper.fast_path
            async with await sharer.gntalloc.share(MAPPER, 1) as pages, \
                    await mapper.gntdev.map([(SHARER, pages.refs[0])]) as mapping:
                pages.view[0:2] = b"ok"
                assert bytes(mapping.view[0:2]) == b"ok"


async def test_fast_path_calls_need_no_grpc_connection(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER) as sharer, \
            await grant_broker_client.connect(broker.socket_path, domid=MAPPER) as mapper:
        # The device clients make their gRPC stubs on first use (grpcio
        # crashes making one on a closed channel): use each once first.
        for session in (sharer, mapper):
            for client in (session.gntdev, session.gntalloc, session.evtchn):
                client._stub  # noqa: B018 - made now, while the channel is open
        await sharer.grpc_channel.close()
        await mapper.grpc_channel.close()
        async with await sharer.gntalloc.share(MAPPER, 2, writable=True) as pages, \
                await mapper.gntdev.map([(SHARER, ref) for ref in pages.refs], writable=True) as mapping:
            mapping.view[0:4] = b"fast"
            assert bytes(pages.view[0:4]) == b"fast"
        port = await sharer.evtchn.bind_unbound_port(MAPPER)
        async with mapper.evtchn.subscribe() as events:
            client_port = await mapper.evtchn.bind_interdomain(SHARER, port)
            assert (await asyncio.wait_for(anext(events), 5)).port == client_port  # the bind's own event
            await sharer.evtchn.notify(port)
            assert (await asyncio.wait_for(anext(events), 5)).port == client_port


async def test_replies_are_matched_to_their_calls_with_many_in_flight(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER) as sharer, \
            await grant_broker_client.connect(broker.socket_path, domid=MAPPER) as mapper:
        shares = [await sharer.gntalloc.share(MAPPER, 1) for _ in range(20)]
        for i, pages in enumerate(shares):
            pages.view[0:2] = i.to_bytes(2, "little")
        mappings = await asyncio.gather(*(mapper.gntdev.map([(SHARER, pages.refs[0])]) for pages in shares))
        assert [int.from_bytes(m.view[0:2], "little") for m in mappings] == list(range(20))
        infos = await asyncio.gather(*(mapper.describe() for _ in range(200)))
        assert {info.session_id for info in infos} == {mapper.session_id}
        for mapping in mappings:
            await mapping.close()
        for pages in shares:
            await pages.close()


async def test_a_reply_with_more_descriptors_than_a_datagram_carries(broker: InProcessBroker) -> None:
    # Forty single-page shares map as forty spans: more than the 32 a frame carries.
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER) as sharer, \
            await grant_broker_client.connect(broker.socket_path, domid=MAPPER) as mapper:
        shares = [await sharer.gntalloc.share(MAPPER, 1) for _ in range(40)]
        for i, pages in enumerate(shares):
            pages.view[0] = i
        async with await mapper.gntdev.map([(SHARER, pages.refs[0]) for pages in shares]) as mapping:
            assert [mapping.view[i * 4096] for i in range(40)] == list(range(40))
        for pages in shares:
            await pages.close()


async def test_errors_on_the_fast_path_carry_errno_and_grpc_code(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=MAPPER) as mapper:
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.unmap_grant_ref(0x7000, 1)
        assert (raised.value.errno, raised.value.code) == (errno.ENOENT, grpc.StatusCode.NOT_FOUND)
        assert "index 0x7000" in raised.value.detail


async def test_a_request_too_large_for_a_frame_goes_over_grpc(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=MAPPER) as mapper:
        # 20000 refs of domain 1, none granted: the broker answers for the refs, whichever transport.
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.map([(SHARER, ref) for ref in range(8, 20008)])
        assert raised.value.errno in (errno.EINVAL, errno.EPERM, errno.ENOENT, errno.EFAULT), str(raised.value)


# --------------------------------------------------------------------------- frames a client should never send


async def _raw_session(
    socket_path: str, *, fast: bool = True, version: int = FAST_PATH_VERSION, domid: int | None = None
) -> tuple[FdChannel, int]:
    channel = await FdChannel.connect(socket_path + ".fds")
    hello = ClientHello(protocol_version=1, client_name="raw", fast_path_version=version if fast else 0)
    if domid is not None:
        hello.domid = domid
    await channel.send(FdFrame(client_hello=hello))
    frame, _ = await channel.receive()
    assert frame.WhichOneof("body") == "server_hello"
    assert frame.server_hello.fast_path_version == (min(version, FAST_PATH_VERSION) if fast else 0)
    if fast:
        assert frame.server_hello.max_frame_bytes == FAST_PATH_FRAME_BYTES
        channel.max_frame_bytes = frame.server_hello.max_frame_bytes
    return channel, frame.server_hello.session_id


async def _ends_with_protocol_error(channel: FdChannel) -> str:
    frame, fds = await asyncio.wait_for(channel.receive(), 5)
    for fd in fds:
        fd.close()
    assert frame.WhichOneof("body") == "error", frame
    return frame.error.message


def _call(call_id: int, method: str, request: bytes = b"") -> FdFrame:
    return FdFrame(call=Call(call_id=call_id, method=method, request=request))


DESCRIBE = "/grant_broker.v1.Broker/DescribeSession"


async def test_a_call_before_the_hello_ends_the_channel(broker: InProcessBroker) -> None:
    channel = await FdChannel.connect(broker.socket_path + ".fds")
    try:
        await channel.send(_call(1, DESCRIBE))
        assert "ClientHello" in await _ends_with_protocol_error(channel)
    finally:
        channel.close()


async def test_a_call_without_the_fast_path_ends_the_session(broker: InProcessBroker) -> None:
    channel, _ = await _raw_session(broker.socket_path, fast=False)
    try:
        await channel.send(_call(1, DESCRIBE))
        assert "unexpected call frame" in await _ends_with_protocol_error(channel)
    finally:
        channel.close()


async def test_call_id_zero_ends_the_session(broker: InProcessBroker) -> None:
    channel, _ = await _raw_session(broker.socket_path)
    try:
        await channel.send(_call(0, DESCRIBE))
        assert "call id 0" in await _ends_with_protocol_error(channel)
    finally:
        channel.close()


async def test_an_unknown_method_is_answered_enosys(broker: InProcessBroker) -> None:
    channel, session_id = await _raw_session(broker.socket_path)
    try:
        await channel.send(_call(7, "/grant_broker.v1.Gntdev/Nope"))
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.reply.call_id == 7 and frame.reply.error.errno == errno.ENOSYS
        # The session goes on.
        await channel.send(_call(8, DESCRIBE))
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert broker_pb2.SessionInfo.FromString(frame.reply.response).session_id == session_id
    finally:
        channel.close()


async def test_an_undecodable_request_is_answered_einval(broker: InProcessBroker) -> None:
    channel, _ = await _raw_session(broker.socket_path)
    try:
        await channel.send(_call(3, "/grant_broker.v1.Gntdev/Map", b"\xff\xff\xff"))
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.reply.call_id == 3 and frame.reply.error.errno == errno.EINVAL
    finally:
        channel.close()


async def test_a_frame_beyond_the_agreed_size_ends_the_session(broker: InProcessBroker) -> None:
    channel, _ = await _raw_session(broker.socket_path)
    try:
        channel.max_frame_bytes = 4 * FAST_PATH_FRAME_BYTES  # this end cheats
        request = gntdev_pb2.MapRequest(domids=[1], refs=list(range(8, 8 + FAST_PATH_FRAME_BYTES // 2)))
        await channel.send(_call(1, "/grant_broker.v1.Gntdev/Map", request.SerializeToString()))
        assert "larger than" in await _ends_with_protocol_error(channel)
    finally:
        channel.close()


async def test_a_call_id_reused_while_in_flight_ends_the_session(broker: InProcessBroker) -> None:
    channel, _ = await _raw_session(broker.socket_path)
    try:
        port_request = evtchn_pb2.SubscribeRequest().SerializeToString()
        await channel.send(_call(5, "/grant_broker.v1.Evtchn/Subscribe", port_request))  # stays in flight
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.reply.call_id == 5 and evtchn_pb2.Event.FromString(frame.reply.response).subscribed
        await channel.send(_call(5, DESCRIBE))
        assert "already in flight" in await _ends_with_protocol_error(channel)
    finally:
        channel.close()


async def test_cancel_ends_a_stream_with_stream_end(broker: InProcessBroker) -> None:
    channel, _ = await _raw_session(broker.socket_path)
    try:
        await channel.send(_call(9, "/grant_broker.v1.Evtchn/Subscribe", evtchn_pb2.SubscribeRequest().SerializeToString()))
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.reply.call_id == 9
        await channel.send(FdFrame(cancel=Cancel(call_id=9)))
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.WhichOneof("body") == "stream_end" and frame.stream_end.call_id == 9
        assert not frame.stream_end.HasField("error")
    finally:
        channel.close()


async def test_a_flooding_session_does_not_starve_another(broker: InProcessBroker) -> None:
    flooder, _ = await _raw_session(broker.socket_path)
    try:
        async with await grant_broker_client.connect(broker.socket_path) as bystander:
            sent = 0

            async def flood() -> None:
                nonlocal sent
                # Never reads its replies: its socket fills, the broker stops reading it.
                with flooder_socket(flooder) as sock:
                    while True:
                        sent += 1
                        try:
                            sock.send(_call(sent, DESCRIBE).SerializeToString(), socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            await asyncio.sleep(0.001)

            flooding = asyncio.create_task(flood())
            try:
                await asyncio.sleep(0.2)
                infos = [await asyncio.wait_for(bystander.describe(), 10) for _ in range(20)]
                assert all(info.session_id == bystander.session_id for info in infos)
                assert sent > 100, "the flood never got going"
            finally:
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)
    finally:
        flooder.close()


class flooder_socket:
    """The raw socket of an FdChannel, for sending without the loop's help."""

    def __init__(self, channel: FdChannel) -> None:
        self._sock = socket.socket(fileno=channel.fileno())

    def __enter__(self) -> socket.socket:
        return self._sock

    def __exit__(self, *exc: object) -> None:
        self._sock.detach()


async def test_a_client_killed_mid_call_leaves_the_broker_as_it_was(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER) as sharer:
        pages = await sharer.gntalloc.share(MAPPER, 4)
        before = open_fd_count()
        for _ in range(5):
            channel, _ = await _raw_session(broker.socket_path)
            request = gntdev_pb2.MapRequest(domids=[SHARER], refs=list(pages.refs))
            for call_id in range(1, 30):
                await channel.send(_call(call_id, "/grant_broker.v1.Gntdev/Map", request.SerializeToString()))
            channel.close()  # with replies and their descriptors unread
        for _ in range(200):
            if len(broker.registry.sessions) == 1 and open_fd_count() == before:
                break
            await asyncio.sleep(0.02)
        assert len(broker.registry.sessions) == 1
        assert open_fd_count() == before
        await pages.close()



async def test_long_lived_streams_take_no_call_slots(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER) as session:
        await session.evtchn.bind_unbound_port(MAPPER)
        subscriptions = [await asyncio.wait_for(session.evtchn.subscribe(), 5) for _ in range(8)]
        assert (await asyncio.wait_for(session.describe(), 5)).usage.subscriptions == 8
        for subscription in subscriptions:
            await asyncio.wait_for(subscription.close(), 5)


async def test_a_subscription_whose_call_cannot_be_sent_fails_at_once(broker: InProcessBroker) -> None:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER) as session:
        await session.evtchn.bind_unbound_port(MAPPER)
        session._fd_channel.max_frame_bytes = 16  # noqa: SLF001 - no Call frame fits any more
        with pytest.raises(BrokerClientError) as raised:
            await asyncio.wait_for(session.evtchn.subscribe(), 5)
        assert raised.value.errno == errno.EPIPE and "could not be sent" in raised.value.detail


# --------------------------------------------------------------------------- events as frames, by version

SUBSCRIBE = "/grant_broker.v1.Evtchn/Subscribe"


async def _raw_call(channel: FdChannel, call_id: int, method: str, request: bytes) -> FdFrame:
    await channel.send(_call(call_id, method, request))
    frame, _ = await asyncio.wait_for(channel.receive(), 5)
    assert frame.WhichOneof("body") == "reply" and frame.reply.call_id == call_id, frame
    assert frame.reply.WhichOneof("result") == "response", frame
    return frame


@contextlib.asynccontextmanager
async def _notified_listener(
    broker: InProcessBroker, version: int, subscriptions: int
) -> AsyncIterator[tuple[FdChannel, int, list[int]]]:
    """A raw session as domain 1, speaking fast-path *version*, with a port
    offered to domain 2 and *subscriptions* Subscribe calls of it (ids
    101...), once domain 2 has notified the port: the channel, the port, the ids."""
    channel, _ = await _raw_session(broker.socket_path, version=version, domid=1)
    try:
        reply = await _raw_call(
            channel, 1, "/grant_broker.v1.Evtchn/BindUnboundPort",
            evtchn_pb2.BindUnboundPortRequest(remote_domain=2).SerializeToString(),
        )
        port = evtchn_pb2.BindResponse.FromString(reply.reply.response).port
        ids = list(range(101, 101 + subscriptions))
        for call_id in ids:
            reply = await _raw_call(channel, call_id, SUBSCRIBE, evtchn_pb2.SubscribeRequest(ports=[port]).SerializeToString())
            assert evtchn_pb2.Event.FromString(reply.reply.response).subscribed
        async with await grant_broker_client.connect(broker.socket_path, domid=2, client_name="notifier") as notifier:
            remote = await notifier.evtchn.bind_interdomain(remote_domain=1, remote_port=port)
            await notifier.evtchn.notify(remote)
        yield channel, port, ids
    finally:
        channel.close()


async def test_the_broker_speaks_the_lower_of_the_two_fast_path_versions(broker: InProcessBroker) -> None:
    for offered in (1, FAST_PATH_VERSION, FAST_PATH_VERSION + 7):
        channel, _ = await _raw_session(broker.socket_path, version=offered)  # checks the version answered
        channel.close()


async def test_one_notification_reaches_every_subscription_of_a_session_in_one_events_frame(broker: InProcessBroker) -> None:
    async with _notified_listener(broker, FAST_PATH_VERSION, 12) as (channel, port, ids):
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.WhichOneof("body") == "events", frame
        (fired,) = frame.events.fired
        assert fired.port == port
        assert sorted([fired.call_id, *fired.also_call_ids]) == ids
        assert not frame.events.lost


async def test_a_version_1_client_gets_a_port_fired_frame_per_subscription(broker: InProcessBroker) -> None:
    async with _notified_listener(broker, 1, 3) as (channel, port, ids):
        frames = [(await asyncio.wait_for(channel.receive(), 5))[0] for _ in ids]
        assert all(frame.WhichOneof("body") == "port_fired" for frame in frames), frames
        assert sorted(frame.port_fired.call_id for frame in frames) == ids
        assert {frame.port_fired.port for frame in frames} == {port}


async def test_a_refused_subscription_is_answered_with_its_error(broker: InProcessBroker) -> None:
    channel, _ = await _raw_session(broker.socket_path, domid=1)
    try:
        await channel.send(_call(7, SUBSCRIBE, evtchn_pb2.SubscribeRequest(ports=[4242]).SerializeToString()))
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.WhichOneof("body") == "reply" and frame.reply.call_id == 7
        assert frame.reply.WhichOneof("result") == "error"
        assert frame.reply.error.errno == errno.ENOTCONN  # not a port of this session
        # The id is free again: a refused subscription is not in flight.
        await _raw_call(channel, 7, DESCRIBE, broker_pb2.DescribeSessionRequest().SerializeToString())
    finally:
        channel.close()


async def test_an_unbound_port_ends_its_subscriptions_with_enotconn_after_their_events(broker: InProcessBroker) -> None:
    async with _notified_listener(broker, FAST_PATH_VERSION, 2) as (channel, port, ids):
        frame, _ = await asyncio.wait_for(channel.receive(), 5)
        assert frame.WhichOneof("body") == "events"
        await channel.send(_call(2, "/grant_broker.v1.Evtchn/Unbind", evtchn_pb2.UnbindRequest(port=port).SerializeToString()))
        ends: dict[int, int] = {}
        while len(ends) < len(ids):
            frame, _ = await asyncio.wait_for(channel.receive(), 5)
            if frame.WhichOneof("body") == "stream_end":
                ends[frame.stream_end.call_id] = frame.stream_end.error.errno
        assert ends == {call_id: errno.ENOTCONN for call_id in ids}


async def test_the_sdk_reads_events_from_a_broker_that_speaks_version_1(
    broker: InProcessBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK asks for version 1, as talking to a broker from before the
    # Events frame: the events come one PortFired frame per subscription.
    monkeypatch.setattr("grant_broker_client.session.FAST_PATH_VERSION", 1)
    async with await grant_broker_client.connect(broker.socket_path, domid=1, client_name="v1 listener") as listener, \
               await grant_broker_client.connect(broker.socket_path, domid=2, client_name="notifier") as notifier:
        assert listener.fast_path
        offered = await listener.evtchn.bind_unbound_port(remote_domain=2)
        remote = await notifier.evtchn.bind_interdomain(remote_domain=1, remote_port=offered)
        async with listener.evtchn.subscribe([offered]) as first, listener.evtchn.subscribe([offered]) as second:
            await notifier.evtchn.notify(remote)
            for subscription in (first, second):
                event = await asyncio.wait_for(anext(subscription), 5)
                assert event.port == offered  # type: ignore[union-attr]


@pytest.mark.parametrize("version", [FAST_PATH_VERSION, 1])
async def test_a_client_that_subscribes_without_reading_ends_its_own_session(broker: InProcessBroker, version: int) -> None:
    # Each refused Subscribe leaves an answer the broker must keep until the
    # client reads it; a client that never reads must not grow them without
    # bound: past MAX_UNSENT_FRAMES its session ends, and nothing is left.
    channel, _ = await _raw_session(broker.socket_path, version=version, domid=1)
    refused = FdFrame(call=Call(method=SUBSCRIBE, request=evtchn_pb2.SubscribeRequest(ports=[4242]).SerializeToString()))
    try:
        sent = 0
        with pytest.raises(OSError):  # the broker hangs up: EPIPE / ECONNRESET
            for call_id in range(1, 4 * MAX_UNSENT_FRAMES):
                refused.call.call_id = call_id
                await asyncio.wait_for(channel.send(refused), 5)
                sent += 1
        assert sent > MAX_UNSENT_FRAMES  # it kept reading and answering up to the bound
    finally:
        channel.close()
    await eventually(lambda: len(broker.registry.sessions) == 0, "the session ended")
