"""Mapping other domains' grants through the broker: ``session.gntdev``.

Example — domain 1 shares a page, domain 2 maps it, each sees the other's
writes (on the emulated backend, where a session may choose its domain)::

    import grant_broker_client

    async def share_and_map(socket_path: str) -> None:
        async with await grant_broker_client.connect(socket_path, domid=1) as sharer, \\
                   await grant_broker_client.connect(socket_path, domid=2) as mapper:
            async with await sharer.gntalloc.share(2, 1) as pages:
                pages.view[0:5] = b"hello"
                async with await mapper.gntdev.map([(1, pages.refs[0])]) as mapping:
                    assert bytes(mapping.view[0:5]) == b"hello"
                    mapping.view[0:5] = b"HELLO"
                assert bytes(pages.view[0:5]) == b"HELLO"

    # asyncio.run(share_and_map("/run/grant-broker/broker.sock"))

Hand a mapping to a consumer that maps it itself (an X server, a Wayland
compositor) as one descriptor whose offset 0 is the first page:

>>> async def to_compositor(session, refs) -> None:                     # doctest: +SKIP
...     grant_fd = await session.gntdev.map_to_fd(refs, writable=False)
...     send_to_compositor(grant_fd.fd.fileno(), grant_fd.length)
...     ...                       # the pages stay mapped until:
...     await grant_fd.aclose()

Copy without mapping (the hypervisor copies; each segment has its status):

>>> async def copy(session, domid: int, ref: int) -> bytes:            # doctest: +SKIP
...     results = await session.gntdev.grant_copy([CopySegment(Foreign(domid, ref), None, 512)])
...     results[0].raise_for_status()
...     return results[0].data

Copy many segments at once through a ring shared with the broker (the local
sides are offsets in the ring's copy buffer; one status per segment):

>>> async def read_pages(session, domid: int, refs: list[int]) -> bytes:  # doctest: +SKIP
...     async with await session.gntdev.copy_buffer(len(refs) * 4096) as buffer, \
...                await session.gntdev.copy_ring(buffer, entries=len(refs)) as ring:
...         statuses = await ring.submit(
...             [CopySegment(Foreign(domid, ref), Local(buffer, i * 4096), 4096) for i, ref in enumerate(refs)]
...         )
...         assert statuses == [0] * len(refs)
...         return bytes(buffer.view)

Every call raises :class:`grant_broker_client.BrokerClientError` carrying the
broker's errno (and GNTST status where the hypervisor gave one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import mmap
import operator
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc

from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.memory import SharedMemory
from grant_broker_protocol.abi import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_okay,
    UNMAP_NOTIFY_CLEAR_BYTE,
    UNMAP_NOTIFY_SEND_EVENT,
    GrantRef,
    gntst_message,
    gntst_name,
)
from grant_broker_protocol.copyring import (
    MAX_RING_ENTRIES,
    RECORD,
    RECORD_SIZE,
    STATUS_PENDING,
    encode_records,
    read_statuses,
    ring_bytes,
)
from grant_broker_protocol.v1 import common_pb2, gntdev_pb2, gntdev_pb2_grpc
from grant_broker_client.errors import BrokerClientError
from grant_broker_client.memory import MappedPages, ReceivedSpan, close_spans, map_received, receive_spans

if TYPE_CHECKING:
    from grant_broker_client.session import Session

GrantRefLike = GrantRef | tuple[int, int]
"""A grant to map: a :class:`GrantRef` or a ``(domid, ref)`` pair."""

__all__ = [
    "UNMAP_NOTIFY_CLEAR_BYTE",
    "UNMAP_NOTIFY_SEND_EVENT",
    "CopyBuffer",
    "CopyResult",
    "CopyRing",
    "CopySegment",
    "ExportedDmabuf",
    "Foreign",
    "GntdevClient",
    "GrantFd",
    "GrantRef",
    "GrantRefLike",
    "ImportedDmabuf",
    "Local",
    "Mapping",
]


def _grant_ref(ref: GrantRefLike) -> common_pb2.GrantRef:
    if isinstance(ref, GrantRef):
        return common_pb2.GrantRef(domid=ref.domid, ref=ref.ref)
    domid, number = ref
    return common_pb2.GrantRef(domid=domid, ref=number)


def _packed(refs: Sequence[GrantRefLike], domid: int | None = None) -> tuple[Sequence[int], Sequence[int]]:
    """*refs* as the Map call sends them: ``(domids, refs)``, *domids* of one
    element when every grant is of one domain.  No object per grant: 1024
    GrantRefs cost half a millisecond to make, the transposition below some
    tens of microseconds.  With *domid*, *refs* are plain refs of that domain."""
    refs = refs if isinstance(refs, list | tuple) else list(refs)
    if domid is not None:
        return [domid], refs  # type: ignore[return-value]
    domids: Sequence[int]
    numbers: Sequence[int]
    try:
        # (domid, ref) pairs, the usual form: transposed at C speed; strict=True
        # refuses pairs of differing lengths, the unpacking pairs that are not pairs.
        domids, numbers = zip(*refs, strict=True)
    except (TypeError, ValueError):
        # GrantRef objects, mixed forms, or malformed items (which raise below
        # as GrantRef(*item) would); an empty list gives two empty ones.
        domids, numbers = [], []
        for ref in refs:
            grant = ref if isinstance(ref, GrantRef) else GrantRef(*ref)
            domids.append(grant.domid)
            numbers.append(grant.ref)
    if domids and domids.count(domids[0]) == len(domids):
        domids = domids[:1]
    return domids, numbers


# Given to MappedPages as the refs of a Mapping made from packed refs.
_PACKED: tuple[Any, ...] = tuple([None])


def _grant_refs(domids: Sequence[int], numbers: Sequence[int]) -> tuple[GrantRef, ...]:
    """The grants packed by :func:`_packed`, as GrantRef objects."""
    if len(domids) == 1 and len(numbers) != 1:
        return tuple(map(GrantRef, itertools.repeat(domids[0], len(numbers)), numbers))
    return tuple(map(GrantRef, domids, numbers))


def _fileno(fd: int | OwnedFd) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


# --------------------------------------------------------------------------- mappings


class Mapping(MappedPages):
    """Grants of other domains mapped into this process.

    :attr:`view` is the memory (read-only unless mapped writable).  Close it
    with ``await mapping.aclose()`` (or ``async with``): that unmaps here and
    tells the broker to drop the mapping, which fires its unmap notification.
    Slices of :attr:`view` must be released first (``BufferError`` otherwise).
    """

    _device = "gntdev"

    def __init__(
        self,
        client: "GntdevClient",
        index: int,
        refs: Sequence[GrantRefLike] | None,
        memory: SharedMemory,
        writable: bool,
        *,
        packed: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> None:
        # *packed*: the refs as (domids, refs) (see _packed) instead of *refs*;
        # GrantRef objects are then made only if someone reads :attr:`refs`.
        self._refs: tuple[GrantRef, ...] | None = None
        if packed is not None:
            self._packed = packed
            super().__init__(index, _PACKED, memory, writable)
        elif refs is not None:
            super().__init__(index, tuple(refs), memory, writable)
        else:
            raise TypeError("a Mapping needs its refs, or their packed form")
        self._client = client

    @property
    def refs(self) -> tuple[GrantRef, ...]:
        """The grants mapped, in order."""
        refs = self._refs
        if refs is None:
            refs = self._refs = _grant_refs(*self._packed)
        return refs

    @refs.setter
    def refs(self, refs: tuple[Any, ...]) -> None:
        if refs is _PACKED:
            self._refs = None
        else:
            grants = tuple(ref if isinstance(ref, GrantRef) else GrantRef(*ref) for ref in refs)
            self._packed = _packed(grants)
            self._refs = grants

    @property
    def count(self) -> int:
        """Number of pages."""
        return len(self._packed[1])

    async def set_unmap_notify(self, offset: int, action: int, port: int = 0) -> None:
        """Arm what happens when this mapping goes away (also when this process dies).

        *offset* is a byte within the mapping; ``UNMAP_NOTIFY_CLEAR_BYTE``
        zeroes that byte in the granting domain's page (refused on a read-only
        mapping); ``UNMAP_NOTIFY_SEND_EVENT`` signals *port*, an event channel
        this session bound.  One notification per mapping; a new call replaces it.
        """
        await self._client.set_unmap_notify(self._notify_offset(offset), action, port)

    async def _release(self) -> None:
        self._client._mappings.pop(self.index, None)
        await self._client._unmap_quietly(self.index, self.count)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.length} bytes at {self.address:#x}"
        return f"<Mapping index={self.index} count={self.count} {'rw' if self.writable else 'ro'} {state}>"


class GrantFd:
    """Grants mapped in a gntdev instance of their own, as one descriptor.

    ``mmap(fd, length, MAP_SHARED, offset)`` (offset is 0) gives the pages, in
    any process the descriptor is passed to.  The mapping lives until
    :meth:`aclose` or the end of the session, even after :attr:`fd` is closed.
    """

    def __init__(self, client: "GntdevClient", index: int, count: int, span: ReceivedSpan) -> None:
        self._client = client
        self.index = index
        self.count = count
        self.fd: OwnedFd = span.fd
        self.offset = span.offset
        self.length = span.length
        self.writable = span.writable
        self._closed = False

    async def aclose(self) -> None:
        """Close the descriptor (unless detached) and drop the mapping in the broker."""
        if self._closed:
            return
        self._closed = True
        self.fd.close()
        await self._client._unmap_quietly(self.index, self.count)

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# --------------------------------------------------------------------------- grant copy


class CopyBuffer:
    """Local memory registered once with the broker for grant copies.

    A sealed memfd (it cannot shrink, so the broker's mapping of it is safe),
    mapped here as :attr:`view` and by the broker.  Name parts of it in
    :class:`Local` segments.  ``await buffer.aclose()`` unregisters and unmaps.
    """

    def __init__(self, client: "GntdevClient", buffer_id: int, memory: mmap.mmap) -> None:
        self._client = client
        self.buffer_id = buffer_id
        self._memory = memory
        self.view = memoryview(memory)
        self._closed = False
        self._rings: set[CopyRing] = set()  # end with the buffer

    @property
    def length(self) -> int:
        return len(self._memory)

    async def aclose(self) -> None:
        """Unregister from the broker and unmap here (its copy rings first).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ring in list(self._rings):
            with contextlib.suppress(BrokerClientError):  # the unregister below ends it in the broker anyway
                await ring.aclose()
        self.view.release()
        self._memory.close()
        session = self._client._session
        if not (session.closed or session.broker_lost):
            await session.call(
                self._client._stub.UnregisterCopyBuffer, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=self.buffer_id)
            )

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True)
class Foreign:
    """A grant-copy endpoint in a granted page: byte *offset* of *ref* of *domid*."""

    domid: int
    ref: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Local:
    """A grant-copy endpoint in a registered :class:`CopyBuffer`, at *offset*."""

    buffer: CopyBuffer
    offset: int = 0


@dataclass(frozen=True, slots=True)
class CopySegment:
    """One copy of *length* bytes (``struct gntdev_grant_copy_segment``).

    * *source*: :class:`Foreign`, :class:`Local`, or ``bytes`` sent inline.
    * *dest*: :class:`Foreign`, :class:`Local`, or ``None``: the bytes come
      back in :attr:`CopyResult.data`.
    * *length*: defaults to the length of an inline source.

    One side must be :class:`Foreign`; a foreign side may not cross its page.
    """

    source: Foreign | Local | bytes
    dest: Foreign | Local | None
    length: int | None = None


_source = operator.attrgetter("source")
_dest = operator.attrgetter("dest")
_length = operator.attrgetter("length")
_buffer = operator.attrgetter("buffer")
_ref = operator.attrgetter("ref")
_domid = operator.attrgetter("domid")
_offset = operator.attrgetter("offset")


@dataclass(frozen=True, slots=True)
class CopyResult:
    """A segment's outcome: its ``GNTST_*`` status, and the bytes of an inline dest."""

    status: int
    data: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == GNTST_okay

    @property
    def status_name(self) -> str:
        return gntst_name(self.status)

    def raise_for_status(self, operation: str = "gntdev grant copy") -> None:
        """Raise :class:`grant_broker_protocol.errors.BrokerError` (EIO with the GNTST status)
        unless the segment succeeded.  (Not a BrokerClientError: the call itself succeeded.)"""
        if not self.ok:
            raise BrokerError(errno.EIO, operation, gntst_message(self.status), gntst=self.status)


def _set_pointer(pointer: gntdev_pb2.GrantCopyPointer, end: Foreign | Local | bytes | None, *, source: bool) -> bool:
    """Fill *pointer* (a field of the request, set in place: building
    messages and copying them in costs three times as much for the hundreds
    of segments of a large copy); return whether it is foreign."""
    if isinstance(end, Foreign):
        foreign = pointer.foreign
        foreign.SetInParent()
        foreign.ref = end.ref
        foreign.offset = end.offset
        foreign.domid = end.domid
        return True
    if isinstance(end, Local):
        virt = pointer.virt
        virt.SetInParent()
        virt.buffer_id = end.buffer.buffer_id
        virt.offset = end.offset
        return False
    if end is None and not source:
        pointer.virt.SetInParent()
        return False
    if isinstance(end, bytes | bytearray | memoryview) and source:
        virt = pointer.virt
        virt.SetInParent()  # set even for empty bytes
        virt.data = bytes(end)
        return False
    raise TypeError(f"not a grant-copy {'source' if source else 'dest'}: {end!r}")


class CopyRing:
    """Grant copy through a ring of records shared with the broker, on one :class:`CopyBuffer`.

    :meth:`submit` writes segments into free slots of the ring (the records
    of ``grant_broker_protocol.copyring``), rings the doorbell and reads the
    statuses the broker wrote back: one small call per batch, whatever its
    size.  Several submits may be in flight at once, on disjoint slots (a
    submit waits for free slots); a batch longer than the ring goes as
    several.  Close it with ``await
    ring.aclose()`` (or ``async with``); it also ends with its buffer.
    """

    def __init__(self, client: "GntdevClient", buffer: CopyBuffer, ring_id: int, entries: int, memory: mmap.mmap) -> None:
        self._client = client
        self.buffer = buffer
        self.ring_id = ring_id
        self.entries = entries
        self._memory = memory
        self._words = memoryview(memory).cast("i")
        self._free: list[tuple[int, int]] = [(0, entries)]  # free slots: (first, count), in order
        self._waiters: list[asyncio.Future[None]] = []
        self._calls: set[asyncio.Future[object]] = set()  # doorbells the broker has not answered yet
        self._closed = False
        # The last batch encoded: its segments (frozen objects) and their records.
        self._encoded: tuple[tuple[CopySegment, ...], bytes] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    async def submit(self, segments: Sequence[CopySegment]) -> list[int]:
        """Copy *segments*; return each one's ``GNTST_*`` status (0: copied), in order.

        A segment's sides are :class:`Foreign` or :class:`Local` in this
        ring's buffer, and it needs a length.  The call succeeds when segments
        fail (check each status); a malformed segment fails the batch with
        EINVAL (from the broker) or ValueError (found here), before anything
        of that batch is copied.
        """
        count = len(segments)
        if count <= self.entries:
            return await self._batch(segments) if count else []
        # Longer than the ring: batches of the whole ring, one after the other
        # (a call costs more than its records: few large doorbells are fastest).
        size = self.entries
        batches = [self._batch(segments[at : at + size]) for at in range(0, count, size)]
        statuses: list[int] = []
        for done in await asyncio.gather(*batches):
            statuses += done
        return statuses

    async def _batch(self, segments: Sequence[CopySegment]) -> list[int]:
        records = self._encode(segments)  # before taking slots: a ValueError takes none
        count = len(segments)
        first = await self._take(count)
        released = False
        try:
            start = first * RECORD_SIZE
            self._memory[start : start + len(records)] = records
            client = self._client
            call = asyncio.ensure_future(
                client._session.call(
                    client._stub.SubmitCopyRing,
                    gntdev_pb2.SubmitCopyRingRequest(ring_id=self.ring_id, first=first, count=count),
                )
            )
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            try:
                await asyncio.shield(call)
            except asyncio.CancelledError:
                # The doorbell is on its way and may still be performed: its
                # slots stay taken until the broker has answered it.
                released = True

                def answered(done: asyncio.Future[object]) -> None:
                    if not done.cancelled():
                        done.exception()  # retrieved: nobody awaits it any more
                    self._give(first, count)

                call.add_done_callback(answered)
                raise
            return read_statuses(self._words, first, count)
        finally:
            if not released:
                self._give(first, count)

    def _encode(self, segments: Sequence[CopySegment]) -> bytes:
        """The records of *segments*.  The same segments submitted again (the
        very same objects, which are frozen) reuse the records encoded last."""
        cached = self._encoded
        if cached is not None and len(cached[0]) == len(segments) and all(map(operator.is_, cached[0], segments)):
            return cached[1]
        records = self._encode_columns(segments)
        if records is None:
            records = self._encode_one_by_one(segments)
        self._encoded = (tuple(segments), records)
        return records

    def _encode_columns(self, segments: Sequence[CopySegment]) -> bytes | None:
        """The records of a batch all granted pages into the ring's buffer, or
        all the other way, encoded column by column in one pack; None for any
        other batch, or one with a field that does not fit (then
        :meth:`_encode_one_by_one` encodes it, or names the segment)."""
        count = len(segments)
        sources = list(map(_source, segments))
        dests = list(map(_dest, segments))
        lengths = list(map(_length, segments))
        if None in lengths:
            return None
        source_types, dest_types = set(map(type, sources)), set(map(type, dests))
        if source_types == {Foreign} and dest_types == {Local}:
            foreign, local, flags = sources, dests, GNTCOPY_source_gref
        elif source_types == {Local} and dest_types == {Foreign}:
            foreign, local, flags = dests, sources, GNTCOPY_dest_gref
        else:
            return None
        if not all(map(operator.is_, map(_buffer, local), itertools.repeat(self.buffer))):
            return None
        refs, domids, page_offsets = list(map(_ref, foreign)), list(map(_domid, foreign)), list(map(_offset, foreign))
        local_offsets, zeros = list(map(_offset, local)), [0] * count
        try:
            if flags == GNTCOPY_source_gref:
                return encode_records(refs, local_offsets, domids, zeros, page_offsets, zeros, lengths, [flags] * count)
            return encode_records(local_offsets, refs, zeros, domids, zeros, page_offsets, lengths, [flags] * count)
        except struct.error:
            return None

    def _encode_one_by_one(self, segments: Sequence[CopySegment]) -> bytes:
        buffer, pack = self.buffer, RECORD.pack
        records = []
        for i, segment in enumerate(segments):
            source, dest, length = segment.source, segment.dest, segment.length
            if length is None:
                raise ValueError(f"segment {i}: a ring segment needs a length")
            flags = 0
            if isinstance(source, Foreign):
                flags |= GNTCOPY_source_gref
                source_at, source_domid, source_offset = source.ref, source.domid, source.offset
            elif isinstance(source, Local) and source.buffer is buffer:
                source_at, source_domid, source_offset = source.offset, 0, 0
            else:
                raise ValueError(f"segment {i}: a ring's source is Foreign or Local in the ring's own buffer, not {source!r}")
            if isinstance(dest, Foreign):
                flags |= GNTCOPY_dest_gref
                dest_at, dest_domid, dest_offset = dest.ref, dest.domid, dest.offset
            elif isinstance(dest, Local) and dest.buffer is buffer:
                dest_at, dest_domid, dest_offset = dest.offset, 0, 0
            else:
                raise ValueError(f"segment {i}: a ring's dest is Foreign or Local in the ring's own buffer, not {dest!r}")
            try:
                records.append(
                    pack(source_at, dest_at, source_domid, dest_domid, source_offset, dest_offset, length, flags, 0, STATUS_PENDING)
                )
            except struct.error as exc:
                raise ValueError(f"segment {i}: a field does not fit the ring's record: {exc}") from None
        return b"".join(records)

    async def _take(self, count: int) -> int:
        """The first of *count* free consecutive slots, taken; waits while there are none."""
        while True:
            if self._closed:
                raise BrokerClientError(
                    errno.EBADF, "gntdev copy ring", f"copy ring {self.ring_id} is closed",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                )
            for i, (first, free) in enumerate(self._free):
                if free >= count:
                    if free == count:
                        del self._free[i]
                    else:
                        self._free[i] = (first + count, free - count)
                    return first
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _give(self, first: int, count: int) -> None:
        """Slots [first, first + count) are free again (merged with their free neighbours)."""
        free = self._free
        at = 0
        while at < len(free) and free[at][0] < first:
            at += 1
        free.insert(at, (first, count))
        if at + 1 < len(free) and first + count == free[at + 1][0]:
            free[at] = (first, count + free.pop(at + 1)[1])
        if at > 0 and free[at - 1][0] + free[at - 1][1] == first:
            previous = free.pop(at - 1)
            free[at - 1] = (previous[0], previous[1] + free[at - 1][1])
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        """Wait for the doorbells in flight, destroy the ring in the broker and unmap it here.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # they find the ring closed
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        self.buffer._rings.discard(self)
        try:
            session = self._client._session
            if not (session.closed or session.broker_lost):
                try:
                    await session.call(
                        self._client._stub.DestroyCopyRing, gntdev_pb2.DestroyCopyRingRequest(ring_id=self.ring_id)
                    )
                except BrokerClientError as exc:
                    if exc.errno != errno.ENOENT:  # gone already: its buffer was unregistered
                        raise
        finally:
            self._words.release()
            self._memory.close()

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<CopyRing {self.ring_id} of buffer {self.buffer.buffer_id}: {self.entries} entries{' closed' if self._closed else ''}>"


# --------------------------------------------------------------------------- dma-buf


class ExportedDmabuf:
    """Grants exported as a dma-buf: :attr:`fd` is the buffer (close it once done).

    :meth:`wait_released` waits until every user of the buffer — this
    process's :attr:`fd`, its mmaps, whoever it was passed to — is gone.
    """

    def __init__(self, client: "GntdevClient", fd: OwnedFd, dmabuf_id: int, count: int) -> None:
        self._client = client
        self.fd = fd
        self.dmabuf_id = dmabuf_id
        self.count = count

    async def wait_released(self, timeout_ms: int) -> None:
        """See :meth:`GntdevClient.dmabuf_wait_released`."""
        await self._client.dmabuf_wait_released(self.dmabuf_id, timeout_ms)

    def close(self) -> None:
        """Close this process's descriptor (once)."""
        self.fd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(slots=True)
class ImportedDmabuf:
    """A dma-buf whose pages were granted to another domain: ``refs[i]`` grants page ``i``."""

    client: "GntdevClient"
    dmabuf_id: int
    refs: tuple[int, ...]

    async def release(self) -> None:
        """End the grants (see :meth:`GntdevClient.dmabuf_import_release`)."""
        await self.client.dmabuf_import_release(self.dmabuf_id)


# --------------------------------------------------------------------------- the client


class GntdevClient:
    """``/dev/xen/gntdev`` through the broker.  Use ``session.gntdev``."""

    def __init__(self, session: "Session") -> None:
        self._session = session
        self._stub_instance: gntdev_pb2_grpc.GntdevStub | None = None
        self._mappings: dict[int, Mapping] = {}
        self._one_call_map = True  # until a broker answers Map with UNIMPLEMENTED

    @property
    def _stub(self) -> gntdev_pb2_grpc.GntdevStub:
        # Made on first use, and never on a closed session: grpcio (1.85)
        # hangs or crashes when a stub is built on a closed aio channel.
        if self._stub_instance is None:
            if self._session.closed:
                raise BrokerClientError(errno.EPIPE, "gntdev", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)
            self._stub_instance = gntdev_pb2_grpc.GntdevStub(self._session.grpc_channel)
        return self._stub_instance

    # ---------------------------------------------------------------- high level

    async def map(self, refs: Sequence[GrantRefLike] | Sequence[int], *, writable: bool = True, domid: int | None = None) -> Mapping:
        """Map *refs*, in order, into this process.

        *refs* are ``(domid, ref)`` pairs or :class:`GrantRef` objects — or,
        with *domid*, plain refs of that one domain (the cheapest form for a
        large batch).  A grant that is not granted to this domain, an unknown
        domain, or a writable map of a read-only grant fail here, with EINVAL
        (the hypervisor answers at map time, as on Linux at mmap time).

        >>> mapping = await session.gntdev.map([(1, 8), (1, 9)])   # doctest: +SKIP
        >>> mapping = await session.gntdev.map([8, 9], domid=1)    # doctest: +SKIP
        >>> mapping.view[0:5] = b"hello"                           # doctest: +SKIP
        """
        packed = _packed(refs, domid)  # type: ignore[arg-type]
        count = len(packed[1])
        if self._one_call_map:
            try:
                index, spans = await self._map_in_one_call(packed, writable)
            except BrokerClientError as exc:
                if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._one_call_map = False  # a broker from before the Map call
        if not self._one_call_map:
            index = await self.map_grant_refs(_grant_refs(*packed))
            try:
                spans = await self.map_memory(index, count, writable=writable)
            except BaseException:
                await self._undo_map(index, count)
                raise
        try:
            memory = map_received(spans, writable=writable)
        except BaseException:
            await self._undo_map(index, count)
            raise
        mapping = Mapping(self, index, None, memory, writable, packed=packed)
        self._mappings[index] = mapping
        return mapping

    async def map_to_fd(self, refs: Sequence[GrantRefLike], *, writable: bool = True) -> GrantFd:
        """Map *refs* in a gntdev instance of their own; return it as one descriptor.

        For consumers that mmap the pages themselves and expect them at offset
        0 (the Qubes GUI daemon hands such fds to the X server; Wayland needs
        the same).  Refused with EINVAL when the backend cannot give the refs
        as one piece (the emulated hypervisor can for a whole gntalloc
        allocation, in order).
        """
        refs = refs if isinstance(refs, list | tuple) else list(refs)
        count = len(refs)
        index = await self.map_grant_refs(refs)
        try:
            spans = await self.map_memory(index, count, writable=writable, fresh_instance=True)
            if len(spans) != 1:
                close_spans(spans)
                raise BrokerClientError(
                    errno.EPROTO, "gntdev map to fd", f"the broker answered {len(spans)} spans, not one",
                    code=grpc.StatusCode.INTERNAL,
                )
        except BaseException:
            await self._undo_map(index, count)
            raise
        return GrantFd(self, index, count, spans[0])

    def offset_for_vaddr(self, vaddr: int) -> tuple[int, int]:
        """``(index, count)`` of the mapping this client mapped at *vaddr* (its
        first byte), like ``IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR``; answered here,
        since the addresses are this process's."""
        for mapping in self._mappings.values():
            if not mapping.closed and mapping.address == vaddr:
                return mapping.index, mapping.count
        raise BrokerClientError(
            errno.EINVAL, "gntdev get offset for vaddr", f"no mapping of this session starts at {vaddr:#x}",
            code=grpc.StatusCode.INVALID_ARGUMENT,
        )

    async def copy_buffer(self, length: int) -> CopyBuffer:
        """A :class:`CopyBuffer` of *length* bytes, registered with the broker.

        >>> buffer = await session.gntdev.copy_buffer(4096)                  # doctest: +SKIP
        >>> buffer.view[:5] = b"hello"                                       # doctest: +SKIP
        >>> await session.gntdev.grant_copy([CopySegment(Local(buffer), Foreign(1, 8), 5)])  # doctest: +SKIP
        """
        if length <= 0:
            raise ValueError(f"a copy buffer needs at least one byte, not {length}")
        with OwnedFd(os.memfd_create("grant-broker-copy", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)) as fd:
            os.ftruncate(fd.fileno(), length)
            # The broker requires F_SEAL_SHRINK: it maps the file too.
            fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            memory = mmap.mmap(fd.fileno(), length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                transfer = await self._session.send_fds([fd.fileno()])
                response = await self._session.call(
                    self._stub.RegisterCopyBuffer,
                    gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer, fd=common_pb2.FdRef(index=0), length=length),
                )
            except BaseException:
                memory.close()
                raise
        return CopyBuffer(self, response.buffer_id, memory)

    async def grant_copy(self, segments: Sequence[CopySegment]) -> list[CopyResult]:
        """Copy between local memory and granted pages; one :class:`CopyResult` per segment.

        The call succeeds when segments fail: check each result's status
        (``GNTST_bad_gntref``...).  Malformed segments (both sides local, a
        foreign side crossing its page) fail the whole call with EINVAL.
        """
        request = gntdev_pb2.GrantCopyRequest(count=len(segments))
        add = request.segments.add
        for segment in segments:
            length = segment.length
            if length is None:
                if not isinstance(segment.source, bytes | bytearray | memoryview):
                    raise ValueError("a segment needs a length unless its source is inline bytes")
                length = len(segment.source)
            out = add(len=length)
            source_foreign = _set_pointer(out.source, segment.source, source=True)
            dest_foreign = _set_pointer(out.dest, segment.dest, source=False)
            out.flags = (GNTCOPY_source_gref if source_foreign else 0) | (GNTCOPY_dest_gref if dest_foreign else 0)
        response = await self._session.call(self._stub.GrantCopy, request)
        results = []
        for asked, answered in zip(segments, response.segments, strict=True):
            data = answered.dest.virt.data if asked.dest is None and answered.status == GNTST_okay else None
            results.append(CopyResult(answered.status, data))
        return results

    async def copy_ring(self, buffer: CopyBuffer, *, entries: int = 256) -> CopyRing:
        """A :class:`CopyRing` of *entries* records (1..4096) on *buffer*.

        >>> ring = await session.gntdev.copy_ring(buffer, entries=64)        # doctest: +SKIP
        >>> await ring.submit([CopySegment(Foreign(1, 8), Local(buffer), 4096)])  # doctest: +SKIP
        [0]
        """
        if not 0 < entries <= MAX_RING_ENTRIES:
            raise ValueError(f"a copy ring has 1..{MAX_RING_ENTRIES} entries, not {entries}")
        if buffer._closed:
            raise ValueError("the copy buffer is closed")
        response = await self._session.call(
            self._stub.CreateCopyRing, gntdev_pb2.CreateCopyRingRequest(buffer_id=buffer.buffer_id, entries=entries)
        )
        try:
            (fd,) = await self._session.receive_fds(response.fd_transfer, 1)
            with fd:
                size = ring_bytes(entries)
                if response.record_size != RECORD_SIZE or response.entries != entries or os.fstat(fd.fileno()).st_size != size:
                    raise BrokerClientError(
                        errno.EPROTO, "gntdev copy ring",
                        f"the broker answered a ring of {response.entries} records of {response.record_size} bytes "
                        f"({os.fstat(fd.fileno()).st_size} bytes), not {entries} of {RECORD_SIZE}",
                        code=grpc.StatusCode.INTERNAL,
                    )
                memory = mmap.mmap(fd.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            with contextlib.suppress(BrokerClientError):
                await self._session.call(self._stub.DestroyCopyRing, gntdev_pb2.DestroyCopyRingRequest(ring_id=response.ring_id))
            raise
        ring = CopyRing(self, buffer, response.ring_id, entries, memory)
        buffer._rings.add(ring)
        return ring

    async def dmabuf_export(self, domid: int, refs: Sequence[int], *, flags: int = 0) -> ExportedDmabuf:
        """Map *refs* of *domid* and export them as a dma-buf (``GNTDEV_DMA_FLAG_*`` in *flags*).

        UNIMPLEMENTED / ENOTTY when the host kernel lacks gntdev dma-buf
        support (capability ``dmabuf``).
        """
        response = await self._session.call(
            self._stub.DmabufExportFromRefs,
            gntdev_pb2.DmabufExportFromRefsRequest(flags=flags, count=len(refs), domid=domid, refs=list(refs)),
        )
        (fd,) = await self._session.receive_fds(response.fd_transfer, 1)
        return ExportedDmabuf(self, fd, response.dmabuf_id, len(refs))

    async def dmabuf_wait_released(self, dmabuf_id: int, timeout_ms: int) -> None:
        """Wait up to *timeout_ms* until the exported dma-buf has no user left.

        Raises:
            BrokerClientError: ETIMEDOUT (DEADLINE_EXCEEDED) when still in use;
                ENOENT for an unknown id.
        """
        await self._session.call(
            self._stub.DmabufExportWaitReleased,
            gntdev_pb2.DmabufExportWaitReleasedRequest(dmabuf_id=dmabuf_id, wait_to_ms=timeout_ms),
        )

    async def dmabuf_import(self, fd: int | OwnedFd, domid: int, count: int) -> ImportedDmabuf:
        """Grant the *count* pages of dma-buf *fd* (borrowed) to *domid*."""
        transfer = await self._session.send_fds([_fileno(fd)])
        response = await self._session.call(
            self._stub.DmabufImportToRefs,
            gntdev_pb2.DmabufImportToRefsRequest(fd_transfer=transfer, fd=common_pb2.FdRef(index=0), count=count, domid=domid),
        )
        return ImportedDmabuf(self, response.dmabuf_id, tuple(response.refs))

    async def dmabuf_import_release(self, dmabuf_id: int) -> None:
        """End the grants of an imported dma-buf and let go of it."""
        await self._session.call(
            self._stub.DmabufImportRelease, gntdev_pb2.DmabufImportReleaseRequest(dmabuf_id=dmabuf_id)
        )

    # ---------------------------------------------------------------- the RPCs as they are

    async def _map_in_one_call(
        self, packed: tuple[Sequence[int], Sequence[int]], writable: bool
    ) -> tuple[int, list[ReceivedSpan]]:
        """The Map call: MapGrantRef + MapMemory in one round trip, the grants
        as packed arrays (one domid when they all come from one domain: :func:`_packed`)."""
        domids, refs = packed
        request = gntdev_pb2.MapRequest(domids=domids, refs=refs, writable=writable)
        response = await self._session.call(self._stub.Map, request)
        try:
            spans = await receive_spans(self._session, "gntdev map", response.fd_transfer, response.spans)
        except BaseException:
            await self._undo_map(response.index, len(refs))
            raise
        return response.index, spans

    async def map_grant_refs(self, refs: Sequence[GrantRefLike]) -> int:
        """``IOCTL_GNTDEV_MAP_GRANT_REF``: reserve a mapping; return its index."""
        messages = [_grant_ref(ref) for ref in refs]
        response: gntdev_pb2.MapGrantRefResponse = await self._session.call(
            self._stub.MapGrantRef, gntdev_pb2.MapGrantRefRequest(count=len(messages), refs=messages)
        )
        return response.index

    async def map_memory(
        self, index: int, count: int, *, writable: bool, fresh_instance: bool = False
    ) -> list[ReceivedSpan]:
        """The pages of the mapping at *index* as descriptors (the caller owns them)."""
        response = await self._session.call(
            self._stub.MapMemory,
            gntdev_pb2.MapMemoryRequest(index=index, count=count, writable=writable, fresh_instance=fresh_instance),
        )
        return await receive_spans(self._session, "gntdev map memory", response.fd_transfer, response.spans)

    async def unmap_grant_ref(self, index: int, count: int) -> None:
        """``IOCTL_GNTDEV_UNMAP_GRANT_REF``."""
        await self._session.call(self._stub.UnmapGrantRef, gntdev_pb2.UnmapGrantRefRequest(index=index, count=count))

    async def set_max_grants(self, count: int) -> None:
        """Limit the grants this session may map (the broker enforces it)."""
        await self._session.call(self._stub.SetMaxGrants, gntdev_pb2.SetMaxGrantsRequest(count=count))

    async def set_unmap_notify(self, index: int, action: int, port: int = 0) -> None:
        """``IOCTL_GNTDEV_SET_UNMAP_NOTIFY`` at byte *index* of the session's gntdev space
        (prefer :meth:`Mapping.set_unmap_notify`)."""
        await self._session.call(
            self._stub.SetUnmapNotify,
            gntdev_pb2.SetUnmapNotifyRequest(index=index, action=action, event_channel_port=port),
        )

    async def _unmap_quietly(self, index: int, count: int) -> None:
        # A closed session, or one the broker lost, already gave everything back.
        if not (self._session.closed or self._session.broker_lost):
            await self.unmap_grant_ref(index, count)

    async def _undo_map(self, index: int, count: int) -> None:
        # Undo a half-made mapping without hiding the error that stopped it.
        with contextlib.suppress(BrokerClientError):
            await self._unmap_quietly(index, count)
