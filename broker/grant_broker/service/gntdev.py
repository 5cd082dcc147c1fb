"""The Gntdev service: other domains' grants mapped for local clients.

Each session maps through its own gntdev instance (``session.gntdev``), so
indexes are per session exactly as they are per open file on Linux.  The
servicer is thin: it checks the request, calls the backend contract, hands the
pages out as descriptors on the session's fd channel and remembers what the
session holds so that a dropped session gives everything back.

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
* **Copy buffers.**  Grant copy's local side is a pointer in C; over gRPC it
  is either bytes inline in the messages or a client memfd registered once and
  mapped by the broker.  The memfd must be sealed against shrinking: a client
  that truncated a mapped file under the broker would crash it with SIGBUS.
* **dma-buf names.**  The C interface names an exported or imported dma-buf
  by an fd number of the process that made the ioctl — the broker.  Clients
  get a ``dmabuf_id`` instead; the broker keeps the numbers (see
  :class:`_Export` for how it keeps an export's number without being a user
  of the buffer).  WaitReleased polls with timeout 0 and sleeps on the event
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
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from grant_broker.backend.contract import (
    PAGE_SIZE,
    CopyForeign,
    CopyLocal,
    GntdevInstance,
    GrantCopySegment,
    GrantRef,
    MemorySpan,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.service.evtchn import session_ports
from grant_broker.service.session import Session, SessionRegistry
from grant_broker.service.status import invalid, rpc
from grant_broker.uapi.gntdev import (
    GNTDEV_DMA_FLAG_COHERENT,
    GNTDEV_DMA_FLAG_WC,
    UNMAP_NOTIFY_CLEAR_BYTE,
    UNMAP_NOTIFY_SEND_EVENT,
)
from grant_broker.uapi.grant_table import GNTCOPY_dest_gref, GNTCOPY_source_gref
from grant_broker_protocol.v1 import common_pb2, gntdev_pb2, gntdev_pb2_grpc

log = logging.getLogger(__name__)

DOMID_MAX = 0xFFFF  # domid_t is 16 bits
U16_MAX = 0xFFFF
UNMAP_NOTIFY_ACTIONS = UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT
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


# --------------------------------------------------------------------------- helpers shared by the grant services


def check_domid(operation: str, domid: int, what: str = "domid") -> None:
    """EINVAL unless *domid* fits ``domid_t``."""
    if domid > DOMID_MAX:
        raise invalid(operation, f"{what} {domid} does not fit domid_t (at most {DOMID_MAX})")


def check_count(operation: str, count: int, what: str = "grants") -> None:
    """EINVAL for a count of 0, as the kernel refuses empty maps/allocations."""
    if count == 0:
        raise invalid(operation, f"count is 0: at least one of the {what} is needed")


def check_notify_action(operation: str, action: int) -> None:
    if action & ~UNMAP_NOTIFY_ACTIONS:
        raise invalid(
            operation,
            f"action {action:#x} has bits other than UNMAP_NOTIFY_CLEAR_BYTE (0x1) and UNMAP_NOTIFY_SEND_EVENT (0x2)",
        )


def check_port_of_session(operation: str, session: Session, action: int, port: int) -> None:
    """With SEND_EVENT the port must be one this session bound (EINVAL, as the
    kernel answers for a port it cannot use).

    The kernel only asks that the port be bound in the domain, but every
    session of a domain shares the domain's ports: without this check a client
    could have the broker signal another client's port.
    """
    if not action & UNMAP_NOTIFY_SEND_EVENT:
        return
    if port not in session_ports(session):
        raise invalid(operation, f"event channel port {port} is not bound by this session")


def ensure_live(session: Session, operation: str) -> None:
    """After an await, the session may have been released: touching its lazily
    opened devices would open new ones that nobody closes."""
    if session.closed.is_set():
        raise BrokerError(errno.ECANCELED, operation, "the session ended during the call")


def quota_grants(session: Session, operation: str, adding: int) -> None:
    """Grants per session: what it maps (incl. dma-buf exports) plus what it grants."""
    usage = session.usage
    session.check_quota(
        operation, "grants", usage.mapped_grants + usage.granted_pages, adding, session.limits.max_grants_per_session
    )


async def send_owned(session: Session, fds: Sequence[OwnedFd]) -> int:
    """Send *fds* to the client and close the broker's copies, whatever happens."""
    try:
        return await session.send_fds([fd.fileno() for fd in fds])
    finally:
        for fd in fds:
            fd.close()


async def send_spans(session: Session, spans: list[MemorySpan]) -> tuple[int, list[common_pb2.MemorySpan]]:
    """Send one descriptor per span; return the transfer id and the spans as messages."""
    messages = [
        common_pb2.MemorySpan(fd=common_pb2.FdRef(index=i), offset=span.offset, length=span.length, writable=span.writable)
        for i, span in enumerate(spans)
    ]
    transfer = await send_owned(session, [span.fd for span in spans])
    return transfer, messages


def close_spans(spans: Sequence[MemorySpan]) -> None:
    for span in spans:
        span.close()


# --------------------------------------------------------------------------- per-session state


@dataclass(eq=False)
class _Mapping:
    refs: tuple[GrantRef, ...]
    # The dedicated instance of MapMemory(fresh_instance): closed with the mapping.
    fresh: GntdevInstance | None = None
    # MapMemory calls so far: a backend may keep a descriptor per call until
    # the mapping goes (the Xen backend does), so they are bounded.
    handouts: int = 0

    @property
    def count(self) -> int:
        return len(self.refs)


@dataclass(eq=False)
class _CopyBuffer:
    memory: mmap.mmap
    length: int


@dataclass(eq=False)
class _Export:
    """A dma-buf exported for the client.

    The C interface names an exported buffer, in wait-released, by the fd
    number the export returned: Linux records the number (``gntdev_dmabuf->fd``)
    and looks the buffer up by it, never through the fd table, and so does the
    emulated gntdev.  The broker must keep that number — but not the buffer: a
    descriptor of the dma-buf in the broker would be a user of it, and the wait
    would never end.  So once the client has its copy, :func:`reserve_number`
    points the number at ``/dev/null``: the buffer's only users are then the
    client and whoever it passed the buffer to, and the number cannot be
    handed out again by a later export of the session, which would make the
    look-up find the wrong buffer.
    """

    fd: OwnedFd  # the export's number, reserved
    count: int


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
    # an fd of this process: closing it would let the number be reused.
    fd: OwnedFd
    instance: GntdevInstance
    count: int


@dataclass(eq=False)
class GntdevState:
    """What one session holds through the Gntdev service."""

    mappings: dict[int, _Mapping] = field(default_factory=dict)
    copy_buffers: dict[int, _CopyBuffer] = field(default_factory=dict)
    exports: dict[int, _Export] = field(default_factory=dict)
    imports: dict[int, _Import] = field(default_factory=dict)
    max_grants: int | None = None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
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
            buffer.memory.close()
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


# --------------------------------------------------------------------------- the service


class GntdevService(gntdev_pb2_grpc.GntdevServicer):
    """``grant_broker.v1.Gntdev`` over the backend contract."""

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    # ---------------------------------------------------------------- map / unmap

    @rpc
    async def MapGrantRef(
        self, request: gntdev_pb2.MapGrantRefRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.MapGrantRefResponse:
        op = "gntdev map grant refs"
        session = self.registry.session_for(context)
        # Sizes first (the repeated field's length costs nothing): a request
        # beyond the quota is refused before any of its refs is looked at.
        if request.count != len(request.refs):
            raise invalid(op, f"count is {request.count} but {len(request.refs)} refs are given")
        check_count(op, request.count)
        quota_grants(session, op, request.count)
        refs = _grant_refs(op, request.count, request.refs)
        state = gntdev_state(session)
        _check_max_grants(op, state, len(refs))
        quota_grants(session, op, len(refs))
        index = session.gntdev.map_grant_refs(refs)
        state.mappings[index] = _Mapping(refs)
        session.usage.mappings += 1
        session.usage.mapped_grants += len(refs)
        return gntdev_pb2.MapGrantRefResponse(index=index)

    @rpc
    async def Map(self, request: gntdev_pb2.MapRequest, context: grpc.aio.ServicerContext) -> gntdev_pb2.MapResponse:
        """MapGrantRef + MapMemory in one round trip (see gntdev.proto)."""
        op = "gntdev map"
        session = self.registry.session_for(context)
        count = len(request.refs)
        check_count(op, count)
        quota_grants(session, op, count)
        state = gntdev_state(session)
        _check_max_grants(op, state, count)
        refs = _packed_grant_refs(op, request.domids, request.refs)
        instance = session.gntdev
        index = instance.map_grant_refs(refs)
        try:
            spans = instance.map_memory(index, count, writable=request.writable)
        except BaseException:
            # Refused grants fail here, at "mmap" time: the reservation goes too.
            with contextlib.suppress(BrokerError):
                instance.unmap_grant_ref(index, count)
            raise
        state.mappings[index] = _Mapping(refs, handouts=1)
        session.usage.mappings += 1
        session.usage.mapped_grants += count
        # Recorded before the await: if the session ends while the
        # descriptors travel, its release unmaps.
        transfer, messages = await send_spans(session, spans)
        return gntdev_pb2.MapResponse(index=index, fd_transfer=transfer, spans=messages)

    @rpc
    async def UnmapGrantRef(
        self, request: gntdev_pb2.UnmapGrantRefRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.UnmapGrantRefResponse:
        session = self.registry.session_for(context)
        state = gntdev_state(session)
        # The backend answers bad indexes and counts with the kernel's own
        # errno (ENOENT; a count of 0 matches any size), so ask it first.
        session.gntdev.unmap_grant_ref(request.index, request.count)
        mapping = state.mappings.pop(request.index)
        if mapping.fresh is not None:
            mapping.fresh.close()
        session.usage.mappings -= 1
        session.usage.mapped_grants -= mapping.count
        return gntdev_pb2.UnmapGrantRefResponse()

    @rpc
    async def MapMemory(
        self, request: gntdev_pb2.MapMemoryRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.MapMemoryResponse:
        op = "gntdev map memory"
        session = self.registry.session_for(context)
        state = gntdev_state(session)
        mapping = _mapping_at(op, state, request.index, request.count)
        session.check_quota(op, "memory hand-outs of this mapping", mapping.handouts, 1, session.limits.max_map_memory_per_mapping)
        if request.fresh_instance:
            spans = self._map_fresh(op, session, mapping, request.writable)
        else:
            spans = session.gntdev.map_memory(request.index, request.count, writable=request.writable)
        mapping.handouts += 1
        transfer, messages = await send_spans(session, spans)
        return gntdev_pb2.MapMemoryResponse(fd_transfer=transfer, spans=messages)

    @staticmethod
    def _map_fresh(op: str, session: Session, mapping: _Mapping, writable: bool) -> list[MemorySpan]:
        if mapping.fresh is not None:
            raise BrokerError(
                errno.EBUSY, op, "this mapping already has an instance of its own; unmap it and map the refs again for another"
            )
        instance = session.backend.open_gntdev()
        try:
            index = instance.map_grant_refs(mapping.refs)
            spans = instance.map_memory(index, mapping.count, writable=writable)
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

    # ---------------------------------------------------------------- limits and notifications

    @rpc
    async def SetMaxGrants(
        self, request: gntdev_pb2.SetMaxGrantsRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.SetMaxGrantsResponse:
        op = "gntdev set max grants"
        session = self.registry.session_for(context)
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
        return gntdev_pb2.SetMaxGrantsResponse()

    @rpc
    async def SetUnmapNotify(
        self, request: gntdev_pb2.SetUnmapNotifyRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.SetUnmapNotifyResponse:
        op = "gntdev set unmap notify"
        session = self.registry.session_for(context)
        check_notify_action(op, request.action)
        check_port_of_session(op, session, request.action, request.event_channel_port)
        session.gntdev.set_unmap_notify(request.index, request.action, request.event_channel_port)
        return gntdev_pb2.SetUnmapNotifyResponse()

    # ---------------------------------------------------------------- grant copy

    @rpc
    async def RegisterCopyBuffer(
        self, request: gntdev_pb2.RegisterCopyBufferRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.RegisterCopyBufferResponse:
        op = "gntdev register copy buffer"
        session = self.registry.session_for(context)
        # Descriptors first, even for a request about to be refused: a frame
        # left unclaimed would count against the session's pending frames.
        (fd,) = await session.take_fds(op, request.fd_transfer, [request.fd.index])
        with fd:
            ensure_live(session, op)
            if not 0 < request.length <= MAX_COPY_BUFFER_BYTES:
                raise invalid(op, f"length {request.length} is not between 1 and {MAX_COPY_BUFFER_BYTES} bytes")
            state = gntdev_state(session)
            if len(state.copy_buffers) >= MAX_COPY_BUFFERS_PER_SESSION:
                raise BrokerError(
                    errno.EDQUOT, op, f"this session has registered {len(state.copy_buffers)} copy buffers, the most allowed"
                )
            memory = _map_copy_buffer(op, fd.fileno(), request.length)
        buffer_id = state.next_id()
        state.copy_buffers[buffer_id] = _CopyBuffer(memory, request.length)
        return gntdev_pb2.RegisterCopyBufferResponse(buffer_id=buffer_id)

    @rpc
    async def UnregisterCopyBuffer(
        self, request: gntdev_pb2.UnregisterCopyBufferRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.UnregisterCopyBufferResponse:
        op = "gntdev unregister copy buffer"
        session = self.registry.session_for(context)
        buffer = gntdev_state(session).copy_buffers.pop(request.buffer_id, None)
        if buffer is None:
            raise BrokerError(errno.ENOENT, op, f"no copy buffer {request.buffer_id} in this session")
        buffer.memory.close()
        return gntdev_pb2.UnregisterCopyBufferResponse()

    @rpc
    async def GrantCopy(
        self, request: gntdev_pb2.GrantCopyRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.GrantCopyResponse:
        op = "gntdev grant copy"
        session = self.registry.session_for(context)
        if request.count != len(request.segments):
            raise invalid(op, f"count is {request.count} but {len(request.segments)} segments are given")
        if request.count > MAX_COPY_SEGMENTS:
            raise BrokerError(
                errno.E2BIG, op, f"{request.count} segments exceed the broker's {MAX_COPY_SEGMENTS} per call; split the copy"
            )
        state = gntdev_state(session)
        views: dict[int, memoryview] = {}  # one view of each copy buffer the call names
        inline_dests: dict[int, bytearray] = {}
        try:
            segments = [
                _copy_segment(op, state, i, segment, views, inline_dests) for i, segment in enumerate(request.segments)
            ]
            inline_bytes = sum(len(buffer) for buffer in inline_dests.values())
            if inline_bytes > MAX_INLINE_COPY_BYTES:
                raise BrokerError(
                    errno.E2BIG,
                    op,
                    f"{inline_bytes} bytes of inline destinations exceed {MAX_INLINE_COPY_BYTES}; register a copy buffer",
                )
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
        return response

    # ---------------------------------------------------------------- dma-buf

    @rpc
    async def DmabufExportFromRefs(
        self, request: gntdev_pb2.DmabufExportFromRefsRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.DmabufExportFromRefsResponse:
        op = "gntdev dma-buf export"
        session = self.registry.session_for(context)
        if request.count != len(request.refs):
            raise invalid(op, f"count is {request.count} but {len(request.refs)} refs are given")
        check_count(op, request.count)
        check_domid(op, request.domid)
        if request.flags & ~DMA_FLAGS:
            raise invalid(op, f"flags {request.flags:#x} has bits other than GNTDEV_DMA_FLAG_WC and GNTDEV_DMA_FLAG_COHERENT")
        quota_grants(session, op, request.count)
        state = gntdev_state(session)
        fd = session.gntdev.dmabuf_export_from_refs(request.domid, list(request.refs), request.flags)
        dmabuf_id = state.next_id()
        state.exports[dmabuf_id] = _Export(fd, request.count)
        session.usage.dmabufs += 1
        session.usage.mapped_grants += request.count
        try:
            transfer = await session.send_fds([fd.fileno()])
        finally:
            # The client has its own descriptor now; the broker keeps only the
            # number (see _Export).  Unless the session ended meanwhile and
            # closed it already.
            if not fd.closed:
                reserve_number(fd)
        return gntdev_pb2.DmabufExportFromRefsResponse(
            fd_transfer=transfer, fd=common_pb2.FdRef(index=0), dmabuf_id=dmabuf_id
        )

    @rpc
    async def DmabufExportWaitReleased(
        self, request: gntdev_pb2.DmabufExportWaitReleasedRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.DmabufExportWaitReleasedResponse:
        op = "gntdev dma-buf export wait released"
        session = self.registry.session_for(context)
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
                    errno.ETIMEDOUT,
                    op,
                    f"dma-buf {request.dmabuf_id} is still in use after {request.wait_to_ms} ms",
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
        return gntdev_pb2.DmabufExportWaitReleasedResponse()

    @rpc
    async def DmabufImportToRefs(
        self, request: gntdev_pb2.DmabufImportToRefsRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.DmabufImportToRefsResponse:
        op = "gntdev dma-buf import"
        session = self.registry.session_for(context)
        (fd,) = await session.take_fds(op, request.fd_transfer, [request.fd.index])
        try:
            ensure_live(session, op)
            if request.reserved != 0:
                raise invalid(op, f"reserved is {request.reserved}; it must be 0")
            check_count(op, request.count, "pages")
            check_domid(op, request.domid)
            quota_grants(session, op, request.count)
            instance = session.gntdev
            refs = instance.dmabuf_import_to_refs(fd.fileno(), request.domid, request.count)
        except BaseException:
            fd.close()
            raise
        state = gntdev_state(session)
        dmabuf_id = state.next_id()
        state.imports[dmabuf_id] = _Import(fd, instance, request.count)
        session.usage.dmabufs += 1
        session.usage.granted_pages += request.count
        return gntdev_pb2.DmabufImportToRefsResponse(dmabuf_id=dmabuf_id, refs=refs)

    @rpc
    async def DmabufImportRelease(
        self, request: gntdev_pb2.DmabufImportReleaseRequest, context: grpc.aio.ServicerContext
    ) -> gntdev_pb2.DmabufImportReleaseResponse:
        op = "gntdev dma-buf import release"
        session = self.registry.session_for(context)
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
        return gntdev_pb2.DmabufImportReleaseResponse()


# --------------------------------------------------------------------------- request checks


def _grant_refs(op: str, count: int, refs: Sequence[common_pb2.GrantRef]) -> tuple[GrantRef, ...]:
    if count != len(refs):
        raise invalid(op, f"count is {count} but {len(refs)} refs are given")
    check_count(op, count)
    for i, ref in enumerate(refs):
        check_domid(op, ref.domid, f"refs[{i}].domid")
    return tuple(GrantRef(ref.domid, ref.ref) for ref in refs)


def _packed_grant_refs(op: str, domids: Sequence[int], refs: Sequence[int]) -> tuple[GrantRef, ...]:
    """The grants of a MapRequest: refs[i] of domids[i], or of domids[0] for all."""
    if len(domids) == 1:
        (domid,) = domids
        check_domid(op, domid)
        return tuple([GrantRef(domid, ref) for ref in refs])
    if len(domids) != len(refs):
        raise invalid(op, f"{len(domids)} domids for {len(refs)} refs: give one per ref, or one for all of them")
    if max(domids) > DOMID_MAX:
        i = next(i for i, domid in enumerate(domids) if domid > DOMID_MAX)
        check_domid(op, domids[i], f"domids[{i}]")
    return tuple(map(GrantRef, domids, refs))


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
    length, flags, source, dest = segment.len, segment.flags, segment.source, segment.dest
    if length > U16_MAX:
        raise invalid(op, f"segment {i}: len {length} does not fit 16 bits")
    if flags & ~GNTCOPY_FLAGS:
        raise invalid(op, f"segment {i}: flags {flags:#x} has bits other than GNTCOPY_source_gref and GNTCOPY_dest_gref")
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
    if source_kind == "virt" and dest_kind == "virt":
        raise invalid(op, f"segment {i}: both sides are local; one side of a grant copy must be a grant")
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
        if foreign.offset > U16_MAX:
            raise invalid(op, f"segment {i}: {name} offset {foreign.offset} does not fit 16 bits")
        check_domid(op, foreign.domid, f"segment {i}: {name} domid")
        return CopyForeign(foreign.ref, foreign.offset, foreign.domid)
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
        return CopyLocal(view, local.offset)
    if inline_dests is None:  # inline source: the request's bytes
        return CopyLocal(memoryview(local.data), local.offset)
    if local.data or local.offset:
        raise invalid(op, f"segment {i}: an inline dest takes neither data nor an offset; its bytes come back in the response")
    inline_dests[i] = bytearray(length)
    return CopyLocal(memoryview(inline_dests[i]), 0)
