"""Copy rings in the core (``core/operations/copyring.py``): no sockets, no gRPC.

The client's side of a ring is played by the test: it maps the ring's memfd
from the reply, writes records with ``grant_broker_protocol.copyring.RECORD``
and reads the statuses the broker wrote.  PEER grants the pages, the
session (domain SELF) copies (see ``conftest.py``).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from grant_broker.backend.contract import PAGE_SIZE, GrantCopySegment
from grant_broker.core.budgets import COPY_BUFFER_BYTES, FDS_HELD
from grant_broker.core.operations import copyring, gntdev
from grant_broker.core.session import Session
from grant_broker_protocol.abi import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_domain,
    GNTST_general_error,
    GNTST_okay,
)
from grant_broker_protocol.copyring import MAX_RING_ENTRIES, RECORD, RECORD_SIZE, STATUS_PENDING
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.v1 import common_pb2, gntdev_pb2

from .conftest import PEER, SELF, Core, Granted

_transfer_ids = itertools.count(5000)
SRC, DST = GNTCOPY_source_gref, GNTCOPY_dest_gref


async def refused(call: Awaitable[Any], code: int, fragment: str = "") -> BrokerError:
    with pytest.raises(BrokerError) as raised:
        await call
    assert raised.value.errno == code, str(raised.value)
    assert fragment in raised.value.detail, str(raised.value)
    return raised.value


@dataclass
class ClientRing:
    """The client's end of a ring: its mapping of the ring and of the copy buffer."""

    session: Session
    buffer_id: int
    ring_id: int
    entries: int
    ring: mmap.mmap
    buffer: mmap.mmap

    def write(self, slot: int, *records: bytes) -> None:
        data = b"".join(records)
        self.ring[slot * RECORD_SIZE : slot * RECORD_SIZE + len(data)] = data

    def statuses(self, first: int = 0, count: int | None = None) -> list[int]:
        count = self.entries - first if count is None else count
        return [RECORD.unpack_from(self.ring, (first + i) * RECORD_SIZE)[-1] for i in range(count)]

    async def submit(self, first: int, count: int) -> gntdev_pb2.SubmitCopyRingResponse:
        request = gntdev_pb2.SubmitCopyRingRequest(ring_id=self.ring_id, first=first, count=count)
        return (await copyring.submit_copy_ring(self.session, request)).message


async def register_buffer(session: Session, length: int) -> tuple[int, mmap.mmap]:
    """A copy buffer of *length* bytes registered by *session*, and the client's mapping of it."""
    fd = OwnedFd(os.memfd_create("core-ring-buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    with fd:
        os.ftruncate(fd.fileno(), length)
        fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        client_view = mmap.mmap(fd.fileno(), length)
        transfer_id = next(_transfer_ids)
        session.incoming.deliver(transfer_id, [fd.dup()])
    request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer_id, fd=common_pb2.FdRef(index=0), length=length)
    reply = await gntdev.register_copy_buffer(session, request)
    return reply.message.buffer_id, client_view


async def create_ring(session: Session, buffer_id: int, entries: int) -> tuple[int, mmap.mmap]:
    reply = await copyring.create_copy_ring(session, gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer_id, entries=entries))
    (fd,) = reply.fds
    with fd:
        assert reply.message.fd.index == 0 and reply.message.record_size == RECORD_SIZE == 32
        return reply.message.ring_id, mmap.mmap(fd.fileno(), entries * RECORD_SIZE)


@contextmanager
def closing_maps(*maps: mmap.mmap) -> Iterator[None]:
    try:
        yield
    finally:
        for memory in maps:
            memory.close()


@pytest.fixture
async def ring(core: Core) -> Any:
    session = core.session()
    buffer_id, buffer = await register_buffer(session, 4 * PAGE_SIZE)
    ring_id, ring = await create_ring(session, buffer_id, 16)
    with closing_maps(ring, buffer):
        yield ClientRing(session, buffer_id, ring_id, 16, ring, buffer)


def into_buffer(ref: int, at: int, length: int = PAGE_SIZE, *, page_offset: int = 0, domid: int = PEER) -> bytes:
    return RECORD.pack(ref, at, domid, 0, page_offset, 0, length, SRC, 0, STATUS_PENDING)


def from_buffer(at: int, ref: int, length: int = PAGE_SIZE, *, page_offset: int = 0, domid: int = PEER) -> bytes:
    return RECORD.pack(at, ref, 0, domid, 0, page_offset, length, DST, 0, STATUS_PENDING)


def peer_view(granted: Granted) -> mmap.mmap:
    (span,) = granted.spans
    return mmap.mmap(span.fd.fileno(), span.length, mmap.MAP_SHARED, offset=span.offset)


# --------------------------------------------------------------------------- creating


async def test_a_ring_is_one_sealed_memfd_of_its_records(core: Core) -> None:
    session = core.session()
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    reply = await copyring.create_copy_ring(session, gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer_id, entries=100))
    with closing_maps(buffer), reply.fds[0] as fd:
        assert len(reply.fds) == 1 and reply.message.ring_id > 0 and reply.message.entries == 100
        assert os.fstat(fd.fileno()).st_size == 100 * RECORD_SIZE
        seals = fcntl.fcntl(fd.fileno(), fcntl.F_GET_SEALS)
        assert seals == copyring.RING_SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(fd.fileno(), 32)


async def test_a_ring_of_an_unknown_buffer_is_enoent(core: Core) -> None:
    request = gntdev_pb2.CreateCopyRingRequest(buffer_id=7, entries=4)
    await refused(copyring.create_copy_ring(core.session(), request), errno.ENOENT, "no copy buffer 7")


@pytest.mark.parametrize("entries", [0, MAX_RING_ENTRIES + 1])
async def test_a_ring_has_1_to_4096_entries(core: Core, entries: int) -> None:
    session = core.session()
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    with closing_maps(buffer):
        request = gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer_id, entries=entries)
        await refused(copyring.create_copy_ring(session, request), errno.EINVAL, f"entries {entries} is not between")


async def test_rings_per_session_are_bounded(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copyring, "MAX_COPY_RINGS_PER_SESSION", 2)
    session = core.session()
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    first, second = [await create_ring(session, buffer_id, 1) for _ in range(2)]
    with closing_maps(buffer, first[1], second[1]):
        request = gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer_id, entries=1)
        await refused(copyring.create_copy_ring(session, request), errno.EDQUOT, "2 copy rings, the most allowed")


async def test_a_ring_counts_one_descriptor_and_its_bytes_until_it_is_destroyed(core: Core) -> None:
    session = core.session()
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    before = (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES])
    ring_id, ring = await create_ring(session, buffer_id, 64)
    with closing_maps(buffer, ring):
        assert (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES]) == (before[0] + 1, before[1] + 64 * RECORD_SIZE)
        await copyring.destroy_copy_ring(session, gntdev_pb2.DestroyCopyRingRequest(ring_id=ring_id))
        assert (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES]) == before
        await refused(
            copyring.destroy_copy_ring(session, gntdev_pb2.DestroyCopyRingRequest(ring_id=ring_id)), errno.ENOENT
        )


async def test_a_ring_counts_against_the_copy_buffer_bytes_budget(core: Core) -> None:
    from grant_broker.core.policy import Limits

    session = core.session(Limits(max_copy_buffer_bytes_per_session=PAGE_SIZE + 32 * 10))
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    with closing_maps(buffer):
        request = gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer_id, entries=11)
        await refused(copyring.create_copy_ring(session, request), errno.EDQUOT, "max_copy_buffer_bytes_per_session")
        assert session.held[FDS_HELD] == 1  # the buffer's own


# --------------------------------------------------------------------------- doorbells


@pytest.mark.parametrize(("first", "count"), [(0, 0), (0, 17), (15, 2), (16, 1), (2**32 - 1, 1), (1, 2**32 - 1)])
async def test_a_doorbell_names_records_within_the_ring(ring: ClientRing, first: int, count: int) -> None:
    await refused(ring.submit(first, count), errno.EINVAL, "are not a batch of the ring's 16 records")


async def test_a_doorbell_of_an_unknown_ring_is_enoent(core: Core) -> None:
    request = gntdev_pb2.SubmitCopyRingRequest(ring_id=3, first=0, count=1)
    await refused(copyring.submit_copy_ring(core.session(), request), errno.ENOENT, "no copy ring 3")


async def test_records_copy_both_ways_and_post_their_statuses(core: Core, ring: ClientRing) -> None:
    granted = core.grant(2)
    with closing_maps(peer := peer_view(granted)):
        peer[0:PAGE_SIZE] = b"p" * PAGE_SIZE
        ring.buffer[PAGE_SIZE : 2 * PAGE_SIZE] = b"b" * PAGE_SIZE
        ring.write(
            3,
            into_buffer(granted.refs[0], 0),
            from_buffer(PAGE_SIZE, granted.refs[1]),
            into_buffer(3000, 2 * PAGE_SIZE, 8),  # not granted
            from_buffer(PAGE_SIZE + 10, granted.refs[0], 5, page_offset=100),
        )
        response = await ring.submit(3, 4)
        assert (response.succeeded, response.failed) == (3, 1)
        assert ring.statuses(0, 8) == [0, 0, 0, GNTST_okay, GNTST_okay, GNTST_general_error, GNTST_okay, 0]
        assert ring.buffer[0:PAGE_SIZE] == b"p" * PAGE_SIZE
        assert peer[PAGE_SIZE:] == b"b" * PAGE_SIZE
        assert peer[100:105] == b"bbbbb" and ring.buffer[2 * PAGE_SIZE : 2 * PAGE_SIZE + 8] == bytes(8)


async def test_the_broker_writes_only_the_statuses_of_the_doorbells_records(core: Core, ring: ClientRing) -> None:
    granted = core.grant(1)
    ring.ring[:] = b"\xa5" * len(ring.ring)
    records = [into_buffer(granted.refs[0], i * 16, 16) for i in range(4)]
    ring.write(5, *records)
    before = bytes(ring.ring)
    await ring.submit(5, 4)
    after = bytes(ring.ring)
    changed = [i for i in range(len(after)) if before[i] != after[i]]
    statuses = {slot * RECORD_SIZE + at for slot in range(5, 9) for at in range(28, 32)}
    assert changed and set(changed) <= statuses
    assert ring.statuses(5, 4) == [GNTST_okay] * 4


async def test_the_broker_reads_the_records_once_before_it_checks_them(
    core: Core, ring: ClientRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the client writes into the ring after the broker read it changes nothing
    of the batch: the checked copy is what is performed."""
    granted = core.grant(1)
    with closing_maps(peer := peer_view(granted)):
        peer[0:8] = b"original"
        ring.write(0, into_buffer(granted.refs[0], 0, 8))
        backend = ring.session.gntdev
        performed: list[list[GrantCopySegment]] = []
        grant_copy = backend.grant_copy

        def scribbling_grant_copy(segments: list[GrantCopySegment]) -> list[int]:
            # The client rewrites the record between the broker's read and the copy:
            # a record that would copy outside the buffer, with unknown flags.
            ring.write(0, RECORD.pack(granted.refs[0], 2**31, PEER, 0, 0, 0, 0xFFFF, 0xFF, 0xFF, STATUS_PENDING))
            performed.append(list(segments))
            return grant_copy(segments)

        monkeypatch.setattr(backend, "grant_copy", scribbling_grant_copy)
        response = await ring.submit(0, 1)
        assert (response.succeeded, response.failed) == (1, 0)
        ((segment,),) = performed
        assert (segment.length, segment.source.offset, segment.dest.offset) == (8, 0, 0)  # type: ignore[union-attr]
        assert ring.buffer[0:8] == b"original"
        assert ring.statuses(0, 1) == [GNTST_okay]


MALFORMED = {
    "unknown-flags": (lambda ref: RECORD.pack(ref, 0, PEER, 0, 0, 0, 4, SRC | 8, 0, 1), "flags 0x9 has bits other than"),
    "both-local": (lambda ref: RECORD.pack(0, 64, 0, 0, 0, 0, 4, 0, 0, 1), "both sides are local"),
    "reserved": (lambda ref: RECORD.pack(ref, 0, PEER, 0, 0, 0, 4, SRC, 1 << 40, 1), "reserved is 0x10000000000"),
    "local-domain": (lambda ref: RECORD.pack(ref, 0, PEER, 9, 0, 0, 4, SRC, 0, 1), "names domain 9"),
    "local-page-offset": (lambda ref: RECORD.pack(ref, 0, PEER, 0, 0, 3, 4, SRC, 0, 1), "page offset 3"),
    "beyond-the-buffer": (lambda ref: into_buffer(ref, 4 * PAGE_SIZE - 2, 4), "outside its 16384-byte copy buffer"),
    "offset-far-beyond": (lambda ref: into_buffer(ref, 2**32 - 1, 4), "range 4294967295..4294967299"),
    "crosses-the-page": (lambda ref: into_buffer(ref, 0, 8, page_offset=PAGE_SIZE - 4), "cross the page boundary"),
    "longer-than-a-page": (lambda ref: into_buffer(ref, 0, 0xFFFF), "65535 bytes at offset 0 cross the page"),
    "foreign-dest-crosses": (lambda ref: from_buffer(0, ref, 16, page_offset=PAGE_SIZE - 1), "cross the page boundary"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_record_fails_the_call_naming_it(core: Core, ring: ClientRing, case: Any) -> None:
    make, fragment = case
    granted = core.grant(1)
    with closing_maps(peer := peer_view(granted)):
        peer[0:4] = b"page"
        ring.write(6, into_buffer(granted.refs[0], 0, 4), make(granted.refs[0]))
        await refused(ring.submit(6, 2), errno.EINVAL, "ring record 7: ")
        error = await refused(ring.submit(7, 1), errno.EINVAL, fragment)
        assert error.operation == "gntdev submit copy ring"
        # Nothing of the batch was copied, no status written; the ring goes on.
        assert ring.buffer[0:4] == bytes(4)
        assert ring.statuses(6, 2) == [STATUS_PENDING, 1]
        assert (await ring.submit(6, 1)).succeeded == 1
        assert ring.buffer[0:4] == b"page"


# The same rules for a GrantCopy segment and a ring record, written once: the
# same malformed copy gets the same refusal either way.
SAME_RULES = {
    "unknown-flags": (
        lambda ref, buffer_id: dict(source=dict(foreign=(ref, 0)), dest=dict(virt=(buffer_id, 0)), len=4, flags=SRC | 8),
        lambda ref: RECORD.pack(ref, 0, PEER, 0, 0, 0, 4, SRC | 8, 0, 1),
        "flags 0x9 has bits other than GNTCOPY_source_gref and GNTCOPY_dest_gref",
    ),
    "crosses-the-page": (
        lambda ref, buffer_id: dict(source=dict(foreign=(ref, PAGE_SIZE - 4)), dest=dict(virt=(buffer_id, 0)), len=8, flags=SRC),
        lambda ref: into_buffer(ref, 0, 8, page_offset=PAGE_SIZE - 4),
        "8 bytes at offset 4092 cross the page boundary",
    ),
    "beyond-the-buffer": (
        lambda ref, buffer_id: dict(source=dict(foreign=(ref, 0)), dest=dict(virt=(buffer_id, 4 * PAGE_SIZE - 2)), len=4, flags=SRC),
        lambda ref: into_buffer(ref, 4 * PAGE_SIZE - 2, 4),
        "the dest range 16382..16386 is outside its 16384-byte copy buffer",
    ),
}


def _pointer(spec: dict[str, tuple[int, int]]) -> gntdev_pb2.GrantCopyPointer:
    if "foreign" in spec:
        ref, offset = spec["foreign"]
        return gntdev_pb2.GrantCopyPointer(foreign=gntdev_pb2.GrantCopyForeign(ref=ref, offset=offset, domid=PEER))
    buffer_id, offset = spec["virt"]
    return gntdev_pb2.GrantCopyPointer(virt=gntdev_pb2.GrantCopyLocal(buffer_id=buffer_id, offset=offset))


@pytest.mark.parametrize("case", SAME_RULES.values(), ids=SAME_RULES.keys())
async def test_grant_copy_segments_and_ring_records_follow_the_same_rules(core: Core, ring: ClientRing, case: Any) -> None:
    message, record, fragment = case
    granted = core.grant(1)
    spec = message(granted.refs[0], ring.buffer_id)
    segment = gntdev_pb2.GrantCopySegment(
        source=_pointer(spec["source"]), dest=_pointer(spec["dest"]), len=spec["len"], flags=spec["flags"]
    )
    from_message = await refused(
        gntdev.grant_copy(ring.session, gntdev_pb2.GrantCopyRequest(count=1, segments=[segment])), errno.EINVAL
    )
    ring.write(0, record(granted.refs[0]))
    from_ring = await refused(ring.submit(0, 1), errno.EINVAL)
    assert from_message.detail.startswith("segment 0: ") and from_ring.detail.startswith("ring record 0: ")
    assert from_message.detail.removeprefix("segment 0: ") == from_ring.detail.removeprefix("ring record 0: ")
    assert fragment in from_ring.detail


# --------------------------------------------------------------------------- endings


async def test_a_ring_ends_with_its_copy_buffer(core: Core) -> None:
    session = core.session()
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    ring_id, ring = await create_ring(session, buffer_id, 8)
    with closing_maps(buffer, ring):
        await gntdev.unregister_copy_buffer(session, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=buffer_id))
        assert (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES]) == (0, 0)
        request = gntdev_pb2.SubmitCopyRingRequest(ring_id=ring_id, first=0, count=1)
        await refused(copyring.submit_copy_ring(session, request), errno.ENOENT, f"no copy ring {ring_id}")
        assert copyring.copy_rings(session).rings == {}


async def test_a_destroyed_ring_is_no_longer_an_ending_of_its_buffer(core: Core) -> None:
    session = core.session()
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    ring_id, ring = await create_ring(session, buffer_id, 8)
    with closing_maps(buffer, ring):
        await copyring.destroy_copy_ring(session, gntdev_pb2.DestroyCopyRingRequest(ring_id=ring_id))
        assert gntdev.gntdev_state(session).copy_buffers[buffer_id].endings == []


async def test_the_sessions_release_ends_its_rings(core: Core) -> None:
    session = core.session()
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    rings = [await create_ring(session, buffer_id, 8) for _ in range(3)]
    with closing_maps(buffer, *(memory for _, memory in rings)):
        state = copyring.copy_rings(session)
        kept = list(state.rings.values())
        session.release()
        assert state.rings == {} and all(ring.memory.closed for ring in kept)
        assert session.user.empty
    # (the fixture checks that no descriptor stayed open)


async def test_a_doorbell_names_only_the_domains_the_policy_lets_the_session_name(core: Core) -> None:
    # The policy's check of the domains a grant copy names applies to the ring's records too.
    from grant_broker.core.policy import DomainGrant, Policy
    from grant_broker_protocol.fdchannel import PeerCredentials

    user = 1000
    registry = core.new_registry(Policy(remote_domains=(DomainGrant.parse(f"{user}:4"),)))
    channel, _ = core.channel()
    try:
        session = registry.open(channel, PeerCredentials(os.getpid(), user, user), "narrowed", SELF, None)
    except BaseException:
        channel.close()
        raise
    granted = core.grant(1)
    buffer_id, buffer = await register_buffer(session, PAGE_SIZE)
    ring_id, ring = await create_ring(session, buffer_id, 4)
    with closing_maps(buffer, ring):
        client = ClientRing(session, buffer_id, ring_id, 4, ring, buffer)
        client.write(0, into_buffer(granted.refs[0], 0, 8, domid=4), into_buffer(granted.refs[0], 8, 8))
        await refused(client.submit(0, 2), errno.EPERM, "may not copy with grants of domain 2")
        assert client.statuses(0, 2) == [STATUS_PENDING] * 2
        response = await client.submit(0, 1)  # domain 4 may be named (it has no such grant: a status)
        assert response.failed == 1


# --------------------------------------------------------------------------- batches: columns, runs

# A doorbell's records are decoded and checked as columns, and fall back to
# the record-by-record checks only to name a malformed record; the emulated
# device claims and copies them per run.  These tests hold the column paths
# to the record-by-record ones.


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_record_in_the_middle_of_a_batch_is_named(core: Core, ring: ClientRing, case: Any) -> None:
    make, fragment = case
    granted = core.grant(4)
    with closing_maps(peer := peer_view(granted)):
        peer[:] = bytes(range(256)) * (4 * PAGE_SIZE // 256)
        records = [into_buffer(granted.refs[i % 4], (i % 4) * PAGE_SIZE) for i in range(16)]
        records[9] = make(granted.refs[0])
        ring.write(0, *records)
        error = await refused(ring.submit(0, 16), errno.EINVAL, "ring record 9: ")
        assert fragment in error.detail
        assert ring.buffer[:] == bytes(4 * PAGE_SIZE)  # nothing of the batch copied
        assert ring.statuses() == [STATUS_PENDING] * 16
        ring.write(9, records[8])
        assert (await ring.submit(0, 16)).succeeded == 16  # the ring goes on
        assert ring.buffer[:] == peer[:]


async def test_a_batch_of_both_directions_and_refused_grants_copies_each_record(core: Core, ring: ClientRing) -> None:
    """Mixed flags, a ref not granted, a domain that does not exist, a grant of
    another domain, and page-internal pieces: each record its status, the others copied."""
    granted = core.grant(4)
    other = core.grant(1, to=7)  # granted to domain 7, not to the session's
    with closing_maps(peer := peer_view(granted)):
        peer[:] = bytes(range(256)) * (4 * PAGE_SIZE // 256)
        ring.buffer[3 * PAGE_SIZE : 3 * PAGE_SIZE + 16] = b"from the buffer!"
        ref = granted.refs
        ring.write(
            0,
            into_buffer(ref[0], 0),
            into_buffer(ref[1], PAGE_SIZE, 100, page_offset=7),
            into_buffer(9999, 2 * PAGE_SIZE, 8),  # not granted
            into_buffer(ref[2], 2 * PAGE_SIZE + 8, 8, domid=77),  # no such domain
            into_buffer(other.refs[0], 2 * PAGE_SIZE + 16, 8),  # granted to another domain
            from_buffer(3 * PAGE_SIZE, ref[3], 16, page_offset=32),
            into_buffer(ref[2], 2 * PAGE_SIZE + 64, 16, page_offset=16),
        )
        response = await ring.submit(0, 7)
        assert (response.succeeded, response.failed) == (4, 3)
        assert ring.statuses(0, 7) == [GNTST_okay, GNTST_okay, GNTST_general_error, GNTST_bad_domain, GNTST_general_error,
                                       GNTST_okay, GNTST_okay]
        assert ring.buffer[0:PAGE_SIZE] == peer[0:PAGE_SIZE]
        assert ring.buffer[PAGE_SIZE : PAGE_SIZE + 100] == peer[PAGE_SIZE + 7 : PAGE_SIZE + 107]
        assert ring.buffer[2 * PAGE_SIZE : 2 * PAGE_SIZE + 24] == bytes(24)
        assert peer[3 * PAGE_SIZE + 32 : 3 * PAGE_SIZE + 48] == b"from the buffer!"
        assert ring.buffer[2 * PAGE_SIZE + 64 : 2 * PAGE_SIZE + 80] == peer[2 * PAGE_SIZE + 16 : 2 * PAGE_SIZE + 32]


_FIELD_VALUES = {
    "at": [0, 1, PAGE_SIZE - 1, PAGE_SIZE, 3 * PAGE_SIZE, 4 * PAGE_SIZE - 1, 4 * PAGE_SIZE, 2**32 - 1],
    "domid": [0, 0, 2, 0xFFFF],
    "offset": [0, 0, 1, PAGE_SIZE - 1, PAGE_SIZE, 0xFFFF],
    "length": [0, 1, 100, PAGE_SIZE, PAGE_SIZE + 1, 0xFFFF],
    "flags": [SRC, DST, SRC | DST, 0, SRC | 8],
    "reserved": [0, 0, 0, 1, 1 << 40],
}


def _random_records(rng: Any, count: int) -> bytes:
    """Records near every bound: a clean batch half of the time, else one with
    some records drawn from the edge values of each field."""
    pick = _FIELD_VALUES
    same_flags = rng.choice([SRC, SRC, DST, SRC | DST, 0, SRC | 8]) if rng.random() < 0.8 else None
    clean = rng.random() < 0.5
    records = []
    for _ in range(count):
        flags = same_flags if same_flags is not None else rng.choice(pick["flags"])
        if clean or rng.random() < 0.8:  # well-formed sides (if the flags are)
            length = rng.choice([0, 1, 100, PAGE_SIZE])
            sides = []
            for gref in (SRC, DST):
                if flags & gref:
                    sides.append((rng.randrange(2**32), rng.choice([0, 2, 0xFFFF]), rng.randrange(PAGE_SIZE - length + 1)))
                else:
                    sides.append((rng.randrange(4 * PAGE_SIZE - length + 1), 0, 0))
            (source, source_domid, source_offset), (dest, dest_domid, dest_offset) = sides
            fields = [source, dest, source_domid, dest_domid, source_offset, dest_offset, length]
            reserved = 0
        else:
            fields = [rng.choice(pick[name]) for name in ("at", "at", "domid", "domid", "offset", "offset", "length")]
            reserved = rng.choice(pick["reserved"])
        records.append(RECORD.pack(*fields, flags, reserved, STATUS_PENDING))
    return b"".join(records)


def test_the_column_checks_agree_with_the_record_by_record_checks() -> None:
    """Whatever the records, checking them as columns and record by record gives
    the same segments, or the same refusal naming the same record."""
    import random

    rng = random.Random(2024)
    view = memoryview(bytearray(4 * PAGE_SIZE))
    passed = refused_count = 0
    for _ in range(3000):
        records = _random_records(rng, rng.choice([1, 2, 5, 16]))
        first = rng.randrange(8)
        try:
            expected: Any = copyring._check_records("op", first, records, view)
        except BrokerError as exc:
            expected = (exc.errno, exc.detail)
        try:
            got: Any = list(copyring._segments("op", first, records, view))
        except BrokerError as exc:
            got = (exc.errno, exc.detail)
        assert got == expected, records
        if isinstance(got, list):
            passed += 1
        else:
            refused_count += 1
    assert passed > 300 and refused_count > 300, (passed, refused_count)


async def test_the_device_copies_a_batch_as_it_copies_its_segments_one_by_one(core: Core) -> None:
    """The emulated device's work over a batch's columns (runs, one copy per
    contiguous stretch) against the same segments as a list."""
    import random

    from grant_broker.backend.contract import GrantCopyBatch

    session = core.session()
    device = session.gntdev
    granted = core.grant(8)
    readonly = core.grant(2, writable=False)
    refs = granted.refs + readonly.refs + [9999]
    rng = random.Random(7)
    with closing_maps(peer := peer_view(granted)):
        for _ in range(300):
            flags = rng.choice([SRC, DST])
            count = rng.choice([1, 3, 8, 16])
            start_ref = rng.randrange(len(granted.refs))
            contiguous = rng.random() < 0.5
            columns: dict[str, list[int]] = {name: [] for name in ("ref", "offset", "domid", "local", "length")}
            for i in range(count):
                if contiguous:
                    ref, offset, length, local = granted.refs[(start_ref + i) % 8], 0, PAGE_SIZE, (i * PAGE_SIZE) % (8 * PAGE_SIZE)
                else:
                    length = rng.choice([0, 1, 64, PAGE_SIZE])
                    ref, offset = rng.choice(refs), rng.randrange(PAGE_SIZE - length + 1)
                    local = rng.randrange(8 * PAGE_SIZE - length + 1)
                columns["ref"].append(ref)
                columns["offset"].append(offset)
                columns["domid"].append(rng.choice([PEER, PEER, PEER, 77]) if not contiguous else PEER)
                columns["local"].append(local)
                columns["length"].append(length)
            zeros = [0] * count
            results = []
            for as_batch in (True, False):
                peer[:] = bytes(range(256)) * (8 * PAGE_SIZE // 256)
                buffer = bytearray(bytes(range(255, -1, -1)) * (8 * PAGE_SIZE // 256))
                view = memoryview(buffer)
                if flags == SRC:
                    batch = GrantCopyBatch(view, [flags] * count, columns["ref"], columns["local"], columns["domid"], zeros,
                                           columns["offset"], zeros, columns["length"])
                else:
                    batch = GrantCopyBatch(view, [flags] * count, columns["local"], columns["ref"], zeros, columns["domid"],
                                           zeros, columns["offset"], columns["length"])
                statuses = device.grant_copy(batch if as_batch else list(batch))
                view.release()
                results.append((statuses, bytes(buffer), bytes(peer)))
            assert results[0] == results[1]
