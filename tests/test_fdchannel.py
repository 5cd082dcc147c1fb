"""The fd channel: frames and descriptors over SOCK_SEQPACKET, and every way a peer can break it."""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

from grant_broker_protocol.fdchannel import MAX_FDS_PER_FRAME, ChannelClosed, FdChannel, ProtocolError
from grant_broker_protocol.v1.fdchannel_pb2 import ClientHello, FdFrame, FdTransfer
from waiting import eventually


@pytest.fixture
async def pair(fd_baseline: None) -> AsyncIterator[tuple[FdChannel, socket.socket]]:
    """Our channel, and the raw socket of a peer that may misbehave."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = FdChannel(ours)
    try:
        yield channel, theirs
    finally:
        channel.close()
        theirs.close()


def _send_raw(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([payload], ancillary)


def _transfer(transfer_id: int, count: int) -> bytes:
    return FdFrame(transfer=FdTransfer(transfer_id=transfer_id, fd_count=count)).SerializeToString()


async def test_frame_and_descriptors_arrive_together(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    read_end, write_end = os.pipe()
    try:
        _send_raw(peer, _transfer(7, 1), [write_end])
        frame, fds = await channel.receive()
        assert frame.transfer.transfer_id == 7
        assert len(fds) == 1
        with fds[0]:
            os.write(fds[0].fileno(), b"x")
        assert os.read(read_end, 1) == b"x"
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_send_passes_descriptors_that_the_peer_can_use(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    read_end, write_end = os.pipe()
    try:
        await channel.send(FdFrame(transfer=FdTransfer(transfer_id=1, fd_count=1)), [write_end])
        payload, ancillary, flags, _ = peer.recvmsg(4096, socket.CMSG_SPACE(4))
        (level, kind, data), = ancillary
        (received,) = array.array("i", data)
        os.write(received, b"y")
        os.close(received)
        assert os.read(read_end, 1) == b"y"
        assert FdFrame.FromString(payload).transfer.transfer_id == 1
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_more_descriptors_than_announced_is_a_protocol_error(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    read_end, write_end = os.pipe()
    try:
        _send_raw(peer, _transfer(1, 1), [read_end, write_end])
        with pytest.raises(ProtocolError, match="announces 1 descriptors but 2 arrived"):
            await channel.receive()
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_descriptors_on_a_hello_frame_are_a_protocol_error(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    read_end, write_end = os.pipe()
    try:
        _send_raw(peer, FdFrame(client_hello=ClientHello(protocol_version=1)).SerializeToString(), [read_end])
        with pytest.raises(ProtocolError, match="announces 0 descriptors but 1 arrived"):
            await channel.receive()
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_too_many_descriptors_truncate_and_are_refused(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(MAX_FDS_PER_FRAME + 8)]
    try:
        _send_raw(peer, _transfer(1, len(fds)), fds)
        with pytest.raises(ProtocolError, match="MSG_CTRUNC"):
            await channel.receive()
    finally:
        for fd in fds:
            os.close(fd)


async def test_undecodable_frame_is_a_protocol_error(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    _send_raw(peer, b"\xff\xff\xff\xff garbage", [])
    with pytest.raises(ProtocolError, match="undecodable"):
        await channel.receive()


async def test_empty_frame_is_a_protocol_error(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    _send_raw(peer, b"\x00", [])
    with pytest.raises(ProtocolError):
        await channel.receive()


async def test_peer_close_is_channel_closed(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    peer.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ChannelClosed):
        await channel.receive()


async def test_sending_more_than_the_frame_maximum_is_refused_locally(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, _ = pair
    with pytest.raises(ValueError, match="at most"):
        await channel.send(FdFrame(transfer=FdTransfer(transfer_id=1, fd_count=33)), list(range(33)))


async def test_peer_credentials_are_the_connecting_process(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, _ = pair
    creds = channel.peer_credentials()
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())


# --------------------------------------------------------------------------- reading by callback


async def test_reading_by_callback_sees_every_frame_then_the_end(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    frames: list[FdFrame] = []
    ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    channel.start_reading(lambda frame, fds: frames.append(frame), ended.set_result, batch=4)
    hello = FdFrame(client_hello=ClientHello(protocol_version=1)).SerializeToString()
    for _ in range(10):
        peer.send(hello)
    peer.close()
    assert isinstance(await asyncio.wait_for(ended, 5), ChannelClosed)
    assert len(frames) == 10


def test_a_peer_gone_with_our_frames_unread_is_still_read_to_its_end() -> None:
    # The peer's death with frames of ours unread is a socket error (POLLERR),
    # on which libuv stops polling the socket without telling uvloop: what the
    # peer sent before, and its end, must still be read.  On uvloop, as the
    # broker and the SDK run.
    import uvloop

    async def scenario() -> tuple[BaseException, int]:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel = FdChannel(ours)
        frames: list[FdFrame] = []
        ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        try:
            channel.start_reading(lambda frame, fds: frames.append(frame), ended.set_result, batch=4)
            await channel.send(FdFrame(client_hello=ClientHello(protocol_version=1)))  # never read by the peer
            hello = FdFrame(client_hello=ClientHello(protocol_version=1)).SerializeToString()
            for _ in range(40):
                peer.send(hello)
            peer.close()
            return await asyncio.wait_for(ended, 5), len(frames)
        finally:
            channel.close()
            peer.close()

    reason, count = uvloop.run(scenario())
    assert isinstance(reason, ChannelClosed) and count == 40


async def test_paused_reading_takes_no_frames_until_resumed(pair: tuple[FdChannel, socket.socket]) -> None:
    channel, peer = pair
    frames: list[FdFrame] = []

    def on_frame(frame: FdFrame, fds: list[object]) -> None:
        frames.append(frame)
        if len(frames) == 2:
            channel.pause_reading()

    channel.start_reading(on_frame, lambda reason: None)
    hello = FdFrame(client_hello=ClientHello(protocol_version=1)).SerializeToString()
    for _ in range(5):
        peer.send(hello)
    await eventually(lambda: len(frames) == 2, "the two frames read before the pause")
    await asyncio.sleep(0.05)
    assert len(frames) == 2  # and no more while paused
    channel.resume_reading()
    await eventually(lambda: len(frames) == 5, "the three frames left read after resume_reading")
