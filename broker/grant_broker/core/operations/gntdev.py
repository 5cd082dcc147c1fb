"""Gntdev operations: other domains' grants mapped for local clients.

Each session maps through its own gntdev instance (``session.gntdev``), so
indexes are per session exactly as they are per open file on Linux.  An
operation checks the request, calls the backend contract, answers the pages
as descriptors of its :class:`~grant_broker.core.reply.Reply` and remembers
what the session holds (:class:`GntdevState`) so that a dropped session gives
everything back.  One map operation (:func:`map_grants`) serves ``Map``,
``MapGrantRef`` + ``MapMemory`` and maps in an instance of their own.

What the broker adds to the kernel interface, and why:

* **Quotas.**  Linux has no per-client grant limit (SET_MAX_GRANTS answers
  ENOTTY), so the broker counts grants per session — mapped grants, dma-buf
  exported grants and pages it granted — against
  ``Limits.max_grants_per_session`` (EDQUOT), and implements SetMaxGrants
  itself as a per-session cap on mapped grants (forwarded to the backend, whose
  ENOTTY is tolerated as libxengnttab tolerates it).
* **fresh_instance.**  MapMemory can map a mapping's refs again in a gntdev
  instance of their own, answering one descriptor whose offset 0 is the first
  page: what the Qubes GUI daemon gives the X server, and what Wayland needs.
  That instance lives as long as the session's mapping (until UnmapGrantRef
  or the end of the session).
* **Copy buffers.**  Grant copy's local side is a pointer in C; over the
  protocol it is either bytes inline in the messages or a client memfd registered once and
  mapped by the broker.  The memfd must be sealed against shrinking: a client
  that truncated a mapped file under the broker would crash it with SIGBUS.
  What a session maps is bounded by the ``COPY_BUFFER_BYTES`` budget (per
  session and per uid), and each buffer counts as one of the ``FDS_HELD``.
* **dma-buf names.**  The C interface names an exported or imported dma-buf
  by an fd number of the process that made the ioctl — the broker.  Clients
  get a ``dmabuf_id`` instead; the broker keeps the numbers (see
  :class:`_Export` for how it keeps an export's number without being a user
  of the buffer); each one kept counts against the ``FDS_HELD`` budget.  WaitReleased polls with timeout 0 and sleeps on the event
  loop in between, so a long wait blocks nobody.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import operator
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from grant_broker.backend.contract import (
    PAGE_SIZE,
    CopyForeign,
    CopyLocal,
    GntdevInstance,
    GrantCopyBatch,
    GrantCopySegment,
    GrantRef,
    GrantRefs,
    MemorySpan,
)
from grant_broker.core import audit
from grant_broker.core.budgets import COPY_BUFFER_BYTES, FDS_HELD
from grant_broker.core.checks import (
    DOMID_MAX,
    U16_MAX,
    check_count,
    check_domid,
    check_listed_count,
    check_notify_action,
    check_peers,
    invalid,
    quota_grants,
)
from grant_broker.core.operations.evtchn import check_port_of_session
from grant_broker.core.reply import Reply, close_spans, span_messages
from grant_broker.core.session import Session
from grant_broker_protocol.abi import GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTDEV_DMA_FLAG_COHERENT, GNTDEV_DMA_FLAG_WC
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.v1 import common_pb2, gntdev_pb2

log = logging.getLogger(__name__)

DMA_FLAGS = GNTDEV_DMA_FLAG_WC | GNTDEV_DMA_FLAG_COHERENT
GNTCOPY_FLAGS = GNTCOPY_source_gref | GNTCOPY_dest_gref

# Copy buffers are the client's memory mapped into the broker: cheap for the
# broker (the pages are charged to the client's memfd) but each is a mapping
# the broker holds, so a session gets a bounded number of them.
MAX_COPY_BUFFERS_PER_SESSION = 64
MAX_COPY_BUFFER_BYTES = 1 << 30
# Inline destination bytes come back in the response; keep it well under the
# 4 MiB a default gRPC client accepts.  Larger copies use a copy buffer.
MAX_INLINE_COPY_BYTES = 2 << 20
# Segments of one GrantCopy.  The event loop copies them in one go; 200000
# one-byte segments held every other client up for 3.7 s (measured), 4096
# take a few ms.  Linux batches any count; the broker asks for several calls.
MAX_COPY_SEGMENTS = 4096
# WaitReleased polls the backend without blocking the event loop.
DMABUF_POLL_SECONDS = 0.01
DMABUF_POLL_MAX_SECONDS = 0.1


# --------------------------------------------------------------------------- per-session state


@dataclass(eq=False)
class _Mapping:
    refs: GrantRefs  # packed (a Sequence[GrantRef] all the same)
    # The dedicated instance of MapMemory(fresh_instance): closed with the mapping.
    fresh: GntdevInstance | None = None
    # Memory hand-outs so far: a backend may keep a descriptor per hand-out
    # until the mapping goes (the Xen backend does), so they are bounded.
    handouts: int = 0

    @property
    def count(self) -> int:
        return len(self.refs)


@dataclass(eq=False)
class _CopyBuffer:
    memory: mmap.mmap
    length: int
    # What ends with the buffer (its copy rings: core/operations/copyring.py),
    # run before it is unmapped, at unregister or at the session's end.
    endings: list[Callable[[], object]] = field(default_factory=list)

    def close(self) -> None:
        endings, self.endings = self.endings, []
        for ending in endings:
            ending()
        self.memory.close()


@dataclass(eq=False)
class _Export:
    """A dma-buf exported for the client.

    The C interface names an exported buffer, in wait-released, by the fd
    number the export returned: Linux records the number (``gntdev_dmabuf->fd``)
    and looks the buffer up by it, never through the fd table, and so does the
    emulated gntdev.  The broker must keep that number — but not the buffer: a
    descriptor of the dma-buf in the broker would be a user of it, and the wait
    would never end.  So the client gets a duplicate, and :func:`reserve_number`
    points the number at ``/dev/null``: the buffer's only users are then the
    client and whoever it passed the buffer to, and the number cannot be
    handed out again by a later export of the session, which would make the
    look-up find the wrong buffer.
    """

    fd: OwnedFd  # the export's number, reserved
    count: int
    domid: int | None = None  # the granting domain (for the metrics: core/census.py)
    refs: tuple[int, ...] = ()  # its refs (for the audit log: core/audit.py)


def reserve_number(fd: OwnedFd) -> None:
    """Keep *fd*'s number but let go of the file behind it (``dup2`` of /dev/null).

    ``dup2`` swaps the file atomically, so the number is never free in between.
    """
    placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(placeholder, fd.fileno(), inheritable=False)
    finally:
        os.close(placeholder)


@dataclass(eq=False)
class _Import:
    # The client's dma-buf, kept open because the contract names the import by
    # an fd of this process: closing it would let the number be reused.  It is
    # kept only as a name (and a reference, as dma_buf_get takes one): never
    # reopened or mapped; the backend grants the dma-buf's own memory and
    # refuses anything that is not a dma-buf (the emulated one: anything it
    # did not make).
    fd: OwnedFd
    instance: GntdevInstance
    count: int
    domid: int | None = None  # the domain granted to (for the metrics: core/census.py)
    refs: tuple[int, ...] = ()  # the refs granted (for the audit log: core/audit.py)


@dataclass(eq=False)
class GntdevState:
    """What one session holds through gntdev."""

    mappings: dict[int, _Mapping] = field(default_factory=dict)
    copy_buffers: dict[int, _CopyBuffer] = field(default_factory=dict)
    exports: dict[int, _Export] = field(default_factory=dict)
    imports: dict[int, _Import] = field(default_factory=dict)
    max_grants: int | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    closed: bool = False

    def next_id(self) -> int:
        return next(self._ids)

    @property
    def mapped_grants(self) -> int:
        return sum(mapping.count for mapping in self.mappings.values())

    def close(self) -> None:
        """Session release: give back what the session's gntdev instance does
        not release by itself when it is closed right after this."""
        if self.closed:
            return
        self.closed = True
        for mapping in self.mappings.values():
            if mapping.fresh is not None:
                mapping.fresh.close()
        self.mappings.clear()
        for buffer in self.copy_buffers.values():
            buffer.close()
        self.copy_buffers.clear()
        for imported in self.imports.values():
            try:
                imported.instance.dmabuf_import_release(imported.fd.fileno())
            except BrokerError as exc:
                log.warning("releasing a dma-buf import at session end: %s", exc)
            imported.fd.close()
        self.imports.clear()
        for export in self.exports.values():
            export.fd.close()
        self.exports.clear()


def gntdev_state(session: Session) -> GntdevState:
    return session.service_state("gntdev", GntdevState)


# --------------------------------------------------------------------------- map / unmap


def map_grants(
    session: Session,
    operation: str,
    count: int,
    refs: Callable[[], GrantRefs],
    *,
    memory: bool,
    writable: bool = False,
) -> tuple[int, list[MemorySpan]]:
    """The one map operation: reserve *count* grants in the session's instance
    and, with *memory*, hand the pages out as spans.

    Every limit is checked here, once, on *count* — before *refs* (which
    reads and checks the request's refs) is called, so that a request far
    beyond the quota costs nothing to refuse.  Returns the mapping's index and
    its spans (empty without *memory*); the session's ledger records the
    mapping before this returns.
    """
    check_count(operation, count)
    quota_grants(session, operation, count)
    state = gntdev_state(session)
    _check_max_grants(operation, state, count)
    grants = refs()
    # The policy is asked once per distinct domain, not once per grant.
    check_peers(session, operation, "map grants of", domains=grants.domains)
    index, spans = _map_in(session.gntdev, grants, memory=memory, writable=writable)
    state.mappings[index] = _Mapping(grants, handouts=1 if memory else 0)
    session.usage.mappings += 1
    session.usage.mapped_grants += count
    audit.grants_mapped(session, operation, grants, index=index, writable=writable if memory else None)
    return index, spans


def _map_in(
    instance: GntdevInstance, refs: GrantRefs, *, memory: bool, writable: bool
) -> tuple[int, list[MemorySpan]]:
    index = instance.map_grant_refs(refs)
    if not memory:
        return index, []
    try:
        return index, instance.map_memory(index, len(refs), writable=writable)
    except BaseException:
        # Refused grants fail here, at "mmap" time: the reservation goes too.
        with contextlib.suppress(BrokerError):
            instance.unmap_grant_ref(index, len(refs))
        raise


async def map_(session: Session, request: gntdev_pb2.MapRequest) -> Reply[gntdev_pb2.MapResponse]:
    """Reserve and hand out in one call (see gntdev.proto)."""
    op = "gntdev map"
    index, spans = map_grants(
        session,
        op,
        len(request.refs),
        lambda: _packed_grant_refs(op, request.domids, request.refs),
        memory=True,
        writable=request.writable,
    )
    return Reply(gntdev_pb2.MapResponse(index=index, spans=span_messages(spans)), [span.fd for span in spans])


async def map_grant_ref(session: Session, request: gntdev_pb2.MapGrantRefRequest) -> Reply[gntdev_pb2.MapGrantRefResponse]:
    op = "gntdev map grant refs"
    check_listed_count(op, request.count, len(request.refs))
    index, _ = map_grants(session, op, request.count, lambda: _grant_refs(op, request.refs), memory=False)
    return Reply(gntdev_pb2.MapGrantRefResponse(index=index))


async def map_memory(session: Session, request: gntdev_pb2.MapMemoryRequest) -> Reply[gntdev_pb2.MapMemoryResponse]:
    op = "gntdev map memory"
    state = gntdev_state(session)
    mapping = _mapping_at(op, state, request.index, request.count)
    session.check_quota(op, "memory hand-outs of this mapping", mapping.handouts, 1, session.limits.max_map_memory_per_mapping)
    if request.fresh_instance:
        spans = _map_fresh(op, session, mapping, request.writable)
    else:
        spans = session.gntdev.map_memory(request.index, request.count, writable=request.writable)
    mapping.handouts += 1
    return Reply(gntdev_pb2.MapMemoryResponse(spans=span_messages(spans)), [span.fd for span in spans])


def _map_fresh(op: str, session: Session, mapping: _Mapping, writable: bool) -> list[MemorySpan]:
    """The mapping's refs again, in a gntdev instance of their own, as one
    descriptor from offset 0 (the quotas were counted when the session mapped them)."""
    if mapping.fresh is not None:
        raise BrokerError(
            errno.EBUSY, op, "this mapping already has an instance of its own; unmap it and map the refs again for another"
        )
    instance = session.backend.open_gntdev()
    try:
        index, spans = _map_in(instance, mapping.refs, memory=True, writable=writable)
        length = mapping.count * PAGE_SIZE
        if index != 0 or len(spans) != 1 or spans[0].offset != 0 or spans[0].length != length:
            layout = ", ".join(f"{span.length} bytes at offset {span.offset}" for span in spans)
            close_spans(spans)
            raise invalid(
                op,
                f"the {session.backend.name} backend gives these {mapping.count} grants as {layout}, not as one "
                f"descriptor from offset 0; only grants the backend holds as one piece can be mapped in an "
                f"instance of their own (on the emulated hypervisor: a whole gntalloc allocation, in order, from "
                f"its first page)",
            )
    except BaseException:
        instance.close()
        raise
    mapping.fresh = instance
    return spans


async def unmap_grant_ref(
    session: Session, request: gntdev_pb2.UnmapGrantRefRequest
) -> Reply[gntdev_pb2.UnmapGrantRefResponse]:
    op = "gntdev unmap grant ref"
    state = gntdev_state(session)
    # The session's ledger first, answering as the kernel does (ENOENT; a
    # count of 0 matches any size): on Linux a dma-buf export is a map of the
    # same instance too, at an index the ioctl would find and unmap under
    # the buffer's users.
    mapping = state.mappings.get(request.index)
    if mapping is None or (request.count and request.count != mapping.count):
        raise BrokerError(errno.ENOENT, op, f"no mapping of {request.count} grants at index {request.index:#x}")
    session.gntdev.unmap_grant_ref(request.index, request.count)
    del state.mappings[request.index]
    if mapping.fresh is not None:
        mapping.fresh.close()
    session.usage.mappings -= 1
    session.usage.mapped_grants -= mapping.count
    audit.grants_unmapped(session, op, mapping.refs, index=request.index)
    return Reply(gntdev_pb2.UnmapGrantRefResponse())


# --------------------------------------------------------------------------- limits and notifications


async def set_max_grants(session: Session, request: gntdev_pb2.SetMaxGrantsRequest) -> Reply[gntdev_pb2.SetMaxGrantsResponse]:
    op = "gntdev set max grants"
    if request.count > session.limits.max_grants_per_session:
        raise BrokerError(
            errno.E2BIG,
            op,
            f"{request.count} is above the broker's limit of {session.limits.max_grants_per_session} grants per session",
        )
    try:
        session.gntdev.set_max_grants(request.count)
    except BrokerError as exc:
        # Current Linux has no per-instance limit (ENOTTY), as libxengnttab
        # knows; the broker enforces the limit itself, so that is fine.
        if exc.errno != errno.ENOTTY:
            raise
    gntdev_state(session).max_grants = request.count
    return Reply(gntdev_pb2.SetMaxGrantsResponse())


async def set_unmap_notify(
    session: Session, request: gntdev_pb2.SetUnmapNotifyRequest
) -> Reply[gntdev_pb2.SetUnmapNotifyResponse]:
    op = "gntdev set unmap notify"
    check_notify_action(op, request.action)
    check_port_of_session(op, session, request.action, request.event_channel_port)
    session.gntdev.set_unmap_notify(request.index, request.action, request.event_channel_port)
    return Reply(gntdev_pb2.SetUnmapNotifyResponse())


# --------------------------------------------------------------------------- grant copy


async def register_copy_buffer(
    session: Session, request: gntdev_pb2.RegisterCopyBufferRequest
) -> Reply[gntdev_pb2.RegisterCopyBufferResponse]:
    op = "gntdev register copy buffer"
    # Descriptors first, even for a request about to be refused: a transfer
    # left unclaimed would count against the session's pending transfers.
    (fd,) = await session.take_fds(op, request.fd_transfer, [request.fd.index])
    with fd:
        session.check_live(op)
        if not 0 < request.length <= MAX_COPY_BUFFER_BYTES:
            raise invalid(op, f"length {request.length} is not between 1 and {MAX_COPY_BUFFER_BYTES} bytes")
        state = gntdev_state(session)
        if len(state.copy_buffers) >= MAX_COPY_BUFFERS_PER_SESSION:
            raise audit.refused(session, BrokerError(
                errno.EDQUOT, op, f"this session has registered {len(state.copy_buffers)} copy buffers, the most allowed"
            ))
        session.charge(op, COPY_BUFFER_BYTES, request.length)
        try:
            session.charge(op, FDS_HELD)
            try:
                memory = _map_copy_buffer(op, fd.fileno(), request.length)
            except BaseException:
                session.credit(FDS_HELD)
                raise
        except BaseException:
            session.credit(COPY_BUFFER_BYTES, request.length)
            raise
    buffer_id = state.next_id()
    state.copy_buffers[buffer_id] = _CopyBuffer(memory, request.length)
    return Reply(gntdev_pb2.RegisterCopyBufferResponse(buffer_id=buffer_id))


async def unregister_copy_buffer(
    session: Session, request: gntdev_pb2.UnregisterCopyBufferRequest
) -> Reply[gntdev_pb2.UnregisterCopyBufferResponse]:
    op = "gntdev unregister copy buffer"
    buffer = gntdev_state(session).copy_buffers.pop(request.buffer_id, None)
    if buffer is None:
        raise BrokerError(errno.ENOENT, op, f"no copy buffer {request.buffer_id} in this session")
    buffer.close()
    session.credit(COPY_BUFFER_BYTES, buffer.length)
    session.credit(FDS_HELD)
    return Reply(gntdev_pb2.UnregisterCopyBufferResponse())


async def grant_copy(session: Session, request: gntdev_pb2.GrantCopyRequest) -> Reply[gntdev_pb2.GrantCopyResponse]:
    op = "gntdev grant copy"
    check_listed_count(op, request.count, len(request.segments), "segments")
    if request.count > MAX_COPY_SEGMENTS:
        raise BrokerError(
            errno.E2BIG, op, f"{request.count} segments exceed the broker's {MAX_COPY_SEGMENTS} per call; split the copy"
        )
    state = gntdev_state(session)
    views: dict[int, memoryview] = {}  # one view of each copy buffer the call names
    inline_dests: dict[int, bytearray] = {}
    try:
        segments = [_copy_segment(op, state, i, segment, views, inline_dests) for i, segment in enumerate(request.segments)]
        inline_bytes = sum(len(buffer) for buffer in inline_dests.values())
        if inline_bytes > MAX_INLINE_COPY_BYTES:
            raise BrokerError(
                errno.E2BIG,
                op,
                f"{inline_bytes} bytes of inline destinations exceed {MAX_INLINE_COPY_BYTES}; register a copy buffer",
            )
        check_copy_peers(session, op, segments)
        statuses = session.gntdev.grant_copy(segments) if segments else []
    finally:
        # The views pin the copy buffers' mmaps: release them so that an
        # unregister (or the session's end) can unmap.
        for view in views.values():
            view.release()
    # Each segment's status, and the bytes of inline dests; the request's
    # pointers are not echoed (the client has them).
    response = gntdev_pb2.GrantCopyResponse()
    add = response.segments.add
    for i, status in enumerate(statuses):
        out = add(status=status)
        if status == 0 and i in inline_dests:
            out.dest.virt.data = bytes(inline_dests[i])
    return Reply(response)


# --------------------------------------------------------------------------- dma-buf


async def dmabuf_export_from_refs(
    session: Session, request: gntdev_pb2.DmabufExportFromRefsRequest
) -> Reply[gntdev_pb2.DmabufExportFromRefsResponse]:
    op = "gntdev dma-buf export"
    check_listed_count(op, request.count, len(request.refs))
    check_count(op, request.count)
    check_domid(op, request.domid)
    if request.flags & ~DMA_FLAGS:
        raise invalid(op, f"flags {request.flags:#x} has bits other than GNTDEV_DMA_FLAG_WC and GNTDEV_DMA_FLAG_COHERENT")
    quota_grants(session, op, request.count)
    state = gntdev_state(session)
    session.charge(op, FDS_HELD)  # the export's number, kept until it is released
    try:
        check_peers(session, op, "map grants of", domains=(request.domid,))
        fd = session.gntdev.dmabuf_export_from_refs(request.domid, list(request.refs), request.flags)
        try:
            for_client = fd.dup()  # the broker's own dma-buf: the client gets just that buffer
        except BaseException:
            fd.close()
            raise
    except BaseException:
        session.credit(FDS_HELD)
        raise
    # The client gets the duplicate; the broker keeps only the number (see _Export).
    reserve_number(fd)
    dmabuf_id = state.next_id()
    state.exports[dmabuf_id] = _Export(fd, request.count, request.domid, tuple(request.refs))
    session.usage.dmabufs += 1
    session.usage.mapped_grants += request.count
    audit.grants_mapped(session, op, _export_grants(state.exports[dmabuf_id]), dmabuf_id=dmabuf_id)
    return Reply(
        gntdev_pb2.DmabufExportFromRefsResponse(fd=common_pb2.FdRef(index=0), dmabuf_id=dmabuf_id), [for_client]
    )


async def dmabuf_export_wait_released(
    session: Session, request: gntdev_pb2.DmabufExportWaitReleasedRequest
) -> Reply[gntdev_pb2.DmabufExportWaitReleasedResponse]:
    op = "gntdev dma-buf export wait released"
    state = gntdev_state(session)
    export = state.exports.get(request.dmabuf_id)
    if export is None:
        raise BrokerError(errno.ENOENT, op, f"no dma-buf {request.dmabuf_id} exported by this session")
    deadline = time.monotonic() + request.wait_to_ms / 1000
    pause = DMABUF_POLL_SECONDS
    instance = session.gntdev
    while True:
        # Poll with timeout 0 so that the loop keeps serving everyone else;
        # the call's own deadline or cancellation ends the sleep.
        try:
            instance.dmabuf_export_wait_released(export.fd.fileno(), 0)
            break
        except BrokerError as exc:
            # The instance forgets a buffer once it is released (Linux
            # unlinks it from exp_list), so a later look-up answers ENOENT:
            # for a buffer the broker knows it exported, that is "released".
            if exc.errno == errno.ENOENT:
                break
            if exc.errno != errno.ETIMEDOUT:
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerError(
                errno.ETIMEDOUT, op, f"dma-buf {request.dmabuf_id} is still in use after {request.wait_to_ms} ms"
            )
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, DMABUF_POLL_MAX_SECONDS)
        if state.exports.get(request.dmabuf_id) is not export:
            # The session ended (or another call finished the wait) meanwhile.
            raise BrokerError(errno.ENOENT, op, f"dma-buf {request.dmabuf_id} is no longer exported by this session")
    del state.exports[request.dmabuf_id]
    export.fd.close()
    session.usage.dmabufs -= 1
    session.usage.mapped_grants -= export.count
    session.credit(FDS_HELD)
    audit.grants_unmapped(session, op, _export_grants(export), dmabuf_id=request.dmabuf_id)
    return Reply(gntdev_pb2.DmabufExportWaitReleasedResponse())


async def dmabuf_import_to_refs(
    session: Session, request: gntdev_pb2.DmabufImportToRefsRequest
) -> Reply[gntdev_pb2.DmabufImportToRefsResponse]:
    op = "gntdev dma-buf import"
    (fd,) = await session.take_fds(op, request.fd_transfer, [request.fd.index])
    try:
        session.check_live(op)
        if request.reserved != 0:
            raise invalid(op, f"reserved is {request.reserved}; it must be 0")
        check_count(op, request.count, "pages")
        check_domid(op, request.domid)
        quota_grants(session, op, request.count)
        session.charge(op, FDS_HELD)  # the client's dma-buf, kept until the import is released
        try:
            check_peers(session, op, "grant to", domains=(request.domid,))
            instance = session.gntdev
            refs = instance.dmabuf_import_to_refs(fd.fileno(), request.domid, request.count)
        except BaseException:
            session.credit(FDS_HELD)
            raise
    except BaseException:
        fd.close()
        raise
    state = gntdev_state(session)
    dmabuf_id = state.next_id()
    state.imports[dmabuf_id] = _Import(fd, instance, request.count, request.domid, tuple(refs))
    session.usage.dmabufs += 1
    session.usage.granted_pages += request.count
    audit.grants_shared(session, op, request.domid, refs, dmabuf_id=dmabuf_id)
    return Reply(gntdev_pb2.DmabufImportToRefsResponse(dmabuf_id=dmabuf_id, refs=refs))


async def dmabuf_import_release(
    session: Session, request: gntdev_pb2.DmabufImportReleaseRequest
) -> Reply[gntdev_pb2.DmabufImportReleaseResponse]:
    op = "gntdev dma-buf import release"
    if request.reserved != 0:
        raise invalid(op, f"reserved is {request.reserved}; it must be 0")
    state = gntdev_state(session)
    imported = state.imports.get(request.dmabuf_id)
    if imported is None:
        raise BrokerError(errno.ENOENT, op, f"no dma-buf {request.dmabuf_id} imported by this session")
    imported.instance.dmabuf_import_release(imported.fd.fileno())
    del state.imports[request.dmabuf_id]
    imported.fd.close()
    session.usage.dmabufs -= 1
    session.usage.granted_pages -= imported.count
    session.credit(FDS_HELD)
    if imported.domid is not None:
        audit.grants_unshared(session, op, imported.domid, imported.refs, dmabuf_id=request.dmabuf_id)
    return Reply(gntdev_pb2.DmabufImportReleaseResponse())


def _export_grants(export: _Export) -> tuple[GrantRef, ...]:
    """The grants a dma-buf export maps (for the audit log)."""
    domid = -1 if export.domid is None else export.domid
    return tuple([GrantRef(domid, ref) for ref in export.refs])


# --------------------------------------------------------------------------- request checks


def _grant_refs(op: str, refs: Sequence[common_pb2.GrantRef]) -> GrantRefs:
    """The grants of a MapGrantRefRequest (a message per grant), packed."""
    domids = [ref.domid for ref in refs]
    _check_domids(op, domids, "refs[{}].domid")
    return GrantRefs(domids, [ref.ref for ref in refs])


def _packed_grant_refs(op: str, domids: Sequence[int], refs: Sequence[int]) -> GrantRefs:
    """The grants of a MapRequest: refs[i] of domids[i], or of domids[0] for
    all — kept packed (its fields are uint32: every value fits the arrays)."""
    if len(domids) == 1:
        (domid,) = domids
        check_domid(op, domid)
        return GrantRefs(domid, refs[:])  # [:]: a list at once (iterating the message's field costs more)
    if len(domids) != len(refs):
        raise invalid(op, f"{len(domids)} domids for {len(refs)} refs: give one per ref, or one for all of them")
    domids = domids[:]
    _check_domids(op, domids, "domids[{}]")
    return GrantRefs(domids, refs[:])


def _check_domids(op: str, domids: Sequence[int], field: str) -> None:
    """Every one of *domids* a ``domid_t``: checked at once, the first that is
    not named (*field* formatted with its index) as :func:`check_domid` names it."""
    if domids and max(domids) > DOMID_MAX:
        i = next(i for i, domid in enumerate(domids) if domid > DOMID_MAX)
        check_domid(op, domids[i], field.format(i))


def _check_max_grants(op: str, state: GntdevState, adding: int) -> None:
    """IOCTL_GNTDEV_SET_MAX_GRANTS semantics (gntdev.c before it became a module
    parameter): more than the limit at once is EINVAL, more than what is left
    of it is ENOMEM."""
    if state.max_grants is None:
        return
    if adding > state.max_grants:
        raise invalid(op, f"{adding} grants exceed this session's SetMaxGrants limit of {state.max_grants}")
    if state.mapped_grants + adding > state.max_grants:
        raise BrokerError(
            errno.ENOMEM,
            op,
            f"this session maps {state.mapped_grants} grants; {adding} more exceed its SetMaxGrants limit of {state.max_grants}",
        )


def _mapping_at(op: str, state: GntdevState, index: int, count: int) -> _Mapping:
    # The session's instance is the broker's own, so its record of the
    # mappings is exact: answer as the kernel does without asking it.
    mapping = state.mappings.get(index)
    if mapping is None:
        raise invalid(op, f"no mapping starts at index {index} in this session")
    if mapping.count != count:
        raise invalid(op, f"the mapping at index {index} has {mapping.count} grants, not {count}")
    return mapping


def _map_copy_buffer(op: str, fd: int, length: int) -> mmap.mmap:
    # The client's descriptor is mapped as it is, never reopened: the kernel
    # holds the mapping to that descriptor's own access, so an O_PATH or
    # O_RDONLY descriptor (a read-only span included) cannot be mapped
    # read-write (EBADF / EACCES below) and the broker gains no access the
    # client lacks.  F_SEAL_SHRINK keeps the file from shrinking under the
    # mapping, which would SIGBUS the broker.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise invalid(op, "the copy buffer must be a memfd (a regular, mappable file)")
    if st.st_size < length:
        raise invalid(op, f"the copy buffer file has {st.st_size} bytes, less than the {length} registered")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        # Shrinking a file the broker has mapped would make the broker's next
        # access to it fault (SIGBUS) and kill it for every client.
        raise invalid(op, "the copy buffer memfd must be sealed with F_SEAL_SHRINK so that it cannot shrink under the broker")
    try:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            # The broker is short of descriptors (mmap keeps a duplicate) or memory: not the client's fault.
            raise BrokerError(exc.errno, op, f"the broker cannot map the copy buffer now: {exc.strerror}") from None
        raise BrokerError(errno.EBADF, op, f"the copy buffer cannot be mapped read-write: {exc.strerror}") from None


def _copy_segment(
    op: str,
    state: GntdevState,
    i: int,
    segment: gntdev_pb2.GrantCopySegment,
    views: dict[int, memoryview],
    inline_dests: dict[int, bytearray],
) -> GrantCopySegment:
    # Every field is read once: a call carries up to MAX_COPY_SEGMENTS of these.
    # What is particular to the message (which oneof is set, inline data) is
    # checked here; the rules of a segment, which ring records follow too, in
    # check_copy_segment, copy_foreign and copy_local.
    length, flags, source, dest = segment.len, segment.flags, segment.source, segment.dest
    source_kind = source.WhichOneof("pointer")
    dest_kind = dest.WhichOneof("pointer")
    if source_kind is None or dest_kind is None:
        raise invalid(op, f"segment {i}: both source and dest must be set")
    if (source_kind == "foreign") != bool(flags & GNTCOPY_source_gref):
        raise invalid(
            op, f"segment {i}: the source is {source_kind} but GNTCOPY_source_gref is {'set' if flags & GNTCOPY_source_gref else 'clear'}"
        )
    if (dest_kind == "foreign") != bool(flags & GNTCOPY_dest_gref):
        raise invalid(
            op, f"segment {i}: the dest is {dest_kind} but GNTCOPY_dest_gref is {'set' if flags & GNTCOPY_dest_gref else 'clear'}"
        )
    check_copy_segment(op, "segment", i, length, flags)
    return GrantCopySegment(
        _copy_pointer(op, state, i, "source", source, source_kind, length, views, None),
        _copy_pointer(op, state, i, "dest", dest, dest_kind, length, views, inline_dests),
        length,
    )


def _copy_pointer(
    op: str,
    state: GntdevState,
    i: int,
    name: str,
    pointer: gntdev_pb2.GrantCopyPointer,
    kind: str,
    length: int,
    views: dict[int, memoryview],
    inline_dests: dict[int, bytearray] | None,
) -> CopyLocal | CopyForeign:
    if kind == "foreign":
        foreign = pointer.foreign
        return copy_foreign(op, "segment", i, name, foreign.ref, foreign.offset, foreign.domid, length)
    local = pointer.virt
    if local.buffer_id:
        if local.data:
            raise invalid(op, f"segment {i}: the {name} names copy buffer {local.buffer_id} and carries inline data too")
        view = views.get(local.buffer_id)
        if view is None:
            buffer = state.copy_buffers.get(local.buffer_id)
            if buffer is None:
                raise invalid(op, f"segment {i}: no copy buffer {local.buffer_id} in this session")
            view = views[local.buffer_id] = memoryview(buffer.memory)
        return copy_local(op, "segment", i, name, view, "copy buffer", local.offset, length)
    if inline_dests is None:  # inline source: the request's bytes
        data = memoryview(local.data)
        return copy_local(op, "segment", i, name, data, "inline data", local.offset, length)
    if local.data or local.offset:
        raise invalid(op, f"segment {i}: an inline dest takes neither data nor an offset; its bytes come back in the response")
    inline_dests[i] = bytearray(length)
    return CopyLocal(memoryview(inline_dests[i]), 0)


# The rules of one grant-copy segment, wherever it comes from (a GrantCopy
# message, a copy ring's record): each is written here once.  *where* and *i*
# name the segment in an error ("segment 3", "ring record 17"); the checks
# cost a few comparisons, since a call carries thousands of segments.


def check_copy_segment(op: str, where: str, i: int, length: int, flags: int) -> None:
    """The segment as a whole: its length fits ``__u16``, its flags are known,
    and one side is a grant (``GNTCOPY_*_gref`` says which sides are)."""
    if length > U16_MAX:
        raise invalid(op, f"{where} {i}: len {length} does not fit 16 bits")
    if flags & ~GNTCOPY_FLAGS:
        raise invalid(op, f"{where} {i}: flags {flags:#x} has bits other than GNTCOPY_source_gref and GNTCOPY_dest_gref")
    if not flags:
        raise invalid(op, f"{where} {i}: both sides are local; one side of a grant copy must be a grant")


def check_copy_peers(session: Session, op: str, segments: Sequence[GrantCopySegment]) -> None:
    """The domains whose grants *segments* copy from or to are ones the
    broker's policy lets the session name (:func:`~grant_broker.core.checks.check_peers`).
    A :class:`GrantCopyBatch` names each domain once, in the order of first
    appearance: the same first refusal as segment by segment."""
    domains: Iterable[int]
    if isinstance(segments, GrantCopyBatch):
        domains = segments.foreign_domains()
    else:
        domains = (side.domid for segment in segments for side in (segment.source, segment.dest) if isinstance(side, CopyForeign))
    check_peers(session, op, "copy with grants of", domains=domains)


def copy_columns_pass(batch: GrantCopyBatch) -> bool:
    """Whether every segment of *batch* passes :func:`check_copy_segment` and,
    side by side, :func:`copy_foreign` or :func:`copy_local` (in
    ``batch.buffer``): the same rules, over whole columns.  Only for a batch
    whose segments all have the same flags — False for any other, and for any
    batch a rule refuses: then the per-segment functions, which name the
    segment and the rule, must be run.  A yes from here is a yes from them."""
    flags = batch.uniform_flags()
    if flags is None or flags & ~GNTCOPY_FLAGS or not flags:
        return False
    length = batch.length
    longest = max(length)
    if longest > U16_MAX:
        return False
    buffer_length = len(batch.buffer)
    for gref, at, offset, domid in (
        (GNTCOPY_source_gref, batch.source, batch.source_offset, batch.source_domid),
        (GNTCOPY_dest_gref, batch.dest, batch.dest_offset, batch.dest_domid),
    ):
        # A bound holds for all at once when the largest offset and the
        # longest length fit together; else it is summed segment by segment.
        if flags & gref:  # copy_foreign
            farthest = max(offset)
            if farthest > U16_MAX or max(domid) > DOMID_MAX:
                return False
            if farthest + longest > PAGE_SIZE and max(map(operator.add, offset, length)) > PAGE_SIZE:
                return False
        elif max(at) + longest > buffer_length and max(map(operator.add, at, length)) > buffer_length:  # copy_local
            return False
    return True


def copy_foreign(op: str, where: str, i: int, name: str, ref: int, offset: int, domid: int, length: int) -> CopyForeign:
    """A side in a granted page: its offset fits ``__u16``, its domain ``domid_t``,
    and its *length* bytes stay within the page (as ``gntdev_grant_copy_seg``
    refuses, before any device is touched)."""
    if offset > U16_MAX:
        raise invalid(op, f"{where} {i}: {name} offset {offset} does not fit 16 bits")
    if domid > DOMID_MAX:
        check_domid(op, domid, f"{where} {i}: {name} domid")
    if offset + length > PAGE_SIZE:
        raise invalid(
            op,
            f"{where} {i}: {name} ref {ref} of domain {domid}: {length} bytes at offset {offset} cross the page boundary",
        )
    return CopyForeign(ref, offset, domid)


def copy_local(
    op: str, where: str, i: int, name: str, view: memoryview, what: str, offset: int, length: int
) -> CopyLocal:
    """A side in the client's own memory (*view*: a copy buffer, inline data):
    its *length* bytes at *offset* are within it."""
    if offset + length > len(view):
        raise invalid(
            op, f"{where} {i}: the {name} range {offset}..{offset + length} is outside its {len(view)}-byte {what}"
        )
    return CopyLocal(view, offset)
