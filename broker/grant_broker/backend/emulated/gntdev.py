"""The emulated ``/dev/xen/gntdev``: maps other domains' grants into this one.

Behaviour follows Linux ``drivers/xen/gntdev.c`` (and ``gntdev-dmabuf.c``),
function by function:

* ``map_grant_refs`` = ``gntdev_ioctl_map_grant_ref``: nothing is asked of
  the hypervisor; the index is chosen by ``gntdev_add_map`` (first fit in page
  units, so a fresh instance answers 0).
* ``map_memory`` = ``gntdev_mmap``: the grants are mapped here (the hypercall
  happens at mmap time); the first call decides whether the mapping is
  read-only (``map->flags |= GNTMAP_readonly`` when the vma is not writable).
* ``unmap_grant_ref`` = ``gntdev_ioctl_unmap_grant_ref`` + ``gntdev_put_map``:
  the unmap notification fires (CLEAR_BYTE only if the grants were mapped, as
  ``__unmap_grant_pages`` does it), the grants are unmapped.
* closing the instance = ``gntdev_release``: every mapping is put.

Emulation limits (also listed in the backend's capability notes):

* memory already mmapped from a span stays accessible after unmap or close
  (on Linux it stays until munmap, and the notification waits for that
  munmap; here it fires at unmap / close);
* a dma-buf export must be exactly the pages of one backing (one gntalloc
  allocation), in order from its first page;
* a dma-buf import takes only memory the hypervisor made (see
  :meth:`EmulatedGntdev._dma_buf_backing`), never a file of the client's;
* ``get_offset_for_vaddr`` recognises a mapping by the backing file and
  offset mapped at *vaddr*, so another mapping of the same pages at that
  address (e.g. the granter's own) is taken for this instance's.
"""

from __future__ import annotations

import errno
import fcntl
import operator
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, cast

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
    packed_grants,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.gntdev import (
    GNTDEV_DMA_FLAG_COHERENT,
    GNTDEV_DMA_FLAG_WC,
    UNMAP_NOTIFY_CLEAR_BYTE,
    UNMAP_NOTIFY_SEND_EVENT,
)
from grant_broker.uapi.grant_table import GNTST_bad_domain, GNTST_okay

from .instance import LinkedInstance
from .grants import (
    Backing,
    GrantEntry,
    GrantStatusError,
    GrantSystem,
    access_mode,
    export_byte_locked,
    lock_export_byte,
    reopen_own_memfd,
    spans_of_entries,
)

if TYPE_CHECKING:
    from .hypervisor import EmulatedHypervisor

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

DOMID_SELF = 0x7FF0  # xen/include/public/xen.h

# Linux's module parameter ``limit`` of gntdev: the most grants one request
# (map or dma-buf) may name (gntdev_test_page_count).
DEFAULT_MAX_GRANTS = 64 * 1024

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_NOTIFY_ACTIONS = UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT


@dataclass(eq=False)
class _Mapping:
    """``struct gntdev_grant_map``: a reserved range of the instance's mmap space."""

    index: int  # in pages
    grants: GrantRefs
    readonly: bool | None = None  # decided by the first map_memory (map->flags)
    pinned: list[GrantEntry] | None = None  # set once the grants are mapped
    notify_flags: int = 0
    notify_addr: int = 0  # byte offset within the mapping
    notify_port: int = 0
    notify_hold: object | None = None  # the port's evtchn_get reference, with SEND_EVENT

    @property
    def count(self) -> int:
        return len(self.grants)


@dataclass(eq=False)
class _Export:
    """A dma-buf exported from grants (``gntdev_dmabuf`` in exp_list)."""

    fd: int  # the number returned to the caller: Linux looks buffers up by it
    backing: Backing
    lock_byte: int
    entries: list[GrantEntry] = field(default_factory=list)


@dataclass(eq=False)
class _Import:
    """A dma-buf whose pages this instance granted (``gntdev_dmabuf`` in imp_list)."""

    backing: Backing
    refs: tuple[int, ...]


class EmulatedGntdev(LinkedInstance, GntdevInstance):
    """One open gntdev of the emulated hypervisor, acting as domain ``domid``."""

    _device = "gntdev"

    def __init__(self, hypervisor: "EmulatedHypervisor", domid: int) -> None:
        self._maps: list[_Mapping] = []  # sorted by index, as priv->maps
        self._max_grants = DEFAULT_MAX_GRANTS
        self._cumulative_limit: int | None = None  # set by set_max_grants
        self._exports: list[_Export] = []
        self._imports: list[_Import] = []
        self._open_link(hypervisor, domid)

    # ------------------------------------------------------------------ lifetime

    def _release(self) -> None:
        """``gntdev_release``: put every mapping, drop dma-buf state."""
        with self._hv.lock:
            maps, self._maps = self._maps, []
            for mapping in maps:
                self._put(mapping)
            exports, self._exports = self._exports, []
            for export in exports:
                self._forget_export(export)
            imports, self._imports = self._imports, []
            for imported in imports:
                self._end_import(imported)

    # ------------------------------------------------------------------ map / unmap

    def map_grant_refs(self, refs: Sequence[GrantRef]) -> int:
        operation = "gntdev map grant refs"
        with self._hv.lock:
            self._enter(operation)
            grants = packed_grants(refs, operation)  # each domid and ref a __u32, or EINVAL
            count = len(grants)
            if count == 0:
                raise BrokerError(errno.EINVAL, operation, "no grant refs given")
            if count > self._max_grants:
                raise BrokerError(
                    errno.EINVAL, operation, f"{count} grants exceed the limit of {self._max_grants} per mapping"
                )
            if self._cumulative_limit is not None:
                in_use = sum(m.count for m in self._maps)
                if in_use + count > self._cumulative_limit:
                    raise BrokerError(
                        errno.ENOMEM,
                        operation,
                        f"{in_use} grants mapped, {count} more exceed the instance's limit of {self._cumulative_limit}",
                    )
            # gntdev_add_map: first fit, with Linux's strict '<' (a hole must be
            # larger than the new mapping to be reused).
            mapping = _Mapping(0, grants)
            position = len(self._maps)
            for i, existing in enumerate(self._maps):
                if mapping.index + count < existing.index:
                    position = i
                    break
                mapping.index = existing.index + existing.count
            self._maps.insert(position, mapping)
            return mapping.index << PAGE_SHIFT

    def _find(self, index: int, count: int) -> _Mapping | None:
        """``gntdev_find_map_index``: by page index; count 0 matches any size."""
        page = index >> PAGE_SHIFT
        for mapping in self._maps:
            if mapping.index == page and (count == 0 or mapping.count == count):
                return mapping
        return None

    def unmap_grant_ref(self, index: int, count: int) -> None:
        operation = "gntdev unmap grant ref"
        with self._hv.lock:
            self._enter(operation)
            mapping = self._find(index, count) if index >= 0 and count >= 0 else None
            if mapping is None:
                raise BrokerError(errno.ENOENT, operation, f"no mapping of {count} grants at index {index:#x}")
            self._maps.remove(mapping)
            self._put(mapping)

    def _put(self, mapping: _Mapping) -> None:
        """``gntdev_put_map`` for the last user: notify, then unmap the grants."""
        pinned, mapping.pinned = mapping.pinned, None
        flags, mapping.notify_flags = mapping.notify_flags, 0
        hold, mapping.notify_hold = mapping.notify_hold, None
        # Clear the byte before sending the event, so a peer woken by the event
        # reads the cleared byte (Linux orders them the other way round for
        # auto-translated guests; a PV dom0 clears at munmap, before either).
        if flags & UNMAP_NOTIFY_CLEAR_BYTE and pinned:
            entry = pinned[mapping.notify_addr >> PAGE_SHIFT]
            if not entry.backing.closed:
                entry.backing.clear_byte(entry.offset + (mapping.notify_addr & (PAGE_SIZE - 1)))
        if flags & UNMAP_NOTIFY_SEND_EVENT:
            self._hv.send_event(self.domid, mapping.notify_port)
        self._hv.release_event_port(hold)  # evtchn_put
        if pinned:
            GrantSystem.unpin_all(pinned)

    def _pin_all(self, grants: Sequence[GrantRef], *, write: bool, operation: str) -> list[GrantEntry]:
        """Map each grant (the hypercall); all or nothing, EINVAL naming the first refusal."""
        system, grantee = self._hv.grants, self.domid
        packed = grants if isinstance(grants, GrantRefs) else None
        if packed is not None and packed.domid is not None:
            # The usual batch: one granting domain, its table looked up once
            # and the refs pinned as one array (GrantTable.pin_refs).
            try:
                return system.table_of(packed.domid).pin_refs(packed.refs, grantee, write=write)
            except GrantStatusError as refusal:
                raise BrokerError(
                    errno.EINVAL, operation, refusal.naming(packed.refs[refusal.position], packed.domid),
                    gntst=refusal.status,
                ) from None
        pinned: list[GrantEntry] = []
        # GrantSystem.pin, inlined with the table of the previous grant kept.
        table = None
        pairs = packed.pairs() if packed is not None else ((grant.domid, grant.ref) for grant in grants)
        domid = ref = 0
        try:
            for domid, ref in pairs:
                if table is None or table.domid != domid:
                    table = system.table_of(domid)
                entry = table.lookup(ref, grantee, write=write)
                entry.pins += 1
                pinned.append(entry)
        except GrantStatusError as refusal:
            GrantSystem.unpin_all(pinned)
            raise BrokerError(errno.EINVAL, operation, refusal.naming(ref, domid), gntst=refusal.status) from None
        return pinned

    def map_memory(self, index: int, count: int, *, writable: bool) -> list[MemorySpan]:
        operation = "gntdev map memory"
        with self._hv.lock:
            self._enter(operation)
            if index < 0 or index & (PAGE_SIZE - 1) or count <= 0:
                raise BrokerError(errno.EINVAL, operation, f"no mapping of {count} grants at index {index:#x}")
            mapping = self._find(index, count)
            if mapping is None:
                raise BrokerError(errno.EINVAL, operation, f"no mapping of {count} grants at index {index:#x}")
            if mapping.readonly is None:
                # Decided before the grants are mapped and kept even if that
                # fails, as gntdev_mmap sets map->flags first.
                mapping.readonly = not writable
            elif writable and mapping.readonly:
                raise BrokerError(
                    errno.EINVAL, operation, f"the mapping at index {index:#x} was made read-only by its first map"
                )
            if mapping.pinned is None:
                mapping.pinned = self._pin_all(mapping.grants, write=not mapping.readonly, operation=operation)
            try:
                return spans_of_entries(mapping.pinned, writable=writable)
            except OSError as exc:
                raise BrokerError.from_oserror(exc, operation) from exc

    def get_offset_for_vaddr(self, vaddr: int) -> tuple[int, int]:
        operation = "gntdev get offset for vaddr"
        with self._hv.lock:
            self._enter(operation)
            where = _file_at(vaddr)
            if where is not None:
                dev, ino, offset = where
                for mapping in self._maps:
                    if mapping.pinned:
                        first = mapping.pinned[0]
                        backing = first.backing
                        if (backing.dev, backing.ino, first.offset) == (dev, ino, offset):
                            return mapping.index << PAGE_SHIFT, mapping.count
            raise BrokerError(errno.EINVAL, operation, f"no mapping of this instance starts at address {vaddr:#x}")

    def set_max_grants(self, count: int) -> None:
        operation = "gntdev set max grants"
        with self._hv.lock:
            self._enter(operation)
            if not 0 <= count <= _U32:
                raise BrokerError(errno.EINVAL, operation, f"limit {count} is out of range")
            self._max_grants = count
            self._cumulative_limit = count

    def set_unmap_notify(self, offset: int, action: int, port: int) -> None:
        operation = "gntdev set unmap notify"
        with self._hv.lock:
            self._enter(operation)
            # gntdev_ioctl_notify's order: action bits, port, then the mapping.
            if action & ~_NOTIFY_ACTIONS or action < 0:
                raise BrokerError(errno.EINVAL, operation, f"unknown action bits in {action:#x}")
            # evtchn_get: the notification holds the port bound until it is sent.
            hold = self._hv.hold_event_port(self.domid, port) if action & UNMAP_NOTIFY_SEND_EVENT else None
            if action & UNMAP_NOTIFY_SEND_EVENT and hold is None:
                raise BrokerError(errno.EINVAL, operation, f"event channel port {port} is not bound in domain {self.domid}")
            try:
                for mapping in self._maps:
                    begin = mapping.index << PAGE_SHIFT
                    if begin <= offset < begin + (mapping.count << PAGE_SHIFT):
                        break
                else:
                    raise BrokerError(errno.ENOENT, operation, f"offset {offset:#x} is in no mapping of this instance")
                if action & UNMAP_NOTIFY_CLEAR_BYTE and mapping.readonly:
                    raise BrokerError(
                        errno.EINVAL, operation, f"CLEAR_BYTE on the read-only mapping at index {begin:#x}"
                    )
            except BrokerError:
                self._hv.release_event_port(hold)
                raise
            replaced = mapping.notify_hold
            mapping.notify_flags = action
            mapping.notify_addr = offset - begin
            mapping.notify_port = port
            mapping.notify_hold = hold
            self._hv.release_event_port(replaced)  # the replaced notification's reference

    # ------------------------------------------------------------------ grant copy

    def grant_copy(self, segments: Sequence[GrantCopySegment]) -> list[int]:
        operation = "gntdev grant copy"
        with self._hv.lock:
            self._enter(operation)
            if isinstance(segments, GrantCopyBatch):
                done = self._copy_batch(segments)
                if done is not None:
                    return done
            # Linux checks a segment as it reaches it, and may already have
            # copied earlier ones; the contract promises EINVAL before
            # anything is copied, so every segment is checked first.
            views: dict[int, memoryview] = {}  # each local buffer as bytes, checked once per call
            plans = [self._check_segment(i, seg, operation, views) for i, seg in enumerate(segments)]
            statuses: list[int] = []
            # Segments contiguous on both sides (one backing, one local buffer,
            # adjacent offsets) are copied at once: a page-sized segment costs
            # a syscall otherwise, and a batch of them is usually one run.
            run: _CopyRun | None = None
            for seg, (src_view, dst_view) in zip(segments, plans):
                source, dest = seg.source, seg.dest
                try:
                    src_entry, dst_entry = self._claim(source, dest)
                except GrantStatusError as refusal:
                    statuses.append(refusal.status)  # nothing copied: a run goes on past it
                    continue
                statuses.append(GNTST_okay)
                if dst_entry is None:  # granted page -> local buffer
                    assert src_entry is not None and dst_view is not None
                    reading, entry, page_offset, view, local_offset = True, src_entry, source.offset, dst_view, dest.offset
                elif src_entry is None:  # local buffer -> granted page
                    assert src_view is not None
                    reading, entry, page_offset, view, local_offset = False, dst_entry, dest.offset, src_view, source.offset
                else:  # granted page -> granted page: on its own, in order
                    if run is not None:
                        run.copy()
                        run = None
                    _copy_between(seg, src_entry, dst_entry)
                    continue
                file_offset = entry.offset + page_offset
                if run is not None and run.continued_by(reading, entry.backing, file_offset, view, local_offset):
                    run.length += seg.length
                    continue
                if run is not None:
                    run.copy()
                run = _CopyRun(reading, entry.backing, file_offset, view, local_offset, seg.length)
            if run is not None:
                run.copy()
            return statuses

    def _copy_batch(self, batch: GrantCopyBatch) -> list[int] | None:
        """:meth:`grant_copy` of a batch over its columns, per run of segments
        with one foreign side of one domain: one look-up of that domain's
        table and of the run's entries at once, every entry checked as
        :meth:`_claim` checks it, one ``preadv``/``pwrite`` per contiguous
        stretch.  None, having done nothing, when the batch is not one of
        those (mixed flags, foreign on both sides) or a segment fails
        :meth:`_check_segment`'s rules: then segment by segment."""
        count = len(batch)
        flags = batch.uniform_flags()
        if flags == _SOURCE_GREF:
            reading = True
            refs, offsets, domids, local = batch.source, batch.source_offset, batch.source_domid, batch.dest
        elif flags == _DEST_GREF:
            reading = False
            refs, offsets, domids, local = batch.dest, batch.dest_offset, batch.dest_domid, batch.source
        else:
            return None
        # _check_segment's rules, over the columns.
        length = batch.length
        buffer = batch.buffer
        try:
            view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        except TypeError:
            return None
        longest = max(length)
        if (
            min(length) < 0
            or longest > _U16
            or min(offsets) < 0
            or min(local) < 0
            or (reading and view.readonly)
            # The bounds: at once when the largest offset and the longest
            # length fit together, else segment by segment.
            or (max(offsets) + longest > PAGE_SIZE and max(map(operator.add, offsets, length)) > PAGE_SIZE)
            or (max(local) + longest > view.nbytes and max(map(operator.add, local, length)) > view.nbytes)
        ):
            return None
        statuses: list[int] = []
        tables = self._hv.grants.tables
        me = self.domid
        start = 0
        for end in _runs(domids):
            domid = domids[start]
            table = tables.get(me if domid == DOMID_SELF else domid)
            if table is None:  # table_of's refusal, for each segment of the run
                statuses += repeat(GNTST_bad_domain, end - start)
                start = end
                continue
            whole = start == 0 and end == count  # one run: the columns as they are
            run_refs = refs if whole else refs[start:end]
            entries: list[GrantEntry | None] = list(map(table.entries.get, run_refs))
            try:
                refused = list(map(_grantee, entries)).count(me) != end - start or (
                    not reading and any(map(_readonly, entries))
                )
            except AttributeError:  # a None: a ref not granted
                refused = True
            if refused:
                # Some are refused: lookup() says which, and why (its status).
                entries = []
                for ref in run_refs:
                    try:
                        entries.append(table.lookup(ref, me, write=not reading))
                        statuses.append(GNTST_okay)
                    except GrantStatusError as refusal:
                        entries.append(None)
                        statuses.append(refusal.status)
            else:
                statuses += repeat(GNTST_okay, end - start)
            if whole:
                _copy_entries(reading, entries, offsets, view, local, length)
            else:
                _copy_entries(reading, entries, offsets[start:end], view, local[start:end], length[start:end])
            start = end
        assert len(statuses) == count
        return statuses

    def _check_segment(
        self, i: int, seg: GrantCopySegment, operation: str, views: dict[int, memoryview]
    ) -> tuple[memoryview | None, memoryview | None]:
        """``gntdev_grant_copy_seg``'s checks; returns the local views (source, dest)."""
        source, dest, length = seg.source, seg.dest, seg.length
        if isinstance(source, CopyLocal) and isinstance(dest, CopyLocal):
            raise BrokerError(errno.EINVAL, operation, f"segment {i}: both sides are local buffers")
        if not 0 <= length <= _U16:
            raise BrokerError(errno.EINVAL, operation, f"segment {i}: length {length} does not fit the 16-bit field")
        return (
            self._check_side(i, source, "source", length, operation, views),
            self._check_side(i, dest, "destination", length, operation, views),
        )

    @staticmethod
    def _check_side(
        i: int, side: CopyLocal | CopyForeign, name: str, length: int, operation: str, views: dict[int, memoryview]
    ) -> memoryview | None:
        if isinstance(side, CopyForeign):
            if side.offset < 0 or side.offset + length > PAGE_SIZE:
                raise BrokerError(
                    errno.EINVAL,
                    operation,
                    f"segment {i}: {name} ref {side.ref} of domain {side.domid}: "
                    f"{length} bytes at offset {side.offset} cross the page boundary",
                )
            return None
        buffer = side.buffer
        view = views.get(id(buffer))
        if view is None:
            try:
                view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
            except TypeError:
                raise BrokerError(errno.EINVAL, operation, f"segment {i}: {name} buffer is not contiguous") from None
            views[id(buffer)] = view
        if side.offset < 0 or side.offset + length > view.nbytes:
            raise BrokerError(
                errno.EINVAL,
                operation,
                f"segment {i}: {name} range {side.offset}..{side.offset + length} is outside its {view.nbytes}-byte buffer",
            )
        if name == "destination" and view.readonly:
            # get_user_pages(FOLL_WRITE) fails on it: the header's EFAULT.
            raise BrokerError(errno.EFAULT, operation, f"segment {i}: destination buffer is read-only")
        return view

    def _copy_domid(self, side: CopyForeign) -> int:
        """``gnttab_copy_lock_domain`` looks the domain up with
        ``rcu_lock_domain_by_any_id``: DOMID_SELF is the copying domain (a map's
        ``rcu_lock_domain_by_id`` answers GNTST_bad_domain to it instead)."""
        return self.domid if side.domid == DOMID_SELF else side.domid

    def _claim(
        self, source: CopyLocal | CopyForeign, dest: CopyLocal | CopyForeign
    ) -> tuple[GrantEntry | None, GrantEntry | None]:
        """One ``gnttab_copy`` op's checks: the grant entries of its foreign
        sides (source, dest), or GrantStatusError with its GNTST status."""
        grants = self._hv.grants
        if isinstance(source, CopyForeign):
            if isinstance(dest, CopyForeign):
                # gnttab_copy_lock_domains: source then destination domain,
                # before gnttab_copy_claim_buf claims either.
                grants.table_of(self._copy_domid(source))
                grants.table_of(self._copy_domid(dest))
                return (
                    grants.access(self._copy_domid(source), source.ref, self.domid, write=False),
                    grants.access(self._copy_domid(dest), dest.ref, self.domid, write=True),
                )
            return grants.access(self._copy_domid(source), source.ref, self.domid, write=False), None
        assert isinstance(dest, CopyForeign)  # (one side is foreign: _check_segment)
        return None, grants.access(self._copy_domid(dest), dest.ref, self.domid, write=True)

    # ------------------------------------------------------------------ dma-buf

    def dmabuf_export_from_refs(self, domid: int, refs: Sequence[int], flags: int = 0) -> OwnedFd:
        operation = "gntdev dma-buf export from refs"
        with self._hv.lock:
            self._enter(operation)
            refs = tuple(refs)
            if flags & ~(GNTDEV_DMA_FLAG_WC | GNTDEV_DMA_FLAG_COHERENT) or flags < 0:
                raise BrokerError(errno.EINVAL, operation, f"unknown dma-buf flags {flags:#x}")
            if not refs or len(refs) > self._max_grants:
                raise BrokerError(errno.EINVAL, operation, f"{len(refs)} refs: expected 1..{self._max_grants}")
            # dmabuf_exp_from_refs maps the grants writable (GNTMAP_host_map).
            entries = self._pin_all([GrantRef(domid, ref) for ref in refs], write=True, operation=operation)
            backing = entries[0].backing
            whole = all(e.backing is backing and e.page == i for i, e in enumerate(entries))
            if not whole or len(entries) != backing.pages:
                for entry in entries:
                    self._hv.grants.unpin(entry)
                raise BrokerError(
                    errno.EINVAL,
                    operation,
                    f"emulation limit: refs {list(refs)} of domain {domid} are not all the pages of one "
                    "granted buffer in order from its first page",
                )
            try:
                # A dma-buf is a file of its own (its release is tracked by the
                # lock on this description), so a new description is opened —
                # of the hypervisor's own memfd: backings are never a client's file.
                fd = reopen_own_memfd(backing.fd, os.O_RDWR)
            except OSError as exc:
                for entry in entries:
                    self._hv.grants.unpin(entry)
                raise BrokerError.from_oserror(exc, operation) from exc
            owned = OwnedFd(fd)
            byte = self._hv.next_export_byte()
            try:
                lock_export_byte(fd, byte)
            except OSError as exc:
                owned.close()
                for entry in entries:
                    self._hv.grants.unpin(entry)
                raise BrokerError.from_oserror(exc, operation) from exc
            backing.hold()  # the probe for wait_released must outlive the grants
            self._exports.append(_Export(fd, backing, byte, entries))
            return owned

    def _export_released(self, export: _Export) -> bool:
        return export.backing.closed or not export_byte_locked(export.backing.export_probe_fd, export.lock_byte)

    def _forget_export(self, export: _Export) -> None:
        entries, export.entries = export.entries, []
        for entry in entries:
            self._hv.grants.unpin(entry)
        export.backing.drop()

    def _prune_exports(self) -> None:
        """Forget exported buffers that were released (Linux unlinks them from exp_list)."""
        for export in list(self._exports):
            if self._export_released(export):
                self._exports.remove(export)
                self._forget_export(export)

    def dmabuf_export_wait_released(self, fd: int, timeout_ms: int) -> None:
        operation = "gntdev dma-buf export wait released"
        with self._hv.lock:
            self._enter(operation)
            if not 0 <= timeout_ms <= _U32:
                raise BrokerError(errno.EINVAL, operation, f"timeout {timeout_ms} ms is out of range")
            self._prune_exports()
            # Linux looks the buffer up by the fd number the export returned.
            matches = [export for export in self._exports if export.fd == fd]
            if not matches:
                raise BrokerError(
                    errno.ENOENT, operation, f"fd {fd} is no live dma-buf exported by this instance (never, or already released)"
                )
            export = matches[-1]
        deadline = time.monotonic() + timeout_ms / 1000
        delay = 0.001
        while True:
            with self._hv.lock:
                if export not in self._exports:
                    return  # released together with the instance
                if self._export_released(export):
                    self._exports.remove(export)
                    self._forget_export(export)
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(errno.ETIMEDOUT, operation, f"the dma-buf exported as fd {fd} is still in use after {timeout_ms} ms")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def dmabuf_import_to_refs(self, fd: int, domid: int, count: int) -> tuple[int, ...]:
        operation = "gntdev dma-buf import to refs"
        with self._hv.lock:
            self._enter(operation)
            if not 0 < count <= self._max_grants:
                raise BrokerError(errno.EINVAL, operation, f"count {count}: expected 1..{self._max_grants}")
            backing = self._dma_buf_backing(fd, operation)
            if backing.pages != count:
                raise BrokerError(errno.EINVAL, operation, f"fd {fd} holds {backing.pages} pages, not {count}")
            table = self._hv.grants.create(self.domid)
            backing.hold()  # the import's own reference, dropped at release
            try:
                refs = table.grant_pages(backing, range(count), domid, readonly=False, operation=operation)
            except BaseException:
                backing.drop()
                raise
            imported = _Import(backing, tuple(refs))
            self._imports.append(imported)
            return imported.refs

    def _dma_buf_backing(self, fd: int, operation: str) -> Backing:
        """The hypervisor's own memory that *fd* is a writable descriptor of.

        ``dma_buf_get`` answers EBADF for a closed fd and EINVAL for a file that
        is no dma-buf.  What a real importer accepts, a dma-buf, is here what
        the hypervisor made: a dma-buf it exported, or the pages of one of its
        gntalloc allocations (the same memfd), recognised by identity.  *fd* is
        only looked at (fstat, F_GETFL): never reopened, read, mapped or kept —
        the pages granted are the hypervisor's backing — so a client's O_PATH or
        O_RDONLY descriptor of some file cannot lend it the broker's access.
        It must be writable: the refs are writable grants, and a read-only
        view (a read-only span) must not turn into writable refs.
        """
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except (OSError, OverflowError) as exc:
            raise BrokerError(errno.EBADF, operation, f"fd {fd} is not open") from exc
        backing = self._hv.memory.backing_of(st)
        if backing is None:
            raise BrokerError(
                errno.EINVAL,
                operation,
                f"fd {fd} is not a dma-buf (the emulated hypervisor imports only memory it made: "
                "a dma-buf it exported or its gntalloc pages)",
            )
        if access_mode(flags) != os.O_RDWR:
            raise BrokerError(
                errno.EINVAL,
                operation,
                f"fd {fd} is not open read-write (a read-only view of granted memory is no dma-buf): "
                "its pages cannot be granted writable",
            )
        return backing

    def dmabuf_import_release(self, fd: int) -> None:
        operation = "gntdev dma-buf import release"
        with self._hv.lock:
            self._enter(operation)
            try:
                st = os.fstat(fd)  # identity only: the import is named by its file
            except OSError as exc:
                raise BrokerError.from_oserror(exc, operation, f"fd {fd}") from exc
            for imported in self._imports:
                if (imported.backing.dev, imported.backing.ino) == (st.st_dev, st.st_ino):
                    break
            else:
                raise BrokerError(errno.ENOENT, operation, f"fd {fd} is not a dma-buf imported by this instance")
            self._imports.remove(imported)
            self._end_import(imported)

    def _end_import(self, imported: _Import) -> None:
        table = self._hv.grants.tables.get(self.domid)
        if table is not None:
            for ref in imported.refs:
                table.end(ref)
        imported.backing.drop()

    def __repr__(self) -> str:
        return f"<EmulatedGntdev domain {self.domid} {self._link!r}>"


def _file_at(vaddr: int) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, file offset) of the file mapped at *vaddr* in this process."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 5:
                    continue
                start_text, _, end_text = fields[0].partition("-")
                start, end = int(start_text, 16), int(end_text, 16)
                if not start <= vaddr < end:
                    continue
                inode = int(fields[4])
                if inode == 0:
                    return None
                major, _, minor = fields[3].partition(":")
                dev = os.makedev(int(major, 16), int(minor, 16))
                return dev, inode, int(fields[2], 16) + (vaddr - start)
    except OSError:
        return None
    return None


_SOURCE_GREF = 1  # GNTCOPY_source_gref
_DEST_GREF = 2  # GNTCOPY_dest_gref
_grantee = operator.attrgetter("grantee")
_readonly = operator.attrgetter("readonly")
_backing = operator.attrgetter("backing")
_page = operator.attrgetter("page")


def _runs(domids: Sequence[int]) -> list[int]:
    """The ends of the runs of equal domains in *domids* (not empty)."""
    count = len(domids)
    if domids.count(domids[0]) == count:
        return [count]
    ends = [i for i in range(1, count) if domids[i] != domids[i - 1]]
    ends.append(count)
    return ends


def _as_list(values: Sequence[int]) -> list[int]:
    return values if isinstance(values, list) else list(values)


def _copy_entries(
    reading: bool,
    entries: list[GrantEntry | None],
    page_offsets: Sequence[int],
    view: memoryview,
    local: Sequence[int],
    length: Sequence[int],
) -> None:
    """Copy between the granted pages of *entries* (None: refused, nothing
    copied) and *view*: one :class:`_CopyRun` when the whole run is contiguous
    on both sides (one backing, adjacent pages and offsets), else run by run."""
    count = len(entries)
    if entries.count(None) == 0:
        granted = cast("list[GrantEntry]", entries)
        backings = list(map(_backing, granted))
        backing = backings[0]
        if backings.count(backing) == count:
            first_page, first_local = granted[0].page, local[0]
            if page_offsets.count(0) == count and length.count(PAGE_SIZE) == count:
                # Whole pages (the usual batch): contiguous if the pages and the local offsets follow on.
                contiguous = list(map(_page, granted)) == list(range(first_page, first_page + count)) and _as_list(
                    local
                ) == list(range(first_local, first_local + count * PAGE_SIZE, PAGE_SIZE))
            else:
                file_offsets = list(map(operator.add, map(operator.mul, map(_page, granted), repeat(PAGE_SIZE)), page_offsets))
                contiguous = (
                    file_offsets[1:] == list(map(operator.add, file_offsets, length))[:-1]
                    and list(local[1:]) == list(map(operator.add, local, length))[:-1]
                )
            if contiguous:
                _CopyRun(reading, backing, first_page * PAGE_SIZE + page_offsets[0], view, first_local, sum(length)).copy()
                return
    run: _CopyRun | None = None
    for entry, page_offset, local_offset, size in zip(entries, page_offsets, local, length):
        if entry is None:
            continue  # refused: a run goes on past it
        file_offset = entry.offset + page_offset
        if run is not None and run.continued_by(reading, entry.backing, file_offset, view, local_offset):
            run.length += size
            continue
        if run is not None:
            run.copy()
        run = _CopyRun(reading, entry.backing, file_offset, view, local_offset, size)
    if run is not None:
        run.copy()


@dataclass(slots=True)
class _CopyRun:
    """Consecutive copy segments between one backing's file and one local
    buffer, contiguous on both sides: one ``preadv`` (*reading*: from the
    granted pages into the buffer) or one ``pwrite`` (into the pages) for all
    of them.  One copy of the bytes, as ``__gnttab_copy``'s memcpy between a
    local buffer and a granted page; results as if copied one by one (copies
    whose source and dest overlap are as undefined as memcpy's)."""

    reading: bool
    backing: Backing
    file_offset: int
    view: memoryview
    local_offset: int
    length: int

    def continued_by(self, reading: bool, backing: Backing, file_offset: int, view: memoryview, local_offset: int) -> bool:
        """Whether a segment with these sides continues this run on both sides."""
        length = self.length
        return (
            file_offset == self.file_offset + length
            and local_offset == self.local_offset + length
            and backing is self.backing
            and view is self.view
            and reading == self.reading
        )

    def copy(self) -> None:
        local = self.view[self.local_offset : self.local_offset + self.length]
        if self.reading:
            self.backing.read_into(self.file_offset, local)
        else:
            self.backing.write(self.file_offset, local)


def _copy_between(seg: GrantCopySegment, src_entry: GrantEntry, dst_entry: GrantEntry) -> None:
    """A copy between two granted pages (through a bounce buffer, as Xen's)."""
    assert isinstance(seg.source, CopyForeign) and isinstance(seg.dest, CopyForeign)
    data = src_entry.backing.read(src_entry.offset + seg.source.offset, seg.length)
    dst_entry.backing.write(dst_entry.offset + seg.dest.offset, data)
