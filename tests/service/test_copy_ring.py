"""Grant copy through a shared ring, through real sockets (both transports).

Domain 1 shares pages (gntalloc); domain 2 copies between them and its copy
buffer through a ring (``session.gntdev.copy_ring``).  The hostile tests
drive the protocol by hand: the ring is the client's memory, and a client may
write anything into it, at any time.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import mmap
import os
import random
import threading
from collections.abc import AsyncIterator

import grpc
import pytest

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE
from grant_broker.core.budgets import COPY_BUFFER_BYTES, FDS_HELD
from grant_broker.core.operations.copyring import MAX_COPY_RINGS_PER_SESSION
from grant_broker.uapi.grant_table import GNTST_bad_domain, GNTST_general_error, GNTST_okay
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.gntdev import CopyBuffer, CopySegment, Foreign, Local
from grant_broker_protocol.abi import GNTCOPY_dest_gref, GNTCOPY_source_gref
from grant_broker_protocol.copyring import RECORD, RECORD_SIZE, STATUS_PENDING, MAX_RING_ENTRIES
from grant_broker_protocol.fds import open_fd_count
from grant_broker_protocol.v1 import gntdev_pb2

from .conftest import BrokerProcess, InProcessBroker

SHARER, MAPPER = 1, 2
PAGES = 8


@pytest.fixture
async def sharer(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER, client_name="sharer") as session:
        yield session


@pytest.fixture
async def mapper(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=MAPPER, client_name="mapper") as session:
        yield session


def pattern(page: int) -> bytes:
    return bytes((page * 7 + i) % 251 for i in range(PAGE_SIZE))


# --------------------------------------------------------------------------- the protocol by hand


class RawRing:
    """A ring made with the raw calls; the test writes the records itself."""

    def __init__(self, session: Session, ring_id: int, entries: int, memory: mmap.mmap) -> None:
        self.session = session
        self.ring_id = ring_id
        self.entries = entries
        self.memory = memory

    @classmethod
    async def create(cls, session: Session, buffer: CopyBuffer, entries: int) -> "RawRing":
        response = await session.call(
            session.gntdev._stub.CreateCopyRing,
            gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer.buffer_id, entries=entries),
        )
        (fd,) = await session.receive_fds(response.fd_transfer, 1)
        with fd:
            memory = mmap.mmap(fd.fileno(), entries * RECORD_SIZE)
        return cls(session, response.ring_id, entries, memory)

    def write(self, slot: int, *records: bytes) -> None:
        data = b"".join(records)
        self.memory[slot * RECORD_SIZE : slot * RECORD_SIZE + len(data)] = data

    def status(self, slot: int) -> int:
        return int(RECORD.unpack_from(self.memory, slot * RECORD_SIZE)[-1])

    async def submit(self, first: int, count: int) -> gntdev_pb2.SubmitCopyRingResponse:
        response: gntdev_pb2.SubmitCopyRingResponse = await self.session.call(
            self.session.gntdev._stub.SubmitCopyRing,
            gntdev_pb2.SubmitCopyRingRequest(ring_id=self.ring_id, first=first, count=count),
        )
        return response

    async def destroy(self) -> None:
        await self.session.call(
            self.session.gntdev._stub.DestroyCopyRing, gntdev_pb2.DestroyCopyRingRequest(ring_id=self.ring_id)
        )

    def close(self) -> None:
        self.memory.close()


def into_buffer(ref: int, buffer_offset: int, length: int = PAGE_SIZE, *, page_offset: int = 0, domid: int = SHARER) -> bytes:
    """A record copying from a granted page into the copy buffer."""
    return RECORD.pack(ref, buffer_offset, domid, 0, page_offset, 0, length, GNTCOPY_source_gref, 0, STATUS_PENDING)


def from_buffer(buffer_offset: int, ref: int, length: int = PAGE_SIZE, *, domid: int = SHARER) -> bytes:
    """A record copying from the copy buffer into a granted page."""
    return RECORD.pack(buffer_offset, ref, 0, domid, 0, 0, length, GNTCOPY_dest_gref, 0, STATUS_PENDING)


async def expect_error(call: object, code: int, fragment: str = "") -> BrokerClientError:
    with pytest.raises(BrokerClientError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.errno == code, str(raised.value)
    assert fragment in str(raised.value), str(raised.value)
    return raised.value


# --------------------------------------------------------------------------- copying


async def test_a_ring_copies_granted_pages_into_the_buffer_and_back(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, PAGES) as pages, await mapper.gntdev.copy_buffer(
        PAGES * PAGE_SIZE
    ) as buffer, await mapper.gntdev.copy_ring(buffer, entries=PAGES) as ring:
        for page in range(PAGES):
            pages.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = pattern(page)
        statuses = await ring.submit(
            [CopySegment(Foreign(SHARER, ref), Local(buffer, i * PAGE_SIZE), PAGE_SIZE) for i, ref in enumerate(pages.refs)]
        )
        assert statuses == [GNTST_okay] * PAGES
        assert bytes(buffer.view) == bytes(pages.view)
        # And back, into the pages in reverse order, at an offset within each page.
        buffer.view[:] = bytes(reversed(bytes(buffer.view)))
        statuses = await ring.submit(
            [
                CopySegment(Local(buffer, i * PAGE_SIZE + 100), Foreign(SHARER, ref, 50), 200)
                for i, ref in enumerate(reversed(pages.refs))
            ]
        )
        assert statuses == [GNTST_okay] * PAGES
        for i in range(PAGES):
            page = PAGES - 1 - i
            assert bytes(pages.view[page * PAGE_SIZE + 50 : page * PAGE_SIZE + 250]) == bytes(
                buffer.view[i * PAGE_SIZE + 100 : i * PAGE_SIZE + 300]
            )


async def test_each_record_has_its_own_status(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages, await sharer.gntalloc.share(
        MAPPER, 1, writable=False
    ) as read_only, await mapper.gntdev.copy_buffer(PAGE_SIZE) as buffer, await mapper.gntdev.copy_ring(buffer) as ring:
        pages.view[0:5] = b"grant"
        buffer.view[100:105] = b"local"
        statuses = await ring.submit(
            [
                CopySegment(Foreign(SHARER, pages.refs[0]), Local(buffer, 0), 5),
                CopySegment(Foreign(SHARER, 3999), Local(buffer, 10), 4),  # not granted to MAPPER
                CopySegment(Foreign(77, pages.refs[0]), Local(buffer, 20), 4),  # no such domain
                CopySegment(Local(buffer, 100), Foreign(SHARER, read_only.refs[0]), 5),  # read-only dest
                CopySegment(Local(buffer, 100), Foreign(SHARER, pages.refs[0], 10), 5),
            ]
        )
        assert statuses == [GNTST_okay, GNTST_general_error, GNTST_bad_domain, GNTST_general_error, GNTST_okay]
        assert bytes(buffer.view[0:5]) == b"grant" and bytes(buffer.view[10:30]) == bytes(20)
        assert bytes(pages.view[10:15]) == b"local" and bytes(read_only.view[0:5]) == bytes(5)


async def test_submits_in_flight_at_once_use_disjoint_slots(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, PAGES) as pages, await mapper.gntdev.copy_buffer(
        PAGES * PAGE_SIZE
    ) as buffer, await mapper.gntdev.copy_ring(buffer, entries=4) as ring:
        for page in range(PAGES):
            pages.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = pattern(page)
        quarter = PAGE_SIZE // 4

        def page_in(page: int) -> list[CopySegment]:  # one page in 4 segments
            return [
                CopySegment(Foreign(SHARER, pages.refs[page], q * quarter), Local(buffer, page * PAGE_SIZE + q * quarter), quarter)
                for q in range(4)
            ]

        # 6 batches of 2..4 records on a 4-record ring, and one longer than the ring.
        batches = [page_in(page)[:2] for page in range(6)] + [sum((page_in(page) for page in (6, 7)), [])]
        results = await asyncio.gather(*(ring.submit(batch) for batch in batches))
        assert [len(statuses) for statuses in results] == [2] * 6 + [8]
        assert all(status == GNTST_okay for statuses in results for status in statuses)
        for page in range(6):
            assert bytes(buffer.view[page * PAGE_SIZE : page * PAGE_SIZE + 2 * quarter]) == pattern(page)[: 2 * quarter]
        assert bytes(buffer.view[6 * PAGE_SIZE :]) == bytes(pages.view[6 * PAGE_SIZE :])


async def test_a_cancelled_submit_keeps_its_slots_until_the_broker_answered(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages, await mapper.gntdev.copy_buffer(
        2 * PAGE_SIZE
    ) as buffer, await mapper.gntdev.copy_ring(buffer, entries=2) as ring:
        pages.view[:] = pattern(0) + pattern(1)
        segments = [CopySegment(Foreign(SHARER, ref), Local(buffer, i * PAGE_SIZE), PAGE_SIZE) for i, ref in enumerate(pages.refs)]
        cancelled = asyncio.create_task(ring.submit(segments))
        await asyncio.sleep(0)  # the doorbell is on its way
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # The next batch waits for the slots the broker may still be reading.
        swapped = [CopySegment(Foreign(SHARER, ref), Local(buffer, (1 - i) * PAGE_SIZE), PAGE_SIZE) for i, ref in enumerate(pages.refs)]
        assert await asyncio.wait_for(ring.submit(swapped), 10) == [GNTST_okay] * 2
        assert bytes(buffer.view) == pattern(1) + pattern(0)


async def test_the_sdk_refuses_segments_a_ring_cannot_carry(mapper: Session) -> None:
    async with await mapper.gntdev.copy_buffer(PAGE_SIZE) as buffer, await mapper.gntdev.copy_buffer(
        PAGE_SIZE
    ) as other, await mapper.gntdev.copy_ring(buffer) as ring:
        for segment in (
            CopySegment(Foreign(SHARER, 8), Local(other), 4),  # another buffer
            CopySegment(b"inline", Foreign(SHARER, 8)),  # inline bytes
            CopySegment(Foreign(SHARER, 8), None, 4),  # inline dest
            CopySegment(Foreign(SHARER, 8), Local(buffer)),  # no length
            CopySegment(Foreign(SHARER, 8, offset=70000), Local(buffer), 4),  # beyond the record's u16
        ):
            with pytest.raises(ValueError):
                await ring.submit([segment])
        assert await ring.submit([]) == []
    with pytest.raises(ValueError):
        await mapper.gntdev.copy_ring(buffer)  # closed
    with pytest.raises(ValueError):
        await mapper.gntdev.copy_ring(buffer, entries=MAX_RING_ENTRIES + 1)


async def test_the_sdk_names_the_segment_a_ring_cannot_carry_in_a_long_batch(mapper: Session) -> None:
    # The SDK encodes a uniform batch column by column; a segment that does
    # not fit is still named, whichever way the batch was encoded.
    async with await mapper.gntdev.copy_buffer(16 * PAGE_SIZE) as buffer, await mapper.gntdev.copy_buffer(
        PAGE_SIZE
    ) as other, await mapper.gntdev.copy_ring(buffer, entries=16) as ring:
        good = [CopySegment(Foreign(SHARER, 8 + i), Local(buffer, i * PAGE_SIZE), PAGE_SIZE) for i in range(16)]
        for bad, message in (
            (CopySegment(Foreign(SHARER, 8, offset=70000), Local(buffer), 4), "segment 11: a field does not fit"),
            (CopySegment(Foreign(SHARER, -1), Local(buffer), 4), "segment 11: a field does not fit"),
            (CopySegment(Foreign(SHARER, 8), Local(other), 4), "segment 11: a ring's dest is Foreign or Local"),
            (CopySegment(Foreign(SHARER, 8), Local(buffer)), "segment 11: a ring segment needs a length"),
        ):
            with pytest.raises(ValueError, match=message):
                await ring.submit(good[:11] + [bad] + good[12:])


async def test_a_batch_submitted_again_is_copied_again_and_a_changed_one_anew(sharer: Session, mapper: Session) -> None:
    # The SDK reuses the records of the batch it encoded last when the very
    # same segments come again; any other segment is encoded anew.
    async with await sharer.gntalloc.share(MAPPER, PAGES) as pages, await mapper.gntdev.copy_buffer(
        PAGES * PAGE_SIZE
    ) as buffer, await mapper.gntdev.copy_ring(buffer, entries=PAGES) as ring:
        for page in range(PAGES):
            pages.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = pattern(page)
        segments = [CopySegment(Foreign(SHARER, ref), Local(buffer, i * PAGE_SIZE), PAGE_SIZE) for i, ref in enumerate(pages.refs)]
        assert await ring.submit(segments) == [GNTST_okay] * PAGES
        assert bytes(buffer.view) == bytes(pages.view)
        buffer.view[:] = bytes(PAGES * PAGE_SIZE)
        assert await ring.submit(list(segments)) == [GNTST_okay] * PAGES  # the same segments, another list
        assert bytes(buffer.view) == bytes(pages.view)
        changed = list(segments)
        changed[3] = CopySegment(Foreign(SHARER, pages.refs[0]), Local(buffer, 3 * PAGE_SIZE), PAGE_SIZE)
        assert await ring.submit(changed) == [GNTST_okay] * PAGES
        assert bytes(buffer.view[3 * PAGE_SIZE : 4 * PAGE_SIZE]) == pattern(0)
        # Both directions in one batch (encoded segment by segment).
        buffer.view[0:4] = b"back"
        mixed = [
            CopySegment(Local(buffer, 0), Foreign(SHARER, pages.refs[7], 8), 4),
            CopySegment(Foreign(SHARER, pages.refs[1]), Local(buffer, 2 * PAGE_SIZE), PAGE_SIZE),
        ]
        assert await ring.submit(mixed) == [GNTST_okay] * 2
        assert bytes(pages.view[7 * PAGE_SIZE + 8 : 7 * PAGE_SIZE + 12]) == b"back"
        assert bytes(buffer.view[2 * PAGE_SIZE : 3 * PAGE_SIZE]) == pattern(1)


# --------------------------------------------------------------------------- checks


async def test_a_doorbell_outside_the_ring_is_einval(mapper: Session) -> None:
    async with await mapper.gntdev.copy_buffer(PAGE_SIZE) as buffer:
        ring = await RawRing.create(mapper, buffer, 4)
        try:
            for first, count in ((0, 0), (0, 5), (3, 2), (4, 1), (2**32 - 1, 2), (1, 2**32 - 1)):
                await expect_error(ring.submit(first, count), errno.EINVAL, "are not a batch of the ring's 4 records")
            await ring.destroy()
            await expect_error(ring.submit(0, 1), errno.ENOENT, f"no copy ring {ring.ring_id}")
            await expect_error(ring.destroy(), errno.ENOENT)
        finally:
            ring.close()


async def test_a_ring_needs_a_buffer_of_the_session_and_a_size_within_bounds(mapper: Session) -> None:
    stub = mapper.gntdev._stub
    await expect_error(
        mapper.call(stub.CreateCopyRing, gntdev_pb2.CreateCopyRingRequest(buffer_id=999, entries=4)),
        errno.ENOENT, "no copy buffer 999",
    )
    async with await mapper.gntdev.copy_buffer(PAGE_SIZE) as buffer:
        for entries in (0, MAX_RING_ENTRIES + 1):
            await expect_error(
                mapper.call(stub.CreateCopyRing, gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer.buffer_id, entries=entries)),
                errno.EINVAL, f"entries {entries} is not between 1 and {MAX_RING_ENTRIES}",
            )


async def test_malformed_records_fail_the_call_naming_the_record(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages, await mapper.gntdev.copy_buffer(PAGE_SIZE) as buffer:
        pages.view[0:4] = b"page"
        ring = await RawRing.create(mapper, buffer, 8)
        ref = pages.refs[0]
        try:
            pending = STATUS_PENDING
            malformed = {
                "has bits other than": RECORD.pack(ref, 0, SHARER, 0, 0, 0, 4, GNTCOPY_source_gref | 4, 0, pending),
                "both sides are local": RECORD.pack(0, 8, 0, 0, 0, 0, 4, 0, 0, pending),
                "reserved is": RECORD.pack(ref, 0, SHARER, 0, 0, 0, 4, GNTCOPY_source_gref, 1, pending),
                "outside its 4096-byte copy buffer": into_buffer(ref, PAGE_SIZE - 2, 4),
                "cross the page boundary": into_buffer(ref, 0, 8, page_offset=PAGE_SIZE - 4),
                "both must be 0": RECORD.pack(ref, 0, SHARER, 5, 0, 0, 4, GNTCOPY_source_gref, 0, pending),
            }
            for fragment, record in malformed.items():
                # A good record first: nothing of the batch is copied when one is malformed,
                # and no status is written.
                ring.write(2, into_buffer(ref, 0, 4), record)
                await expect_error(ring.submit(2, 2), errno.EINVAL, "ring record 3: ")
                await expect_error(ring.submit(3, 1), errno.EINVAL, fragment)
                assert bytes(buffer.view[0:4]) == bytes(4)
                assert (ring.status(2), ring.status(3)) == (pending, pending)
            # The ring and the session go on.
            ring.write(5, into_buffer(ref, 0, 4))
            response = await ring.submit(5, 1)
            assert (response.succeeded, response.failed) == (1, 0)
            assert ring.status(5) == GNTST_okay and bytes(buffer.view[0:4]) == b"page"
        finally:
            ring.close()


async def test_a_ring_scribbled_on_during_its_batches_fails_only_those_calls(broker: InProcessBroker) -> None:
    async def settle() -> int:
        for _ in range(100):
            await asyncio.sleep(0.01)
            gc.collect()
            if not broker.registry.sessions:
                break
        return open_fd_count()

    baseline = await settle()
    sharer = await grant_broker_client.connect(broker.socket_path, domid=SHARER)
    mapper = await grant_broker_client.connect(broker.socket_path, domid=MAPPER)
    bystander = await grant_broker_client.connect(broker.socket_path, domid=MAPPER)
    pages = await sharer.gntalloc.share(MAPPER, PAGES)
    buffer = await mapper.gntdev.copy_buffer(PAGES * PAGE_SIZE)
    ring = await RawRing.create(mapper, buffer, 64)
    good = [into_buffer(ref, i * PAGE_SIZE) for i, ref in enumerate(pages.refs)] * 8
    rng = random.Random(13)
    outcomes: dict[str, int] = {"performed": 0, "refused": 0}

    async def scribble(stop: asyncio.Event) -> None:
        # Another task of the client rewrites the records while the doorbell is in flight:
        # garbage, a bit flipped in a good record, or good records again.
        while not stop.is_set():
            slot = rng.randrange(64)
            choice = rng.random()
            if choice < 0.4:
                ring.write(slot, rng.randbytes(RECORD_SIZE))
            elif choice < 0.8:
                record = bytearray(good[slot])
                record[rng.randrange(RECORD_SIZE - 4)] ^= 1 << rng.randrange(8)
                ring.write(slot, bytes(record))
            else:
                ring.write(slot, good[slot])
            await asyncio.sleep(0)

    for _ in range(40):
        ring.write(0, *good)
        stop = asyncio.Event()
        scribbler = asyncio.create_task(scribble(stop))
        try:
            response = await ring.submit(0, 64)
            assert response.succeeded + response.failed == 64
            outcomes["performed"] += 1
        except BrokerClientError as exc:
            assert exc.errno == errno.EINVAL and "ring record" in exc.detail, str(exc)
            outcomes["refused"] += 1
        finally:
            stop.set()
            await scribbler
    assert outcomes["refused"] > 0, outcomes  # the scribbling reached the broker's reads
    # The session, its ring and the other sessions go on.
    ring.write(0, *good[:PAGES])
    assert (await ring.submit(0, PAGES)).succeeded == PAGES
    assert (await bystander.describe()).domid == MAPPER
    ring.close()
    await buffer.aclose()
    await pages.aclose()
    for session in (bystander, mapper, sharer):
        await session.close()
    assert await settle() == baseline


async def test_a_ring_scribbled_on_by_a_thread_never_hurts_a_broker_process(broker_process: BrokerProcess) -> None:
    """The broker in a process of its own reads the ring while a thread of the
    client rewrites it without pause: truly at the same time."""

    def broker_fds() -> int:
        return len(os.listdir(f"/proc/{broker_process.process.pid}/fd"))

    async def settle(expected: int) -> int:
        for _ in range(200):
            if broker_fds() == expected:
                break
            await asyncio.sleep(0.02)
        return broker_fds()

    baseline = broker_fds()
    path = broker_process.socket_path
    async with await grant_broker_client.connect(path, domid=SHARER) as sharer, await grant_broker_client.connect(
        path, domid=MAPPER
    ) as mapper:
        async with await sharer.gntalloc.share(MAPPER, PAGES) as pages, await mapper.gntdev.copy_buffer(
            PAGES * PAGE_SIZE
        ) as buffer:
            ring = await RawRing.create(mapper, buffer, 256)
            good = b"".join(into_buffer(ref, i * PAGE_SIZE) for i, ref in enumerate(pages.refs)) * (256 // PAGES)
            stop = threading.Event()

            def scribble() -> None:
                rng = random.Random(7)
                while not stop.is_set():
                    slot = rng.randrange(256)
                    ring.write(slot, rng.randbytes(RECORD_SIZE) if rng.random() < 0.5 else good[slot * 32 : slot * 32 + 32])

            outcomes = {"performed": 0, "refused": 0}
            scribbler = threading.Thread(target=scribble)
            scribbler.start()
            try:
                for _ in range(30):
                    try:
                        response = await ring.submit(0, 256)
                        assert response.succeeded + response.failed == 256
                        outcomes["performed"] += 1
                    except BrokerClientError as exc:
                        assert exc.errno == errno.EINVAL and "ring record" in exc.detail, str(exc)
                        outcomes["refused"] += 1
            finally:
                stop.set()
                scribbler.join()
            assert outcomes["refused"] > 0, outcomes
            ring.write(0, good)
            assert (await ring.submit(0, 256)).succeeded == 256
            ring.close()
    assert broker_process.process.poll() is None
    assert await settle(baseline) == baseline


# --------------------------------------------------------------------------- life


async def test_the_ring_is_a_sealed_memfd_counted_against_the_sessions_budgets(
    broker: InProcessBroker, mapper: Session
) -> None:
    (session,) = [s for s in broker.registry.sessions if s.domid == MAPPER]
    async with await mapper.gntdev.copy_buffer(PAGE_SIZE) as buffer:
        held = (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES])
        ring = await RawRing.create(mapper, buffer, 16)
        try:
            assert (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES]) == (held[0] + 1, held[1] + 16 * RECORD_SIZE)
            response = await mapper.call(
                mapper.gntdev._stub.CreateCopyRing, gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer.buffer_id, entries=1)
            )
            (fd,) = await mapper.receive_fds(response.fd_transfer, 1)
            with fd:
                seals = fcntl.fcntl(fd.fileno(), fcntl.F_GET_SEALS)
                assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == (
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
                )
                with pytest.raises(PermissionError):
                    os.ftruncate(fd.fileno(), 0)
                with pytest.raises(PermissionError):
                    fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            await ring.destroy()
            assert (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES]) == (held[0] + 1, held[1] + RECORD_SIZE)
        finally:
            ring.close()
    # Unregistering the buffer ended its other ring.
    assert (session.held[FDS_HELD], session.held[COPY_BUFFER_BYTES]) == (held[0] - 1, held[1] - PAGE_SIZE)


async def test_rings_per_session_are_bounded(mapper: Session) -> None:
    async with await mapper.gntdev.copy_buffer(PAGE_SIZE) as buffer:
        rings = [await mapper.gntdev.copy_ring(buffer, entries=1) for _ in range(MAX_COPY_RINGS_PER_SESSION)]
        error = await expect_error(mapper.gntdev.copy_ring(buffer, entries=1), errno.EDQUOT, "copy rings")
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await rings[0].aclose()
        async with await mapper.gntdev.copy_ring(buffer, entries=1):
            pass
    # The buffer's close closed its rings.
    assert all(ring.closed for ring in rings)


async def test_a_ring_ends_with_its_buffer(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages:
        buffer = await mapper.gntdev.copy_buffer(PAGE_SIZE)
        ring = await RawRing.create(mapper, buffer, 4)
        try:
            await mapper.call(
                mapper.gntdev._stub.UnregisterCopyBuffer, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=buffer.buffer_id)
            )
            ring.write(0, into_buffer(pages.refs[0], 0, 4))
            await expect_error(ring.submit(0, 1), errno.ENOENT, f"no copy ring {ring.ring_id}")
        finally:
            ring.close()
            await expect_error(buffer.aclose(), errno.ENOENT)  # unmapped here; unregistered by hand above


async def test_the_sessions_end_releases_its_rings(broker: InProcessBroker) -> None:
    async def settle() -> int:
        for _ in range(100):
            await asyncio.sleep(0.01)
            gc.collect()
            if not broker.registry.sessions:
                break
        return open_fd_count()

    baseline = await settle()
    mapper = await grant_broker_client.connect(broker.socket_path, domid=MAPPER)
    buffer = await mapper.gntdev.copy_buffer(PAGE_SIZE)
    rings = [await mapper.gntdev.copy_ring(buffer, entries=64) for _ in range(3)]
    raw = await RawRing.create(mapper, buffer, 4)
    assert open_fd_count() > baseline
    # The client drops everything at once: the session ends.
    await mapper.close()
    raw.close()
    for ring in rings:
        await ring.aclose()  # unmaps here; the broker ended it with the session
    await buffer.aclose()
    assert await settle() == baseline
