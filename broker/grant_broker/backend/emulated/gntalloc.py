"""The emulated ``/dev/xen/gntalloc``: shares this domain's own pages.

Behaviour follows Linux ``drivers/xen/gntalloc.c``:

* pages are tracked one by one (``struct gntalloc_gref``) with their offset in
  the instance's mmap space; offsets grow monotonically (``priv->index``), so
  the first allocation is at 0 and offsets are never reused;
* ``find_grefs`` accepts any run of consecutive pages, even across
  allocations, for dealloc and for mapping;
* a page leaves the instance on dealloc or close (``__del_gref``): its unmap
  notification fires, and its grant is ended — deferred while another domain
  still maps it, as ``gnttab_end_foreign_access`` does;
* granting to a domain that does not exist is allowed (Linux never checks).

Each allocation is one memfd (a :class:`~.grants.Backing`, sealed against
resizing), so the spans of one allocation coalesce into one descriptor.  As on Linux, the instance's own
mmaps of its pages cannot be tracked: the notification fires at dealloc or
close, not at a later munmap.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grant_broker.backend.contract import PAGE_SIZE, GntallocInstance, GrantAllocation, MemorySpan
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi.gntalloc import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT

from .instance import LinkedInstance
from .grants import Backing, spans_of

if TYPE_CHECKING:
    from .hypervisor import EmulatedHypervisor

_NOTIFY_ACTIONS = UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT
_U16 = 0xFFFF


@dataclass(eq=False)
class _Gref:
    """``struct gntalloc_gref``: one page of the instance."""

    file_index: int  # byte offset in the instance's mmap space
    ref: int
    backing: Backing
    page: int
    notify_flags: int = 0
    notify_pgoff: int = 0
    notify_port: int = 0
    notify_hold: object | None = None  # the port's evtchn_get reference, with SEND_EVENT


class EmulatedGntalloc(LinkedInstance, GntallocInstance):
    """One open gntalloc of the emulated hypervisor, granting as domain ``domid``."""

    _device = "gntalloc"

    def __init__(self, hypervisor: "EmulatedHypervisor", domid: int) -> None:
        self._index = 0  # priv->index
        self._grefs: dict[int, _Gref] = {}  # by file_index, in allocation order
        self._open_link(hypervisor, domid)

    # ------------------------------------------------------------------ lifetime

    def _release(self) -> None:
        """``gntalloc_release``: every page leaves the instance."""
        with self._hv.lock:
            grefs, self._grefs = list(self._grefs.values()), {}
            for gref in grefs:
                self._del_gref(gref)

    # ------------------------------------------------------------------ operations

    def alloc_gref(self, domid: int, count: int, *, writable: bool = True) -> GrantAllocation:
        operation = "gntalloc alloc gref"
        with self._hv.lock:
            self._enter(operation)
            if count <= 0:
                raise BrokerError(errno.EINVAL, operation, f"count {count}: at least one page is needed")
            if not 0 <= domid <= _U16:
                raise BrokerError(errno.EINVAL, operation, f"domain {domid} does not fit the 16-bit domid field")
            # The module parameter ``limit`` caps the pages of all gntalloc
            # users of the domain (gref_size); beyond it Linux answers ENOSPC.
            in_use = self._hv.gntalloc_pages(self.domid)
            limit = self._hv.gntalloc_limit
            if in_use + count > limit:
                raise BrokerError(
                    errno.ENOSPC,
                    operation,
                    f"domain {self.domid} has {in_use} gntalloc pages; {count} more exceed the limit of {limit}",
                )
            table = self._hv.grants.create(self.domid)
            backing = self._hv.memory.allocate(count, f"gntalloc-d{self.domid}")
            try:
                refs = table.grant_pages(backing, range(count), domid, readonly=not writable, operation=operation)
            except BaseException:
                backing.force_close()
                raise
            index = self._index
            self._index += count * PAGE_SIZE
            for page, ref in enumerate(refs):
                backing.hold()  # the page's place in the instance
                gref = _Gref(index + page * PAGE_SIZE, ref, backing, page)
                self._grefs[gref.file_index] = gref
            self._hv.gntalloc_pages_changed(self.domid, count)
            return GrantAllocation(index=index, domid=domid, writable=writable, refs=tuple(refs))

    def _find_grefs(self, index: int, count: int) -> list[_Gref] | None:
        """``find_grefs``: *count* consecutive pages from *index*, or None."""
        if count <= 0 or index < 0:
            return None
        found = []
        for i in range(count):
            gref = self._grefs.get(index + i * PAGE_SIZE)
            if gref is None:
                return None
            found.append(gref)
        return found

    def dealloc_gref(self, index: int, count: int) -> None:
        operation = "gntalloc dealloc gref"
        with self._hv.lock:
            self._enter(operation)
            grefs = self._find_grefs(index, count)
            if grefs is None:
                raise BrokerError(errno.EINVAL, operation, f"no {count} allocated pages at index {index:#x}")
            for gref in grefs:
                del self._grefs[gref.file_index]
            for gref in grefs:
                self._del_gref(gref)

    def _del_gref(self, gref: _Gref) -> None:
        """``__del_gref``: notify, end the grant (deferred while mapped), free the page."""
        backing = gref.backing
        if gref.notify_flags & UNMAP_NOTIFY_CLEAR_BYTE and not backing.closed:
            backing.clear_byte(gref.page * PAGE_SIZE + gref.notify_pgoff)
        if gref.notify_flags & UNMAP_NOTIFY_SEND_EVENT:
            self._hv.send_event(self.domid, gref.notify_port)
        gref.notify_flags = 0
        hold, gref.notify_hold = gref.notify_hold, None
        self._hv.release_event_port(hold)  # evtchn_put
        table = self._hv.grants.tables.get(self.domid)
        if table is not None:
            table.end(gref.ref)
        backing.drop()
        self._hv.gntalloc_pages_changed(self.domid, -1)

    def set_unmap_notify(self, offset: int, action: int, port: int) -> None:
        operation = "gntalloc set unmap notify"
        with self._hv.lock:
            self._enter(operation)
            # gntalloc_ioctl_unmap_notify's order: the page, the action bits, the port.
            gref = self._grefs.get(offset & ~(PAGE_SIZE - 1)) if offset >= 0 else None
            if gref is None:
                raise BrokerError(errno.ENOENT, operation, f"offset {offset:#x} is in no allocated page of this instance")
            if action & ~_NOTIFY_ACTIONS or action < 0:
                raise BrokerError(errno.EINVAL, operation, f"unknown action bits in {action:#x}")
            # evtchn_get: the notification holds the port bound until it is sent.
            hold = self._hv.hold_event_port(self.domid, port) if action & UNMAP_NOTIFY_SEND_EVENT else None
            if action & UNMAP_NOTIFY_SEND_EVENT and hold is None:
                raise BrokerError(errno.EINVAL, operation, f"event channel port {port} is not bound in domain {self.domid}")
            replaced = gref.notify_hold
            gref.notify_flags = action
            gref.notify_pgoff = offset & (PAGE_SIZE - 1)
            gref.notify_port = port
            gref.notify_hold = hold
            self._hv.release_event_port(replaced)  # the replaced notification's reference

    def memory_spans(self, index: int, count: int) -> list[MemorySpan]:
        operation = "gntalloc map memory"
        with self._hv.lock:
            self._enter(operation)
            grefs = self._find_grefs(index, count)
            if grefs is None:
                # gntalloc_mmap answers ENOENT when find_grefs fails.
                raise BrokerError(errno.ENOENT, operation, f"no {count} allocated pages at index {index:#x}")
            try:
                return spans_of([(g.backing, g.page) for g in grefs], writable=True)
            except OSError as exc:
                raise BrokerError.from_oserror(exc, operation) from exc

    def __repr__(self) -> str:
        return f"<EmulatedGntalloc domain {self.domid} {self._link!r}>"
