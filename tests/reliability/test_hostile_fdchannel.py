"""The fd channel fuzzed with hypothesis: bad frames end the offending session, and only it.

Each example opens a raw fd channel and sends a sequence of frames — random
bytes, truncated or oversized frames, valid protobuf frames of the wrong kind,
transfer frames whose ``fd_count`` lies, frames carrying up to 40 descriptors
of every kind (pipes, sockets, directories, /dev/null, eventfds, memfds),
repeated or zero transfer ids, more pending transfers than allowed — before
or after the hello.  A small model of the protocol says whether the broker
must keep or end the session; a final frame plus a call naming it (a barrier:
the broker reads frames in order) finds out what it did.  Always:

* the broker stays alive and a bystander session keeps working;
* a session is ended exactly when the model says so, with a ProtocolError
  frame saying why (a zero-length datagram reads as a hang-up: ended silently);
* before the hello nothing but a valid ClientHello without descriptors opens
  a session, and descriptors sent with it are never installed in the broker;
* after each example the broker holds as many descriptors as before.

``GRANT_BROKER_FUZZ_EXAMPLES`` scales the examples (default 30 -> 120 here).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grant_broker_protocol.fdchannel import MAX_FDS_PER_FRAME, MAX_FRAME_BYTES
from grant_broker.core.policy import Limits
from grant_broker_protocol.v1 import broker_pb2, common_pb2, gntdev_pb2
from grant_broker_protocol.v1.fdchannel_pb2 import ClientHello, FdFrame, FdTransfer, ProtocolError, ServerHello

from .conftest import Daemon, knob, start_daemon, stop_daemon
from .rawclient import FD_KINDS, STUBS, RawChannel, RawSession, descriptors, grpc_channel

EXAMPLES = int(knob("GRANT_BROKER_FUZZ_EXAMPLES", 30)) * 4
MAX_PENDING = Limits().max_pending_fd_frames
BARRIER_ID = 2**63 + 4242


@dataclass(frozen=True)
class Frame:
    payload: bytes
    kinds: tuple[str, ...]  # descriptors attached, by kind


def _transfer(transfer_id: int, fd_count: int) -> bytes:
    return FdFrame(transfer=FdTransfer(transfer_id=transfer_id, fd_count=fd_count)).SerializeToString()


TRANSFER_IDS = st.one_of(st.sampled_from([0, 1, 2, 3, 2**32, 2**64 - 1]), st.integers(0, 2**64 - 1))
KINDS = st.lists(st.sampled_from(FD_KINDS), max_size=4).map(tuple)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    kinds = draw(st.one_of(KINDS, KINDS, st.sampled_from([("memfd",) * 33, ("pipe",) * 40])))
    choice = draw(st.sampled_from(["transfer", "transfer", "transfer", "lying", "random", "truncated", "other", "huge", "empty"]))
    if choice == "transfer":  # well formed
        payload = _transfer(draw(TRANSFER_IDS), len(kinds))
    elif choice == "lying":  # fd_count says something else
        payload = _transfer(draw(TRANSFER_IDS), draw(st.integers(0, 2**32 - 1)))
    elif choice == "random":
        payload = draw(st.binary(max_size=64))
    elif choice == "truncated":
        whole = _transfer(draw(TRANSFER_IDS), len(kinds))
        payload = whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    elif choice == "other":  # a valid frame of a kind the client may not send after the hello
        payload = draw(st.sampled_from([
            FdFrame(client_hello=ClientHello(protocol_version=1)),
            FdFrame(server_hello=ServerHello(token="x")),
            FdFrame(error=ProtocolError(message="no")),
            FdFrame(),
        ])).SerializeToString()
    elif choice == "huge":
        payload = b"\x1a" + bytes(draw(st.integers(MAX_FRAME_BYTES, MAX_FRAME_BYTES + 4000)))
    else:
        payload = b""
    return Frame(payload, kinds)


# Well-formed transfer frames only (the broker must keep the session unless
# ids repeat or too many are pending), or anything.
GOOD_FRAMES = st.builds(
    lambda transfer_id, kinds: Frame(_transfer(transfer_id, len(kinds)), kinds),
    st.integers(1, 2**64 - 1).filter(lambda t: t != BARRIER_ID), KINDS,
)
SEQUENCES = st.one_of(st.lists(GOOD_FRAMES, min_size=1, max_size=MAX_PENDING + 2), st.lists(frames(), min_size=1, max_size=5))


def expected_end(sequence: list[Frame]) -> str | None:
    """What the broker must do with *sequence* followed by the barrier frame:
    ``None`` (keep the session), ``"error"`` (end it with a ProtocolError
    frame) or ``"hangup"`` (a zero-length datagram: it reads as the peer
    closing, and the session ends without a word)."""
    pending: set[int] = set()
    for frame in [*sequence, Frame(_transfer(BARRIER_ID, 1), ("sealed-memfd",))]:
        count = len(frame.kinds)
        if not frame.payload and not count:
            return "hangup"
        if count > MAX_FDS_PER_FRAME or len(frame.payload) > MAX_FRAME_BYTES:
            return "error"
        try:
            parsed = FdFrame.FromString(frame.payload)
        except DecodeError:
            return "error"
        if parsed.WhichOneof("body") != "transfer" or parsed.transfer.fd_count != count:
            return "error"
        transfer_id = parsed.transfer.transfer_id
        if transfer_id == 0 or transfer_id in pending or len(pending) >= MAX_PENDING:
            return "error"
        pending.add(transfer_id)
    return None


@dataclass
class Target:
    daemon: Daemon
    channel: grpc.Channel
    bystander: RawSession
    baseline_fds: int
    outcomes: dict[str, int]


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with tempfile.TemporaryDirectory(prefix="gb-fdfuzz-") as directory:
        daemon = start_daemon(str(Path(directory) / "broker.sock"), options={"limits": {"fd_frame_wait_seconds": 1.0}})
        channel = grpc_channel(daemon.socket_path)
        bystander = RawSession.open(daemon.socket_path, 2)
        _describe(channel, bystander)
        # Warm up: one session that registers a copy buffer (opens what stays open).
        warm = RawSession.open(daemon.socket_path, 1)
        _barrier(channel, warm, BARRIER_ID)
        warm.close()
        target = Target(daemon, channel, bystander, 0, {})
        try:
            _settle_sessions(target, 1)
            target.baseline_fds = daemon.fd_count()
            yield target
            assert daemon.alive(), daemon.log()[-5000:]
            assert _describe(channel, bystander).session_id == bystander.session_id
            log = daemon.log()
            for marker in ("Traceback", "unexpected error", "exception was never retrieved", "failed unexpectedly"):
                assert marker not in log, f"the broker logged {marker!r}:\n{log[-5000:]}"
            print(f"fd channel fuzz outcomes: {target.outcomes}")
        finally:
            bystander.close()
            channel.close()
            stop_daemon(daemon)


def _describe(channel: grpc.Channel, session: RawSession) -> broker_pb2.SessionInfo:
    return STUBS["Broker"](channel).DescribeSession(broker_pb2.DescribeSessionRequest(), metadata=session.metadata, timeout=10)


def _barrier(channel: grpc.Channel, session: RawSession, transfer_id: int) -> grpc.StatusCode:
    """Send a transfer frame and a call naming it; the call's status says
    whether the session outlived every frame sent before."""
    try:
        with descriptors(["sealed-memfd"]) as fds:
            session.send_fds(transfer_id, fds)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the broker closed the channel already
    request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer_id, fd=common_pb2.FdRef(index=0), length=4096)
    try:
        STUBS["Gntdev"](channel).RegisterCopyBuffer(request, metadata=session.metadata, timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _settle_sessions(target: Target, count: int) -> None:
    import time

    deadline = time.monotonic() + 10
    while True:
        with grpc_channel(target.daemon.socket_path) as channel:
            status = STUBS["Broker"](channel).Status(broker_pb2.StatusRequest(), timeout=10)
        if len(status.sessions) == count:
            return
        assert time.monotonic() < deadline, f"{len(status.sessions)} sessions, {count} expected: {status}"
        time.sleep(0.02)


def _settle_fds(target: Target) -> None:
    import time

    deadline = time.monotonic() + 10
    while target.daemon.fd_count() != target.baseline_fds:
        assert time.monotonic() < deadline, (
            f"the broker holds {target.daemon.fd_count()} descriptors, {target.baseline_fds} before: "
            f"{sorted(target.daemon.fd_targets().values())}"
        )
        time.sleep(0.02)


def _send(session: RawSession, frame: Frame) -> None:
    with descriptors(frame.kinds) as fds:
        try:
            session.channel.send(frame.payload, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker already ended the session (an earlier frame)


@pytest.mark.timeout(60 + EXAMPLES)  # the long runs outlast the suite's 120 s per test
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(sequence=SEQUENCES)
def test_bad_frames_end_only_the_offending_session(target: Target, sequence: list[Frame]) -> None:
    session = RawSession.open(target.daemon.socket_path, 1)
    try:
        for frame in sequence:
            _send(session, frame)
        code = _barrier(target.channel, session, BARRIER_ID)
        expected = expected_end(sequence)
        described = f"frames {[(f.payload[:40], len(f.payload), f.kinds) for f in sequence]}"
        if expected is None:
            assert code == grpc.StatusCode.OK, f"{code} for {described}"
            _describe(target.channel, session)  # still alive
        else:
            # The session is gone; the call that waited for the barrier says so precisely.
            assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.CANCELLED), f"{code} for {described}"
            reply = session.channel.receive(timeout=10)
            if expected == "error":
                assert reply is not None and reply.WhichOneof("body") == "error", f"{reply} for {described}"
                assert session.channel.receive(timeout=10) is None
            else:
                assert reply is None, f"{reply} for {described}"
        target.outcomes[expected or "kept"] = target.outcomes.get(expected or "kept", 0) + 1
        assert target.daemon.alive()
        assert _describe(target.channel, target.bystander).session_id == target.bystander.session_id
    finally:
        session.close()
    _settle_sessions(target, 1)
    _settle_fds(target)


@pytest.mark.timeout(60 + EXAMPLES)
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(frame=frames(), hello_kinds=KINDS)
def test_nothing_but_a_clean_hello_opens_a_session(target: Target, frame: Frame, hello_kinds: tuple[str, ...]) -> None:
    # The first frame: a hostile one, or a valid hello carrying descriptors.
    channel = RawChannel(target.daemon.socket_path)
    try:
        hello = FdFrame(client_hello=ClientHello(protocol_version=1)).SerializeToString()
        first = Frame(hello, hello_kinds) if frame.payload == b"" and not frame.kinds else frame
        with descriptors(first.kinds) as fds:
            channel.send(first.payload, fds)
        reply = channel.receive(timeout=10)
        try:
            parsed = FdFrame.FromString(first.payload)
        except DecodeError:
            parsed = None
        clean_hello = (
            parsed is not None and parsed.WhichOneof("body") == "client_hello" and parsed.client_hello.protocol_version == 1
            and not first.kinds and len(first.payload) <= MAX_FRAME_BYTES
            and (not parsed.client_hello.HasField("domid") or parsed.client_hello.domid < 0x7FF0)
        )
        if clean_hello:
            assert reply is not None and reply.WhichOneof("body") == "server_hello", reply
        elif first.payload == b"" and not first.kinds:
            assert reply is None
        else:
            assert reply is not None and reply.WhichOneof("body") == "error", f"{reply} for {first}"
            assert channel.receive(timeout=10) is None
    finally:
        channel.close()
    _settle_sessions(target, 1)
    _settle_fds(target)


def test_unknown_transfer_ids_in_calls_are_refused_precisely(target: Target) -> None:
    session = RawSession.open(target.daemon.socket_path, 1)
    try:
        for transfer_id in (0, 7, 2**64 - 1):
            request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer_id, fd=common_pb2.FdRef(index=0), length=4096)
            with pytest.raises(grpc.RpcError) as raised:
                STUBS["Gntdev"](target.channel).RegisterCopyBuffer(request, metadata=session.metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
            assert "EBADF" in raised.value.details()
        _describe(target.channel, session)
    finally:
        session.close()
    _settle_sessions(target, 1)


def test_descriptors_with_a_refused_hello_leave_nothing_in_the_broker(target: Target) -> None:
    # 32 descriptors ride with a hello the broker refuses (protocol version
    # 99).  test_security.py proves they are never even installed; here, in
    # the daemon, the count before and after.
    channel = RawChannel(target.daemon.socket_path)
    try:
        before = target.daemon.fd_count()
        with descriptors(["pipe"] * 32) as fds:
            channel.send(FdFrame(client_hello=ClientHello(protocol_version=99)), fds)
            reply = channel.receive(timeout=10)
        assert reply is not None and reply.WhichOneof("body") == "error"
        assert "refused before the session was authenticated" in reply.error.message
        assert channel.receive(timeout=10) is None
        assert target.daemon.fd_count() <= before
    finally:
        channel.close()
    _settle_fds(target)


def test_a_zero_length_datagram_ends_only_that_session(target: Target) -> None:
    session = RawSession.open(target.daemon.socket_path, 1)
    try:
        session.channel.sock.send(b"")
        assert session.channel.receive(timeout=10) is None
        assert _barrier(target.channel, session, 5) == grpc.StatusCode.PERMISSION_DENIED
        assert _describe(target.channel, target.bystander)
    finally:
        session.close()
    _settle_sessions(target, 1)
