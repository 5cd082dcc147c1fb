"""Grant copy through a shared ring: ``CreateCopyRing``, ``SubmitCopyRing``, ``DestroyCopyRing``.

A GrantCopy call carries its segments as messages: for a megabyte in pages,
hundreds of them to encode, send and decode per call.  A copy ring is memory
both sides map instead — a memfd the broker makes, of fixed-size records laid
out in :mod:`grant_broker_protocol.copyring` — so that a batch costs the
client a few stores and the broker one small doorbell frame (see
``gntdev.proto``, "Copy rings").

The ring is the client's to change at any time, also while the broker reads
it.  So the broker

* reads the doorbell's records out of the ring **once**, as one ``bytes``
  copy, and looks only at that copy: a record the client rewrites meanwhile
  is either the old one or the new one, never half-checked;
* trusts no index: ``first``/``count`` are checked against the ring, every
  record's sides against the ring's copy buffer and the page, by the same
  rules as a GrantCopy segment (:func:`~grant_broker.core.operations.gntdev.check_copy_segment`
  and its two siblings: no rule is written twice), and the domains the
  records name against the broker's policy (``check_copy_peers``, as a
  GrantCopy's);
* bounds the work of a doorbell by the ring's size (at most
  :data:`~grant_broker_protocol.copyring.MAX_RING_ENTRIES` records of at most
  a page each, the bound of a GrantCopy call) and performs it in one backend
  grant copy;
* fails only the call for a malformed record (EINVAL naming it) — nothing
  is copied and no status written then;
* writes nothing into the ring but the statuses of the doorbell's records.

The ring's memfd is sealed against shrinking and growing (and against new
seals) before anyone else has it: nobody can truncate it under the broker's
mapping (SIGBUS).  A ring counts as one descriptor held (its mapping keeps
one) and as its bytes of copy-buffer memory; a session has at most
:data:`MAX_COPY_RINGS_PER_SESSION`.  A ring ends with DestroyCopyRing, with
its copy buffer, or with the session.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from grant_broker.backend.contract import CopyForeign, CopyLocal, GrantCopyBatch, GrantCopySegment
from grant_broker.core import audit
from grant_broker.core.budgets import COPY_BUFFER_BYTES, FDS_HELD
from grant_broker.core.checks import invalid
from grant_broker.core.operations.gntdev import (
    _CopyBuffer,
    check_copy_peers,
    check_copy_segment,
    copy_columns_pass,
    copy_foreign,
    copy_local,
    gntdev_state,
)
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
from grant_broker_protocol.abi import GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_okay
from grant_broker_protocol.copyring import (
    MAX_RING_ENTRIES,
    RECORD_SIZE,
    REQUEST,
    decode_records,
    ring_bytes,
    write_statuses,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.v1 import common_pb2, gntdev_pb2

MAX_COPY_RINGS_PER_SESSION = 8
RING_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
WHERE = "ring record"  # how an error names a record: "ring record 17: ..."


@dataclass(eq=False)
class _Ring:
    buffer: _CopyBuffer
    entries: int
    memory: mmap.mmap
    ending: Callable[[], object]  # listed in buffer.endings while the ring lives
    words: memoryview = field(init=False)  # the ring as 32-bit words: where the statuses are written

    def __post_init__(self) -> None:
        self.words = memoryview(self.memory).cast("i")

    def close(self) -> None:
        self.words.release()
        self.memory.close()


@dataclass(eq=False)
class CopyRings:
    """The copy rings of one session, by id."""

    session: Session
    rings: dict[int, _Ring] = field(default_factory=dict)

    def end(self, ring_id: int) -> None:
        """Unmap ring *ring_id* and give back what it counted; nothing if it is gone already."""
        ring = self.rings.pop(ring_id, None)
        if ring is None:
            return
        ring.close()
        self.session.credit(COPY_BUFFER_BYTES, ring_bytes(ring.entries))
        self.session.credit(FDS_HELD)

    def close(self) -> None:
        """Session release: every ring ends."""
        for ring_id in list(self.rings):
            self.end(ring_id)


def copy_rings(session: Session) -> CopyRings:
    return session.service_state("copy rings", lambda: CopyRings(session))


# --------------------------------------------------------------------------- operations


async def create_copy_ring(
    session: Session, request: gntdev_pb2.CreateCopyRingRequest
) -> Reply[gntdev_pb2.CreateCopyRingResponse]:
    op = "gntdev create copy ring"
    buffer = gntdev_state(session).copy_buffers.get(request.buffer_id)
    if buffer is None:
        raise BrokerError(errno.ENOENT, op, f"no copy buffer {request.buffer_id} in this session")
    entries = request.entries
    if not 0 < entries <= MAX_RING_ENTRIES:
        raise invalid(op, f"entries {entries} is not between 1 and {MAX_RING_ENTRIES}")
    rings = copy_rings(session)
    if len(rings.rings) >= MAX_COPY_RINGS_PER_SESSION:
        raise audit.refused(
            session, BrokerError(errno.EDQUOT, op, f"this session has {len(rings.rings)} copy rings, the most allowed")
        )
    size = ring_bytes(entries)
    session.charge(op, COPY_BUFFER_BYTES, size)
    try:
        session.charge(op, FDS_HELD)  # the ring's mapping keeps a descriptor
        try:
            fd, memory = _make_ring(op, size)
        except BaseException:
            session.credit(FDS_HELD)
            raise
    except BaseException:
        session.credit(COPY_BUFFER_BYTES, size)
        raise
    ring_id = gntdev_state(session).next_id()
    ring = _Ring(buffer, entries, memory, lambda: rings.end(ring_id))
    rings.rings[ring_id] = ring
    buffer.endings.append(ring.ending)
    response = gntdev_pb2.CreateCopyRingResponse(
        fd=common_pb2.FdRef(index=0), ring_id=ring_id, entries=entries, record_size=RECORD_SIZE
    )
    return Reply(response, [fd])


async def submit_copy_ring(
    session: Session, request: gntdev_pb2.SubmitCopyRingRequest
) -> Reply[gntdev_pb2.SubmitCopyRingResponse]:
    """The doorbell: perform records [first, first + count) and post their statuses."""
    op = "gntdev submit copy ring"
    ring = _ring_at(op, session, request.ring_id)
    first, count, entries = request.first, request.count, ring.entries
    if count == 0 or first + count > entries:
        raise invalid(
            op,
            f"records {first}..{first + count} are not a batch of the ring's {entries} records "
            f"(count must be 1..{max(entries - first, 0)} from record {first})",
        )
    start = first * RECORD_SIZE
    records = ring.memory[start : start + count * RECORD_SIZE]  # the one read of the ring: a copy
    view = memoryview(ring.buffer.memory)
    try:
        segments = _segments(op, first, records, view)
        check_copy_peers(session, op, segments)
        statuses = session.gntdev.grant_copy(segments)
    finally:
        # The segments' view pins the buffer's mmap: release it so that an
        # unregister (or the session's end) can unmap it.
        view.release()
    write_statuses(ring.words, first, statuses)
    succeeded = statuses.count(GNTST_okay)
    return Reply(gntdev_pb2.SubmitCopyRingResponse(succeeded=succeeded, failed=count - succeeded))


async def destroy_copy_ring(
    session: Session, request: gntdev_pb2.DestroyCopyRingRequest
) -> Reply[gntdev_pb2.DestroyCopyRingResponse]:
    op = "gntdev destroy copy ring"
    ring = _ring_at(op, session, request.ring_id)
    ring.buffer.endings.remove(ring.ending)
    copy_rings(session).end(request.ring_id)
    return Reply(gntdev_pb2.DestroyCopyRingResponse())


# --------------------------------------------------------------------------- helpers


def _ring_at(op: str, session: Session, ring_id: int) -> _Ring:
    ring = copy_rings(session).rings.get(ring_id)
    if ring is None:
        raise BrokerError(errno.ENOENT, op, f"no copy ring {ring_id} in this session")
    return ring


def _make_ring(op: str, size: int) -> tuple[OwnedFd, mmap.mmap]:
    """A sealed memfd of *size* bytes and the broker's read-write mapping of it."""
    try:
        fd = OwnedFd(os.memfd_create("grant-broker-copy-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        try:
            os.ftruncate(fd.fileno(), size)
            fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, RING_SEALS)
            memory = mmap.mmap(fd.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            fd.close()
            raise
    except OSError as exc:
        # Out of descriptors or memory: the broker's state, not the client's fault.
        raise BrokerError(exc.errno or errno.ENOMEM, op, f"the broker cannot make a copy ring now: {exc.strerror}") from None
    return fd, memory


def _segments(op: str, first: int, records: bytes, view: memoryview) -> GrantCopyBatch:
    """The doorbell's records (the copy read from the ring) as a checked batch.

    The hot path of the ring, without Python per record: the records decoded
    into columns at once (:func:`~grant_broker_protocol.copyring.decode_records`),
    and the rules checked over whole columns — the shared segment rules by
    :func:`~grant_broker.core.operations.gntdev.copy_columns_pass`, the
    ring's own here: ``reserved`` is 0, and a local side's domain and page
    offset (unused) are 0.  When a column says no (or the records' flags
    differ), :func:`_check_records` checks record by record with the
    per-segment functions: it names the first malformed record, as it always
    did.  The format's field widths already bound lengths, page offsets and
    domains to 16 bits."""
    columns = decode_records(records)
    batch = GrantCopyBatch(
        view,
        columns.flags,
        columns.source,
        columns.dest,
        columns.source_domid,
        columns.dest_domid,
        columns.source_offset,
        columns.dest_offset,
        columns.length,
    )
    if not (
        copy_columns_pass(batch)
        and not any(columns.reserved_low)
        and not any(columns.reserved_high)
        and (columns.flags[0] & GNTCOPY_source_gref or not (any(columns.source_domid) or any(columns.source_offset)))
        and (columns.flags[0] & GNTCOPY_dest_gref or not (any(columns.dest_domid) or any(columns.dest_offset)))
    ):
        _check_records(op, first, records, view)  # raises for a malformed record
    return batch


def _check_records(op: str, first: int, records: bytes, view: memoryview) -> list[GrantCopySegment]:
    """The records checked one by one, as segments: EINVAL naming the first
    malformed one (one unpack per record, the shared segment checks)."""
    segments: list[GrantCopySegment] = []
    append = segments.append
    for slot, (source_at, dest_at, source_domid, dest_domid, source_offset, dest_offset, length, flags, reserved) in enumerate(
        REQUEST.iter_unpack(records), first
    ):
        check_copy_segment(op, WHERE, slot, length, flags)
        if reserved:
            raise invalid(op, f"{WHERE} {slot}: reserved is {reserved:#x}; it must be 0")
        source: CopyLocal | CopyForeign
        dest: CopyLocal | CopyForeign
        if flags & GNTCOPY_source_gref:
            source = copy_foreign(op, WHERE, slot, "source", source_at, source_offset, source_domid, length)
        elif source_domid or source_offset:
            raise _unused(op, slot, "source", source_domid, source_offset)
        else:
            source = copy_local(op, WHERE, slot, "source", view, "copy buffer", source_at, length)
        if flags & GNTCOPY_dest_gref:
            dest = copy_foreign(op, WHERE, slot, "dest", dest_at, dest_offset, dest_domid, length)
        elif dest_domid or dest_offset:
            raise _unused(op, slot, "dest", dest_domid, dest_offset)
        else:
            dest = copy_local(op, WHERE, slot, "dest", view, "copy buffer", dest_at, length)
        append(GrantCopySegment(source, dest, length))
    return segments


def _unused(op: str, slot: int, name: str, domid: int, page_offset: int) -> BrokerError:
    return invalid(
        op,
        f"{WHERE} {slot}: the {name} is local (its GNTCOPY_{name}_gref is clear) but names domain {domid} "
        f"and page offset {page_offset}; both must be 0",
    )
