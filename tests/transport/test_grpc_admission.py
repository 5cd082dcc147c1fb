"""gRPC admission: a call is authenticated and takes one of its session's
calls in flight when grpc asks for its handler — before grpc reads its
request — and an admitted call is then served by a plain unary handler.

What is checked here, on a broker in this process:

* A call without a valid session token, or past its session's budget of
  calls in flight, is refused without its request being read: its route's
  decoder never runs (grpc hands a request to the decoder once it has read
  all of it), whatever its size — 15 MiB here.
* A call's place is taken before its request is read (a call whose client
  has sent its headers and nothing else holds it), and given back however
  the call ends: answered, refused, or cancelled before its handler ever
  ran — the counts return to where they were.
* The decoder's refusals (EMSGSIZE past the call's limit, EINVAL for bytes
  that do not decode) reach the client with their errno, not as UNKNOWN.
* Admission outside the call's task (nothing would give its place back)
  fails closed.
"""

from __future__ import annotations

import asyncio
import errno
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import grant_broker_client
from grant_broker.core.budgets import CALLS
from grant_broker.core.operations.broker import BrokerStatus
from grant_broker.core.policy import Limits
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.routes import build_routes
from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker.transport.grpc import handlers
from grant_broker_protocol.endpoints import SESSION_METADATA_KEY
from grant_broker_protocol.v1 import broker_pb2, common_pb2, gntdev_pb2
from grant_broker_protocol.v1.common_pb2 import ErrorDetail
from waiting import eventually

DESCRIBE = "/grant_broker.v1.Broker/DescribeSession"
GRANT_COPY = "/grant_broker.v1.Gntdev/GrantCopy"
SUBSCRIBE = "/grant_broker.v1.Evtchn/Subscribe"
REGISTER = "/grant_broker.v1.Gntdev/RegisterCopyBuffer"
DETAILS_KEY = "grpc-status-details-bin"


def unknown_field(size: int) -> bytes:
    """A message of about *size* bytes that every request type parses (one
    length-delimited field of a number no message uses)."""
    payload = size - 8
    tag = (1000 << 3) | 2
    head = bytearray()
    for value in (tag, payload):
        while value >= 0x80:
            head.append(value & 0x7F | 0x80)
            value >>= 7
        head.append(value)
    return bytes(head) + bytes(payload)


def errno_of(error: grpc.aio.AioRpcError) -> int:
    from google.rpc import status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            detail = ErrorDetail()
            assert status_pb2.Status.FromString(value).details[0].Unpack(detail)
            return detail.errno
    raise AssertionError(f"no ErrorDetail in {error}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gb-") as directory:
        yield Path(directory)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many requests each route's decoder was handed (for brokers made after it)."""
    counts: Counter[str] = Counter()
    make = handlers.request_decoder

    def counting(route: Any, limits: Limits) -> Callable[[bytes], Any]:
        decode = make(route, limits)
        name = route.full_name

        def counted(raw: bytes) -> Any:
            counts[name] += 1
            return decode(raw)

        return counted

    monkeypatch.setattr(handlers, "request_decoder", counting)
    return counts


async def start_broker(short_tmp: Path, limits: Limits | None = None) -> BrokerServer:
    config = ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0,
                          limits=limits or Limits())
    server = BrokerServer(config)
    await server.__aenter__()
    return server


@pytest.fixture
async def broker(short_tmp: Path, decoded: Counter[str]) -> AsyncIterator[BrokerServer]:
    server = await start_broker(short_tmp, Limits(max_calls_per_session=2))
    try:
        yield server
    finally:
        await server.__aexit__(None, None, None)


def socket_of(server: BrokerServer) -> str:
    return server.config.socket_path


def calls_held(registry: SessionRegistry | None) -> tuple[int, int]:
    """The calls in flight the registry's sessions hold, and their uids'."""
    assert registry is not None
    sessions = registry.sessions
    users = {id(session.user): session.user for session in sessions}.values()
    return sum(session.held[CALLS] for session in sessions), sum(user.held[CALLS] for user in users)


class HeadersOnly:
    """A call whose client sends its headers and then nothing until told
    (a request-streaming call on the client's side: the broker has the call,
    and none of its request)."""

    def __init__(self, channel: grpc.aio.Channel, method: str, metadata: Any) -> None:
        self.release = asyncio.Event()

        async def requests() -> AsyncIterator[bytes]:
            await self.release.wait()
            yield b""

        self.call = channel.stream_unary(method)(requests(), metadata=metadata, timeout=30)


async def test_a_large_call_without_a_valid_token_is_refused_unread(broker: BrokerServer, decoded: Counter[str]) -> None:
    body = unknown_field(15 * 1024 * 1024)
    options = [("grpc.max_send_message_length", -1)]
    async with await grant_broker_client.connect(socket_of(broker), domid=1, fast_path=False) as session, \
            grpc.aio.insecure_channel(f"unix:{socket_of(broker)}", options=options) as channel:
        for metadata in ((), ((SESSION_METADATA_KEY, "not-a-token"),)):
            for method in (GRANT_COPY, DESCRIBE, SUBSCRIBE):
                if method == SUBSCRIBE:
                    stream = channel.unary_stream(method)(body, metadata=metadata, timeout=30)
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await stream.read()
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await channel.unary_unary(method)(body, metadata=metadata, timeout=30)
                assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value
                assert errno_of(raised.value) == errno.EPERM
        assert sum(decoded.values()) == 0, f"refused requests were read: {dict(decoded)}"
        # The same calls with the session's token are read (and refused by their size limit or served).
        await session.describe()
        assert decoded[DESCRIBE] == 1
        assert calls_held(broker.registry) == (0, 0)


async def test_a_call_takes_its_place_before_its_request_is_read_and_gives_it_back_when_cancelled(
    broker: BrokerServer, decoded: Counter[str]
) -> None:
    # The budget is 2 calls in flight per session (the fixture's).
    async with await grant_broker_client.connect(socket_of(broker), domid=1, fast_path=False) as session, \
            grpc.aio.insecure_channel(f"unix:{socket_of(broker)}") as channel:
        metadata = ((SESSION_METADATA_KEY, session._token),)
        waiting = [HeadersOnly(channel, DESCRIBE, metadata) for _ in range(2)]
        await eventually(lambda: calls_held(broker.registry) == (2, 2), "two calls admitted")
        assert decoded[DESCRIBE] == 0  # admitted, their requests not read (not sent, even)
        # A third call is past the budget: refused before its 4 MiB are read.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary(GRANT_COPY)(unknown_field(4 << 20), metadata=metadata, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value
        assert errno_of(raised.value) == errno.EDQUOT
        assert "calls in flight" in (raised.value.details() or "")
        assert decoded[GRANT_COPY] == 0
        # The waiting calls die before their handlers ever run: their places come back.
        for call in waiting:
            call.call.cancel()
        await eventually(lambda: calls_held(broker.registry) == (0, 0), "the cancelled calls' places given back")
        assert decoded[DESCRIBE] == 0
        # And the session goes on, with its whole budget.
        answered = await asyncio.gather(*(session.describe() for _ in range(2)))
        assert {info.session_id for info in answered} == {session.session_id}
        assert calls_held(broker.registry) == (0, 0)


async def test_a_waiting_call_is_served_once_its_request_comes(broker: BrokerServer) -> None:
    async with await grant_broker_client.connect(socket_of(broker), domid=1, fast_path=False) as session, \
            grpc.aio.insecure_channel(f"unix:{socket_of(broker)}") as channel:
        metadata = ((SESSION_METADATA_KEY, session._token),)
        call = HeadersOnly(channel, DESCRIBE, metadata)
        await eventually(lambda: calls_held(broker.registry) == (1, 1), "the call admitted")
        call.release.set()
        reply = broker_pb2.SessionInfo.FromString(await call.call)
        assert reply.session_id == session.session_id
        await eventually(lambda: calls_held(broker.registry) == (0, 0), "its place given back")


async def test_the_decoders_refusals_keep_their_errno(broker: BrokerServer) -> None:
    async with await grant_broker_client.connect(socket_of(broker), domid=1, fast_path=False) as session, \
            grpc.aio.insecure_channel(f"unix:{socket_of(broker)}") as channel:
        metadata = ((SESSION_METADATA_KEY, session._token),)
        for method, body, code, number in (
            (DESCRIBE, unknown_field(1 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED, errno.EMSGSIZE),
            (DESCRIBE, b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL),
            (SUBSCRIBE, unknown_field(1 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED, errno.EMSGSIZE),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                if method == SUBSCRIBE:
                    await channel.unary_stream(method)(body, metadata=metadata, timeout=30).read()
                else:
                    await channel.unary_unary(method)(body, metadata=metadata, timeout=30)
            assert (raised.value.code(), errno_of(raised.value)) == (code, number), raised.value
        assert calls_held(broker.registry) == (0, 0)
        # A session-optional call without a session is decoded the same way.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary("/grant_broker.v1.Broker/Status")(b"\xff\xff\xff", timeout=30)
        assert (raised.value.code(), errno_of(raised.value)) == (grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)


async def test_calls_that_fail_or_wait_for_descriptors_give_their_place_back(broker: BrokerServer) -> None:
    async with await grant_broker_client.connect(socket_of(broker), domid=1, fast_path=False) as session, \
            grpc.aio.insecure_channel(f"unix:{socket_of(broker)}") as channel:
        metadata = ((SESSION_METADATA_KEY, session._token),)
        gntdev = channel.unary_unary(GRANT_COPY, request_serializer=gntdev_pb2.GrantCopyRequest.SerializeToString)
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # names a copy buffer it has not registered
            segment = gntdev_pb2.GrantCopySegment(len=16, flags=1)
            segment.source.foreign.ref = 1
            segment.dest.virt.buffer_id = 77
            await gntdev(gntdev_pb2.GrantCopyRequest(count=1, segments=[segment]), metadata=metadata, timeout=30)
        assert raised.value.code() != grpc.StatusCode.UNKNOWN
        register = channel.unary_unary(REGISTER, request_serializer=gntdev_pb2.RegisterCopyBufferRequest.SerializeToString)
        parked = register(gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=900, fd=common_pb2.FdRef(index=0), length=4096),
                          metadata=metadata, timeout=30)
        await eventually(lambda: calls_held(broker.registry) == (1, 1), "the parked call admitted")
        parked.cancel()
        await eventually(lambda: calls_held(broker.registry) == (0, 0), "the parked call's place given back")


async def test_admission_outside_the_calls_task_fails_closed(broker: BrokerServer) -> None:
    async with await grant_broker_client.connect(socket_of(broker), domid=1, fast_path=False) as session:
        assert broker.registry is not None
        status = BrokerStatus(broker.registry, broker.registry.sessions[0].backend.capabilities)
        (routes,) = handlers.generic_handlers(broker.registry, build_routes(status, streams_ended=lambda: False))

        class Details:
            method = DESCRIBE
            invocation_metadata = ((SESSION_METADATA_KEY, session._token),)

        loop = asyncio.get_running_loop()
        looked_up: asyncio.Future[Any] = loop.create_future()
        loop.call_soon(lambda: looked_up.set_result(routes.service(Details())))  # a callback: no task
        handler = await looked_up
        assert handler.request_streaming and not handler.response_streaming  # a refusal: the request is never read
        assert calls_held(broker.registry) == (0, 0)
        # In a task, the same look-up admits the call; the place comes back when the task ends.
        async def in_a_task() -> Any:
            admitted = routes.service(Details())
            assert calls_held(broker.registry) == (1, 1)
            return admitted

        handler = await asyncio.ensure_future(in_a_task())
        assert not handler.request_streaming and not handler.response_streaming
        await eventually(lambda: calls_held(broker.registry) == (0, 0), "the place given back at the task's end")
