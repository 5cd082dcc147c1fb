"""The emulated hypervisor's memory: backings, grant tables, grant entries.

Model
-----
* A :class:`Backing` is one memfd of whole pages: one per gntalloc allocation
  and one per imported dma-buf.  It stays open while anything uses it (a page
  of a gntalloc instance, an import, a dma-buf export, a grant entry) and is
  closed by the last user, so the fd-leak checks of the tests see every
  descriptor come back.  Spans handed out are other descriptors of the same
  memfd: the memory outlives the backing as long as they, or mmaps, do.
* Each domain has one :class:`GrantTable` (version 1, the Linux default):
  ``NR_GRANT_ENTRIES`` slots, of which the first ``GNTTAB_NR_RESERVED_ENTRIES``
  are the toolstack's, so Linux hands out refs from 8 up.  An entry grants one
  page of a backing to one domain, read-only or writable.
* A mapping *pins* the entries it maps (``act->pin`` in Xen).  Ending a grant
  that is pinned is deferred until the last pin goes, as Linux's
  ``gnttab_end_foreign_access`` does after XSA-396: meanwhile the entry stays
  valid, exactly as on real Xen, where the entry keeps GTF_permit_access until
  the deferred end succeeds.

Statuses follow xen-project/xen ``xen/common/grant_table.c``:

* ``map_grant_ref()``: ``rcu_lock_domain_by_id()`` fails -> GNTST_bad_domain;
  ``op->ref >= nr_grant_entries(rgt)`` -> GNTST_bad_gntref; an entry not
  granted to the mapping domain (``_set_status_v1``: flags not
  GTF_permit_access or ``scombo.domid != ldomid``) -> GNTST_general_error;
  write-pinning a GTF_readonly entry ("Attempt to write-pin a r/o grant
  entry") -> GNTST_general_error.
* ``gnttab_copy_lock_domain()`` -> GNTST_bad_domain, then
  ``acquire_grant_for_copy()`` with the same checks as above (the destination
  is acquired writable, so a read-only destination grant is
  GNTST_general_error, not GNTST_permission_denied).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from grant_broker.backend.contract import PAGE_SIZE, MemorySpan
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.grant_table import (
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_general_error,
    GNTTAB_NR_RESERVED_ENTRIES,
)

# Xen's default table size: opt_max_grant_frames = 64 frames of v1 entries,
# sizeof(struct grant_entry_v1) == 8 (checked in tests/test_uapi_layout.py).
NR_GRANT_FRAMES = 64
_GRANT_ENTRY_V1_SIZE = 8
NR_GRANT_ENTRIES = NR_GRANT_FRAMES * (PAGE_SIZE // _GRANT_ENTRY_V1_SIZE)


class GrantStatusError(Exception):
    """The hypervisor refused a grant operation with a ``GNTST_*`` status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def naming(self, ref: int, domid: int) -> str:
        """The detail prefixed with the grant it is about."""
        return f"ref {ref} of domain {domid}: {self.detail}"


# --------------------------------------------------------------------------- backing


class Backing:
    """Pages held in one memfd, shared by whoever uses them.

    ``hold()``/``drop()`` count the users; the last ``drop()`` closes the fd.
    """

    __slots__ = ("fd", "pages", "dev", "ino", "label", "_users", "_readonly_fd")

    def __init__(self, fd: int, pages: int, label: str) -> None:
        self.fd = fd
        self.pages = pages
        self.label = label
        st = os.fstat(fd)
        self.dev = st.st_dev
        self.ino = st.st_ino
        self._users = 0
        self._readonly_fd = -1  # an O_RDONLY open of the memfd, made for the first read-only span

    @classmethod
    def allocate(cls, pages: int, label: str) -> "Backing":
        """Fresh zeroed pages (a memfd, as kernel pages are zeroed by gntalloc)."""
        fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, pages * PAGE_SIZE)
            # Spans of these pages go to other processes; nobody may resize
            # them (a shrink would SIGBUS every mapping, the granter's too).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, pages, label)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def hold(self) -> None:
        if self.fd < 0:
            raise RuntimeError(f"backing {self.label} is already freed")
        self._users += 1

    def drop(self) -> None:
        self._users -= 1
        if self._users <= 0 and self.fd >= 0:
            self._close()

    def force_close(self) -> None:
        """Close regardless of users (the hypervisor is shutting down)."""
        self._users = 0
        if self.fd >= 0:
            self._close()

    def _close(self) -> None:
        readonly, self._readonly_fd = self._readonly_fd, -1
        fd, self.fd = self.fd, -1
        os.close(fd)
        if readonly >= 0:
            os.close(readonly)

    def clear_byte(self, offset: int) -> None:
        """Zero one byte (UNMAP_NOTIFY_CLEAR_BYTE); writes reach every mapping
        because they all share the memfd's page cache."""
        os.pwrite(self.fd, b"\0", offset)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill *buffer* from *offset*: one copy, straight into the caller's memory."""
        if os.preadv(self.fd, [buffer], offset) != len(buffer):
            raise BrokerError(errno.EIO, "read granted page", f"short read of {self.label} at {offset}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        os.pwrite(self.fd, data, offset)

    def span(self, first_page: int, pages: int, *, writable: bool) -> MemorySpan:
        """A descriptor for *pages* pages from *first_page*.

        Writable spans are dups of the memfd.  Read-only spans are dups of a
        re-open of it with O_RDONLY, so that a ``PROT_WRITE`` + ``MAP_SHARED``
        mmap of the span is refused by the kernel (EACCES), wherever the span
        goes.  The re-open (a path look-up through /proc, some 20 µs) is made
        once per backing; a dup costs about a microsecond.
        """
        if writable:
            fd = os.dup(self.fd)
        else:
            if self._readonly_fd < 0:
                self._readonly_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            fd = os.dup(self._readonly_fd)
        return MemorySpan(OwnedFd(fd), first_page * PAGE_SIZE, pages * PAGE_SIZE, writable)


def spans_of(pages: list[tuple[Backing, int]], *, writable: bool) -> list[MemorySpan]:
    """Spans for *pages* (backing, page) in order; consecutive pages of one
    backing coalesce into one span."""
    runs: list[tuple[Backing, int, int]] = []  # backing, first page, page count
    for backing, page in pages:
        if runs:
            last, first, count = runs[-1]
            if last is backing and first + count == page:
                runs[-1] = (backing, first, count + 1)
                continue
        runs.append((backing, page, 1))
    spans: list[MemorySpan] = []
    try:
        for backing, first, count in runs:
            spans.append(backing.span(first, count, writable=writable))
    except BaseException:
        for span in spans:
            span.close()
        raise
    return spans


# --------------------------------------------------------------------------- export tracking

# struct flock (fcntl.h) on the 64-bit Linux ABIs this project runs on:
# short l_type, l_whence; off_t l_start, l_len; pid_t l_pid (+ padding to 32).
_FLOCK = struct.Struct("hhqqi4x")
# Each dma-buf export holds an OFD read lock on one byte far beyond any page
# of its backing; OFD locks belong to the open file description and go away
# only when the description is released — after the last fd *and* the last
# mmap of it are gone, in any process.  That is exactly dma-buf release.
_EXPORT_LOCK_BASE = 1 << 62


def lock_export_byte(fd: int, byte: int) -> None:
    """Mark the open file description of *fd* as alive (see _EXPORT_LOCK_BASE)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, _EXPORT_LOCK_BASE + byte, 1, 0))


def export_byte_locked(probe_fd: int, byte: int) -> bool:
    """Whether some other open file description still holds *byte*'s lock.

    *probe_fd* must be another description of the same file: a description
    never conflicts with its own locks.
    """
    answer = fcntl.fcntl(
        probe_fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _EXPORT_LOCK_BASE + byte, 1, 0)
    )
    lock_type: int = _FLOCK.unpack(answer)[0]
    return lock_type != fcntl.F_UNLCK


# --------------------------------------------------------------------------- grant table


@dataclass(eq=False, slots=True)
class GrantEntry:
    """One slot of a grant table in use (``grant_entry_v1`` + ``active_grant_entry``)."""

    table: "GrantTable"
    ref: int
    backing: Backing
    page: int
    grantee: int
    readonly: bool
    pins: int = 0
    ending: bool = False  # the granter ended access; freed when pins reaches 0

    @property
    def granter(self) -> int:
        return self.table.domid

    @property
    def offset(self) -> int:
        """Byte offset of the page in its backing."""
        return self.page * PAGE_SIZE


class GrantTable:
    """The grant table of one domain."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.entries: dict[int, GrantEntry] = {}
        self.alive = True
        # Linux keeps free refs on a LIFO list (gnttab_free_head): a freed ref
        # is the next one handed out.  pop() from the end gives 8 first.
        self._free: list[int] = list(range(NR_GRANT_ENTRIES - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    def grant(self, backing: Backing, page: int, grantee: int, *, readonly: bool) -> int:
        """Grant *grantee* access to *page* of *backing*; return the ref.

        Raises:
            BrokerError(ENOSPC): the table is full (gnttab_alloc_grant_references).
        """
        if not self._free:
            raise BrokerError(
                errno.ENOSPC, "grant foreign access", f"the grant table of domain {self.domid} is full ({NR_GRANT_ENTRIES} entries)"
            )
        ref = self._free.pop()
        backing.hold()
        self.entries[ref] = GrantEntry(self, ref, backing, page, grantee, readonly)
        return ref

    def grant_pages(self, backing: Backing, pages: range, grantee: int, *, readonly: bool, operation: str) -> list[int]:
        """Grant each page of *pages*; all or nothing."""
        if len(pages) > len(self._free):
            raise BrokerError(
                errno.ENOSPC,
                operation,
                f"the grant table of domain {self.domid} has {len(self._free)} free entries, {len(pages)} needed",
            )
        return [self.grant(backing, page, grantee, readonly=readonly) for page in pages]

    def end(self, ref: int) -> None:
        """End the grant *ref*; deferred while mapped (pinned)."""
        entry = self.entries.get(ref)
        if entry is None or entry.ending:
            return
        entry.ending = True
        if entry.pins == 0:
            self._free_entry(entry)

    def unpin(self, entry: GrantEntry) -> None:
        entry.pins -= 1
        if entry.pins <= 0 and entry.ending:
            self._free_entry(entry)

    def _free_entry(self, entry: GrantEntry) -> None:
        if self.entries.get(entry.ref) is entry:
            del self.entries[entry.ref]
            if self.alive:
                self._free.append(entry.ref)
        entry.backing.drop()

    def lookup(self, ref: int, grantee: int, *, write: bool) -> GrantEntry:
        """The entry *grantee* may access as *ref*, or Xen's refusal status.

        The :class:`GrantStatusError` detail says why, without naming the ref
        and domain (callers prefix ``"ref R of domain D: "``).
        """
        if not 0 <= ref < NR_GRANT_ENTRIES:
            raise GrantStatusError(GNTST_bad_gntref, f"beyond the grant table ({NR_GRANT_ENTRIES} entries)")
        entry = self.entries.get(ref)
        if entry is None:
            raise GrantStatusError(GNTST_general_error, "not granted")
        if entry.grantee != grantee:
            raise GrantStatusError(
                GNTST_general_error, f"granted to domain {entry.grantee}, not to domain {grantee}"
            )
        if write and entry.readonly:
            raise GrantStatusError(GNTST_general_error, "a read-only grant; write access refused")
        return entry

    def destroy(self) -> None:
        """The domain died: every grant ends (mapped pages live until unmapped)."""
        self.alive = False
        for entry in list(self.entries.values()):
            entry.ending = True
            if entry.pins == 0:
                self._free_entry(entry)

    def force_close(self) -> None:
        """Drop every entry and its backing reference (hypervisor shutdown)."""
        self.alive = False
        for entry in list(self.entries.values()):
            del self.entries[entry.ref]
            entry.backing.force_close()


class GrantSystem:
    """All grant tables of the emulated hypervisor, keyed by domid."""

    def __init__(self) -> None:
        self.tables: dict[int, GrantTable] = {}

    def create(self, domid: int) -> GrantTable:
        table = self.tables.get(domid)
        if table is None:
            table = self.tables[domid] = GrantTable(domid)
        return table

    def destroy(self, domid: int) -> None:
        table = self.tables.pop(domid, None)
        if table is not None:
            table.destroy()

    def table_of(self, granter: int) -> GrantTable:
        """The table of *granter*, or GNTST_bad_domain as ``rcu_lock_domain_by_id`` fails."""
        table = self.tables.get(granter)
        if table is None:
            raise GrantStatusError(GNTST_bad_domain, "no such domain")
        return table

    def access(self, granter: int, ref: int, grantee: int, *, write: bool) -> GrantEntry:
        """Check that *grantee* may access *ref* of *granter* (copy; no pin)."""
        return self.table_of(granter).lookup(ref, grantee, write=write)

    def pin(self, granter: int, ref: int, grantee: int, *, write: bool) -> GrantEntry:
        """Map: check access and pin the entry until :meth:`unpin`."""
        entry = self.access(granter, ref, grantee, write=write)
        entry.pins += 1
        return entry

    @staticmethod
    def unpin(entry: GrantEntry) -> None:
        entry.table.unpin(entry)

    def close(self) -> None:
        for table in self.tables.values():
            table.force_close()
        self.tables.clear()


__all__ = [
    "NR_GRANT_ENTRIES",
    "Backing",
    "GrantEntry",
    "GrantStatusError",
    "GrantSystem",
    "GrantTable",
    "export_byte_locked",
    "lock_export_byte",
    "spans_of",
]
