"""The emulated hypervisor's memory: backings, grant tables, grant entries.

Model
-----
* A :class:`Backing` is one memfd of whole pages, made by the hypervisor for
  a gntalloc allocation.  It stays open while anything uses it (a page of a
  gntalloc instance, an import, a dma-buf export, a grant entry) and is
  closed by the last user, so the fd-leak checks of the tests see every
  descriptor come back.  Spans handed out are other descriptors of the same
  memfd: the memory outlives the backing as long as they, or mmaps, do.
* :class:`HypervisorMemory` lists the backings by inode.  It is how a
  descriptor a client hands in (a dma-buf to import) is recognised as memory
  the hypervisor made — by the identity of the file behind it, never by what
  kind of file it is.  The emulation never holds, reopens or maps a file a
  client made; what it grants is always its own backing.
* Each domain has one :class:`GrantTable` (version 1, the Linux default):
  ``NR_GRANT_ENTRIES`` slots, of which the first ``GNTTAB_NR_RESERVED_ENTRIES``
  are the toolstack's, so Linux hands out refs from 8 up.  An entry grants one
  page of a backing to one domain, read-only or writable.
* A mapping *pins* the entries it maps (``act->pin`` in Xen).  Ending a grant
  that is pinned is deferred until the last pin goes, as Linux's
  ``gnttab_end_foreign_access`` does after XSA-396: meanwhile the entry stays
  valid, exactly as on real Xen, where the entry keeps GTF_permit_access until
  the deferred end succeeds.

Every memfd the hypervisor makes (:func:`new_memfd`) is sealed against
shrinking and growing — a holder that truncated it would SIGBUS everyone who
maps it, which no granter can do on Xen — and has mode 0600: a read-only
descriptor of it handed to a client cannot be reopened writable through
``/proc/<pid>/fd`` by any user but the broker's own (and root).

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
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import cast

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
        self.position = 0  # of the refused ref in a batch (GrantTable.pin_refs)

    def naming(self, ref: int, domid: int) -> str:
        """The detail prefixed with the grant it is about."""
        return f"ref {ref} of domain {domid}: {self.detail}"


# --------------------------------------------------------------------------- backing

# Seals of every memfd the hypervisor makes: its size is fixed for its life.
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
# Only the broker's user may reopen it (a reopen through /proc/<pid>/fd checks
# the inode's permissions against the opener): a client given an O_RDONLY
# descriptor cannot turn it into an O_RDWR one.  Checked on Linux 6.x: an
# unprivileged user gets EACCES, and cannot fchmod an inode it does not own.
# A client running as the broker's user, or as root, can reopen it — such a
# client could as well ptrace the broker.
MEMFD_MODE = 0o600


def new_memfd(label: str, size: int) -> int:
    """A fresh zeroed memfd of *size* bytes, sealed against resizing, mode :data:`MEMFD_MODE`."""
    fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS | fcntl.F_SEAL_SEAL)
        os.fchmod(fd, MEMFD_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def reopen_own_memfd(fd: int, flags: int) -> int:
    """Another open file description of a memfd the hypervisor made itself.

    The only reopen in the emulation, and never of a descriptor a client
    supplied: a path through ``/proc`` would be opened with the broker's
    credentials, and a client's O_PATH or O_RDONLY descriptor would become
    the broker's read or write access to whatever file it names.
    """
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


class Backing:
    """Pages held in one memfd the hypervisor made, shared by whoever uses them.

    ``hold()``/``drop()`` count the users; the last ``drop()`` closes the fd.
    """

    __slots__ = ("fd", "pages", "dev", "ino", "uid", "label", "_users", "_handout_fds", "_on_close")

    def __init__(self, fd: int, pages: int, label: str, *, on_close: Callable[["Backing"], None] | None = None) -> None:
        self.fd = fd
        self.pages = pages
        self.label = label
        st = os.fstat(fd)
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.uid = st.st_uid
        self._users = 0
        # The descriptions handed out, by writability: opened on first use.
        # Never ``fd`` itself: a holder could change the flags of a shared
        # description (F_SETFL O_APPEND makes every pwrite an append, which the
        # size seals then refuse), and ``fd`` is what the hypervisor writes
        # through (grant copy, CLEAR_BYTE).
        self._handout_fds: dict[bool, int] = {}
        self._on_close = on_close

    @classmethod
    def allocate(cls, pages: int, label: str, *, on_close: Callable[["Backing"], None] | None = None) -> "Backing":
        """Fresh zeroed pages (a memfd, as kernel pages are zeroed by gntalloc)."""
        return cls(new_memfd(label, pages * PAGE_SIZE), pages, label, on_close=on_close)

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
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)  # unlisted before its inode can go (and its number be reused)
        handouts, self._handout_fds = self._handout_fds, {}
        fd, self.fd = self.fd, -1
        os.close(fd)
        for handout in handouts.values():
            os.close(handout)

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

    def descriptor(self, *, writable: bool) -> OwnedFd:
        """A descriptor of the memory to hand out.

        A read-only one is O_RDONLY: a ``PROT_WRITE`` + ``MAP_SHARED`` mmap of
        it is refused by the kernel (EACCES), and so is a reopen for writing by
        any other unprivileged user (see :data:`MEMFD_MODE`).  Hand-outs of one
        kind share one open file description, made by a reopen of the memfd
        on first use (some 20 µs); each is a dup of it (about a microsecond).
        """
        return OwnedFd(os.dup(self._handout(writable)))

    def _handout(self, writable: bool) -> int:
        handout = self._handout_fds.get(writable)
        if handout is None:
            handout = self._handout_fds[writable] = reopen_own_memfd(self.fd, os.O_RDWR if writable else os.O_RDONLY)
        return handout

    @property
    def export_probe_fd(self) -> int:
        """The description to look for dma-buf exports' locks through (see
        :func:`export_byte_locked`): the one writable hand-outs share, so that
        locks their holders set through it are not taken for an export's (a
        description never sees its own locks)."""
        return self._handout(True)

    def span(self, first_page: int, pages: int, *, writable: bool) -> MemorySpan:
        """A :meth:`descriptor` for *pages* pages from *first_page*."""
        return MemorySpan(self.descriptor(writable=writable), first_page * PAGE_SIZE, pages * PAGE_SIZE, writable)


class HypervisorMemory:
    """Every backing the hypervisor holds, by the inode of its memfd.

    A backing is listed from its allocation until its own descriptor closes,
    so a listed inode cannot be freed and its number given to another file
    meanwhile.  Shmem inode numbers are 32-bit and do wrap, so a client could
    in principle make a memfd whose (st_dev, st_ino) equals a listed one; its
    owner then differs from the broker's user (only root can make a file
    owned by another user), which :meth:`backing_of` checks.
    """

    def __init__(self) -> None:
        self._backings: dict[tuple[int, int], Backing] = {}

    def allocate(self, pages: int, label: str) -> Backing:
        """New zeroed pages, listed until their backing closes."""
        backing = Backing.allocate(pages, label, on_close=self._unlist)
        self._backings[(backing.dev, backing.ino)] = backing
        return backing

    def _unlist(self, backing: Backing) -> None:
        if self._backings.get((backing.dev, backing.ino)) is backing:
            del self._backings[(backing.dev, backing.ino)]

    def backing_of(self, st: os.stat_result) -> Backing | None:
        """The live backing whose memfd is the file *st* describes (an ``fstat``
        of a client's descriptor), or None: the file is not the hypervisor's."""
        backing = self._backings.get((st.st_dev, st.st_ino))
        if backing is None or backing.closed or st.st_uid != backing.uid or not stat.S_ISREG(st.st_mode):
            return None
        return backing


def access_mode(flags: int) -> int | None:
    """``O_RDONLY``, ``O_WRONLY`` or ``O_RDWR`` from ``F_GETFL`` *flags*; None for
    an O_PATH descriptor, which gives no access to the file at all."""
    if flags & os.O_PATH:
        return None
    return flags & os.O_ACCMODE


def spans_of_entries(entries: Sequence[GrantEntry], *, writable: bool) -> list[MemorySpan]:
    """Spans for the pages of *entries*, in order: :func:`spans_of`, with one
    span at once when they are consecutive pages of one backing (a whole
    allocation mapped in order: the usual batch)."""
    if entries:
        first = entries[0]
        backing, page, count = first.backing, first.page, len(entries)
        if (
            entries[-1].page == page + count - 1
            and list(map(_backing, entries)).count(backing) == count
            and list(map(_page, entries)) == list(range(page, page + count))
        ):
            return [backing.span(page, count, writable=writable)]
    return spans_of([(entry.backing, entry.page) for entry in entries], writable=writable)


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
    never conflicts with its own locks.  Any other description's lock counts,
    so a holder of a read-only span or of another dma-buf export of the same
    pages can keep an export looking in use (an emulation limit: its wait
    times out, and its grants stay mapped until the instance is closed).
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


_backing = attrgetter("backing")
_page = attrgetter("page")
_ending = attrgetter("ending")


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

    def pin_refs(self, refs: Sequence[int], grantee: int, *, write: bool) -> list[GrantEntry]:
        """Map (pin) the entries of *refs* for *grantee*, all or nothing: :meth:`lookup`
        and a pin for each ref (a ref given twice is pinned twice, as two maps of it are).

        Raises:
            GrantStatusError: a ref *grantee* may not map this way, with
                :attr:`GrantStatusError.position` its index in *refs* (the
                first such); nothing is pinned.
        """
        # One look-up of the table for all, and the checks of lookup() inline:
        # batches of thousands of refs are the case to be fast for.
        entries = list(map(self.entries.get, refs))
        for entry in entries:
            if entry is None or entry.grantee != grantee or (write and entry.readonly):
                break
            entry.pins += 1
        else:
            return cast("list[GrantEntry]", entries)  # no None: checked in the loop
        # The first refusal: the entries before it were pinned, and are unpinned.
        position = entries.index(entry)
        for pinned in cast("list[GrantEntry]", entries[:position]):
            pinned.pins -= 1
        try:
            self.lookup(refs[position], grantee, write=write)
        except GrantStatusError as refusal:
            refusal.position = position
            raise
        raise AssertionError("a refused grant passed lookup")  # pragma: no cover

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

    @staticmethod
    def unpin_all(entries: Sequence[GrantEntry]) -> None:
        """:meth:`unpin` each of *entries* (an entry listed twice was pinned twice)."""
        for entry in entries:
            entry.pins -= 1
        # A grant ended while mapped is freed by its last unpin; rarely any.
        if any(map(_ending, entries)):
            for entry in dict.fromkeys(entries):  # each once
                if entry.ending and entry.pins <= 0:
                    entry.table._free_entry(entry)

    def close(self) -> None:
        for table in self.tables.values():
            table.force_close()
        self.tables.clear()


__all__ = [
    "MEMFD_MODE",
    "NR_GRANT_ENTRIES",
    "SIZE_SEALS",
    "Backing",
    "GrantEntry",
    "GrantStatusError",
    "GrantSystem",
    "GrantTable",
    "HypervisorMemory",
    "access_mode",
    "export_byte_locked",
    "lock_export_byte",
    "new_memfd",
    "reopen_own_memfd",
    "spans_of",
    "spans_of_entries",
]
