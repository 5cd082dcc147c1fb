"""The backend contract: what every device backend provides, and how it fails.

The service layer talks to devices only through these interfaces.  Two
implementations exist: the emulated hypervisor (``grant_broker.backend.emulated``)
and the real Linux devices (``grant_broker.backend.xen``, ``.membuf``).  The
conformance suite in ``tests/conformance/`` is written against this module
alone, so the same tests prove both.

Conventions for every method below:

* Failures raise :class:`grant_broker_protocol.errors.BrokerError` with the errno the
  Linux driver would give (``errno`` module constants), the operation, and a
  detail naming the refs / domains / ports involved.  ``gntst`` is set when the
  hypervisor itself answered with a ``GNTST_*`` status.
* Descriptors handed to the caller are :class:`grant_broker_protocol.fds.OwnedFd`; the
  caller closes them.  Descriptors passed *in* are borrowed: the backend dups
  what it needs to keep.
* Operations never block for longer than their documented timeout; none reads
  a device fd blockingly (event channel fds are non-blocking).
* Objects are context managers; ``close()`` is idempotent and releases
  everything the object holds, firing unmap notifications as the kernel does
  when a device file is closed.
"""

from __future__ import annotations

import abc
import enum
import errno
import itertools
import mmap
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, overload

from grant_broker_protocol.abi import AclEntry as AclEntry
from grant_broker_protocol.abi import GrantRef as GrantRef
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd

PAGE_SIZE: int = mmap.PAGESIZE  # Xen grants are 4 KiB, as are x86-64/arm64 Linux pages here


# --------------------------------------------------------------------------- data


@dataclass(slots=True)
class MemorySpan:
    """A piece of shared memory handed out as a descriptor.

    ``mmap(fd, length, MAP_SHARED, offset=offset)`` gives the pages.  A mapping
    of several grants is a list of spans whose concatenation, in order, is the
    mapping.  The span owns ``fd``.

    A span that is not ``writable`` gives an unprivileged holder no way to
    write the pages: no writable mmap, no writable reopen through ``/proc``.
    """

    fd: OwnedFd
    offset: int
    length: int
    writable: bool

    def close(self) -> None:
        self.fd.close()


# The typecode of an array of ``__u32`` (``struct ioctl_gntdev_grant_ref``'s fields).
U32_TYPECODE = "I" if array("I").itemsize == 4 else "L"
assert array(U32_TYPECODE).itemsize == 4


class GrantRefs(Sequence[GrantRef]):
    """Grants to map, packed: ``refs[i]`` in the grant table of domain ``domids[i]``.

    What the map path carries from the request to the backend instead of one
    :class:`GrantRef` per grant (1024 of those cost half a millisecond to
    make, and as much again to check one by one): an ``array`` of refs and
    either one domain for all of them (:attr:`domid`, the usual case: a batch
    comes from one granting domain) or an array of domains.  Checks run over
    the arrays (``max``, ``set``), not per object.

    It is also a ``Sequence[GrantRef]``, whose items are made when asked
    for, so code that reads grants one by one (the census, error messages)
    and comparisons with tuples of :class:`GrantRef` keep working.  Every
    value is a ``__u32`` (OverflowError otherwise, TypeError for a
    non-integer).  Treat it as a value: nothing changes its arrays.
    """

    __slots__ = ("refs", "domid", "_domids")

    refs: array[int]
    """The refs, in order (an ``array`` of ``__u32``)."""
    domid: int | None
    """The domain of every grant; None when they come from several (see :attr:`domids`)."""

    def __init__(self, domids: int | Sequence[int], refs: Iterable[int]) -> None:
        """*domids*: one domain for every ref, or one per ref."""
        if not (type(refs) is array and refs.typecode == U32_TYPECODE):
            refs = array(U32_TYPECODE, refs)
        self.refs = refs
        self._domids: array[int] | None = None
        if isinstance(domids, int):
            self.domid = domids
        elif len(domids) == 1:
            self.domid = domids[0]
        else:
            if len(domids) != len(refs):
                raise ValueError(f"{len(domids)} domids for {len(refs)} refs")
            first = domids[0] if domids else None
            if first is not None and domids.count(first) == len(domids):
                self.domid = first
            else:
                self.domid = None
                self._domids = domids if type(domids) is array and domids.typecode == U32_TYPECODE else array(U32_TYPECODE, domids)
        if self.domid is not None:
            # The domain is a __u32 too (as it is in the ioctl's struct).
            if not 0 <= self.domid <= 0xFFFFFFFF:
                raise OverflowError(f"domid {self.domid} does not fit 32 bits")

    @classmethod
    def of(cls, grants: Iterable[GrantRef] | GrantRefs) -> GrantRefs:
        """*grants* packed (itself if it already is).

        Raises:
            OverflowError: a domid or ref does not fit ``__u32``.
            TypeError: one is not an integer.
        """
        if isinstance(grants, GrantRefs):
            return grants
        grants = grants if isinstance(grants, list | tuple) else list(grants)
        return cls([grant.domid for grant in grants], [grant.ref for grant in grants])

    @property
    def domids(self) -> array[int]:
        """The domain of each grant, in order (made on demand when all share :attr:`domid`)."""
        if self._domids is not None or self.domid is None:
            return self._domids if self._domids is not None else array(U32_TYPECODE)
        return array(U32_TYPECODE, [self.domid]) * len(self.refs)

    @property
    def domains(self) -> tuple[int, ...] | frozenset[int]:
        """The distinct domains the grants come from."""
        if self._domids is None:
            return () if self.domid is None else (self.domid,)
        return frozenset(self._domids)

    def pairs(self) -> Iterator[tuple[int, int]]:
        """``(domid, ref)`` of each grant, in order."""
        if self.domid is not None:
            return zip(itertools.repeat(self.domid, len(self.refs)), self.refs)
        return zip(self.domids, self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    @overload
    def __getitem__(self, i: int) -> GrantRef: ...

    @overload
    def __getitem__(self, i: slice) -> GrantRefs: ...

    def __getitem__(self, i: int | slice) -> GrantRef | GrantRefs:
        if isinstance(i, slice):
            refs = self.refs[i]
            if self._domids is None:
                packed = GrantRefs.__new__(GrantRefs)
                packed.refs, packed.domid, packed._domids = refs, self.domid, None
                return packed
            return GrantRefs(self._domids[i], refs)
        ref = self.refs[i]  # IndexError first
        return GrantRef(self.domid if self.domid is not None else self.domids[i], ref)

    def __iter__(self) -> Iterator[GrantRef]:
        return itertools.starmap(GrantRef, self.pairs())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GrantRefs):
            return self.refs == other.refs and (
                self.domid == other.domid if self._domids is None and other._domids is None else self.domids == other.domids
            )
        if isinstance(other, tuple | list):
            return len(other) == len(self.refs) and tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"({domid}, {ref})" for domid, ref in itertools.islice(self.pairs(), 8))
        more = f", ... {len(self) - 8} more" if len(self) > 8 else ""
        return f"GrantRefs([{shown}{more}])"


def packed_grants(refs: Sequence[GrantRef] | GrantRefs, operation: str) -> GrantRefs:
    """*refs* as :class:`GrantRefs` for a backend's map: EINVAL, naming the
    first culprit, for a domid or ref that does not fit ``__u32`` (as the
    ioctl's fields)."""
    try:
        return GrantRefs.of(refs)
    except (OverflowError, TypeError, ValueError):
        pass
    for grant in refs:
        domid, ref = grant.domid, grant.ref
        if not (isinstance(domid, int) and isinstance(ref, int) and 0 <= domid <= 0xFFFFFFFF and 0 <= ref <= 0xFFFFFFFF):
            raise BrokerError(errno.EINVAL, operation, f"ref {ref} of domain {domid} is out of range")
    raise BrokerError(errno.EINVAL, operation, "the grant refs cannot be read")


@dataclass(frozen=True, slots=True)
class GrantAllocation:
    """Pages of this domain shared with ``domid`` (``ioctl_gntalloc_alloc_gref``).

    ``index`` is the mmap offset of the pages on the gntalloc instance;
    ``refs[i]`` grants page ``i``.
    """

    index: int
    domid: int
    writable: bool
    refs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.refs)


# The grant-copy types are made thousands of times per call (a copy ring's
# doorbell builds three per record), so they are plain slotted classes: a
# frozen dataclass's __init__ costs three times as much (0.7 against 0.2 us,
# measured).  Treat them as values all the same.


@dataclass(slots=True)
class CopyLocal:
    """A grant-copy endpoint in the caller's own memory (``virt`` in the C struct).

    ``buffer`` must be writable when used as a destination.
    """

    buffer: memoryview
    offset: int = 0


@dataclass(slots=True)
class CopyForeign:
    """A grant-copy endpoint in a granted page (``foreign`` in the C struct)."""

    ref: int
    offset: int
    domid: int


@dataclass(slots=True)
class GrantCopySegment:
    """``struct gntdev_grant_copy_segment``; flags are derived from the endpoint types
    (``GNTCOPY_source_gref`` / ``GNTCOPY_dest_gref``)."""

    source: CopyLocal | CopyForeign
    dest: CopyLocal | CopyForeign
    length: int


_SOURCE_GREF = 1  # GNTCOPY_source_gref
_DEST_GREF = 2  # GNTCOPY_dest_gref


class GrantCopyBatch(Sequence[GrantCopySegment]):
    """Grant-copy segments as columns, every local side in one *buffer*: a
    copy ring's doorbell, from the broker's checks to the backend.

    Row ``i`` is the segment ``flags[i]`` (``GNTCOPY_source_gref`` |
    ``GNTCOPY_dest_gref``) says: a side whose bit is set is
    ``CopyForeign(ref=source[i], offset=source_offset[i], domid=source_domid[i])``
    (likewise ``dest``), a side whose bit is clear is
    ``CopyLocal(buffer, offset=source[i])`` (its domid and page offset are
    unused).  It is a sequence of :class:`GrantCopySegment` (made on access),
    so a backend that knows nothing of it copies it as it copies a list; one
    that does may work over the columns, per run of segments, instead of
    per segment object — checking every segment all the same.

    Like the other grant-copy types it is a value: nobody changes the
    columns once it is made.
    """

    __slots__ = (
        "buffer", "flags", "source", "dest", "source_domid", "dest_domid", "source_offset", "dest_offset", "length"
    )

    def __init__(
        self,
        buffer: memoryview,
        flags: Sequence[int],
        source: Sequence[int],
        dest: Sequence[int],
        source_domid: Sequence[int],
        dest_domid: Sequence[int],
        source_offset: Sequence[int],
        dest_offset: Sequence[int],
        length: Sequence[int],
    ) -> None:
        count = len(flags)
        columns = (source, dest, source_domid, dest_domid, source_offset, dest_offset, length)
        if any(len(column) != count for column in columns):
            raise ValueError("the columns of a grant-copy batch differ in length")
        self.buffer = buffer
        self.flags = flags
        self.source = source
        self.dest = dest
        self.source_domid = source_domid
        self.dest_domid = dest_domid
        self.source_offset = source_offset
        self.dest_offset = dest_offset
        self.length = length

    def __len__(self) -> int:
        return len(self.flags)

    @overload
    def __getitem__(self, i: int) -> GrantCopySegment: ...

    @overload
    def __getitem__(self, i: slice) -> GrantCopyBatch: ...

    def __getitem__(self, i: int | slice) -> GrantCopySegment | GrantCopyBatch:
        if isinstance(i, slice):
            return GrantCopyBatch(
                self.buffer, self.flags[i], self.source[i], self.dest[i], self.source_domid[i], self.dest_domid[i],
                self.source_offset[i], self.dest_offset[i], self.length[i],
            )
        flags = self.flags[i]  # IndexError first
        source: CopyLocal | CopyForeign
        dest: CopyLocal | CopyForeign
        if flags & _SOURCE_GREF:
            source = CopyForeign(self.source[i], self.source_offset[i], self.source_domid[i])
        else:
            source = CopyLocal(self.buffer, self.source[i])
        if flags & _DEST_GREF:
            dest = CopyForeign(self.dest[i], self.dest_offset[i], self.dest_domid[i])
        else:
            dest = CopyLocal(self.buffer, self.dest[i])
        return GrantCopySegment(source, dest, self.length[i])

    def __iter__(self) -> Iterator[GrantCopySegment]:
        return map(self.__getitem__, range(len(self.flags)))

    def uniform_flags(self) -> int | None:
        """The flags every segment has, or None (none, or not all alike)."""
        flags = self.flags
        if not flags:
            return None
        first = flags[0]
        return first if flags.count(first) == len(flags) else None

    def foreign_domains(self) -> Iterable[int]:
        """The domains of the foreign sides, each once, in the order they first
        appear (a segment's source before its dest)."""
        uniform = self.uniform_flags()
        if uniform == _SOURCE_GREF:
            return dict.fromkeys(self.source_domid)
        if uniform == _DEST_GREF:
            return dict.fromkeys(self.dest_domid)
        if uniform == _SOURCE_GREF | _DEST_GREF:
            return dict.fromkeys(itertools.chain.from_iterable(zip(self.source_domid, self.dest_domid)))
        return dict.fromkeys(
            domid
            for flags, source_domid, dest_domid in zip(self.flags, self.source_domid, self.dest_domid)
            for domid in ((source_domid,) if flags & _SOURCE_GREF else ()) + ((dest_domid,) if flags & _DEST_GREF else ())
        )

    def __repr__(self) -> str:
        return f"<GrantCopyBatch of {len(self)} segments, flags {sorted(set(self.flags))}>"


@dataclass(frozen=True, slots=True)
class MemparcelExport:
    """The result of a mem-buf export: keep ``export_fd`` open or the memory is revoked."""

    export_fd: OwnedFd
    memparcel_hdl: int


class MemBufAbi(enum.Enum):
    """Which mem-buf ioctl ABI a device speaks."""

    LEGACY_2020 = "legacy-2020"  # ALLOC / EXPORT / IMPORT, ../shared/seeds/mem-buf.h


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, probed rather than assumed."""

    backend: str
    gntdev: bool
    gntalloc: bool
    evtchn: bool
    grant_copy: bool
    # The kernel's gntdev has the dma-buf ioctls.  Whether each direction
    # works here is ``dmabuf_export`` / ``dmabuf_import``: a PV domain has
    # the ioctls but refuses export.
    dmabuf: bool
    dmabuf_export: bool  # grants made into a dma-buf (DmabufExportFromRefs)
    dmabuf_import: bool  # a dma-buf's pages granted to a domain (DmabufImportToRefs)
    set_max_grants: bool
    membuf_abi: MemBufAbi | None
    # The emulated hypervisor lets a caller act as any domain; a real one has
    # exactly one: the domain the broker runs in.
    any_domain: bool
    notes: tuple[str, ...] = field(default=())
    # Why a dma-buf direction is unavailable ("" when it is available).
    dmabuf_export_missing: str = ""
    dmabuf_import_missing: str = ""


# --------------------------------------------------------------------------- base


class _Closeable(abc.ABC):
    @abc.abstractmethod
    def close(self) -> None:
        """Release everything this object holds; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- gntdev


class GntdevInstance(_Closeable):
    """One open gntdev file: maps grants of other domains into this one.

    Each instance indexes its own mappings.  An *index* is the byte offset at
    which the mapping's pages appear in the instance's mmap space; a fresh
    instance's first mapping has index 0.
    """

    @abc.abstractmethod
    def fileno(self) -> int:
        """The descriptor that *is* this instance (its lifetime is the instance's)."""

    @abc.abstractmethod
    def map_grant_refs(self, refs: Sequence[GrantRef]) -> int:
        """Reserve a mapping of *refs*, in order, and return its index.

        The broker passes :class:`GrantRefs` (packed arrays; a backend gets
        them with :func:`packed_grants`, which also takes any sequence of
        :class:`GrantRef`) and so should a backend's own work on them be:
        over the arrays, not one grant object at a time.  The same ref may
        appear more than once; each is a mapping of its own, as on Linux.

        As on Linux, nothing is asked of the hypervisor yet: refs that are not
        granted or domains that do not exist are accepted here and refused by
        :meth:`map_memory`.

        Raises:
            EINVAL: no refs, or more than the instance's limit.
            ENOMEM: the instance's limit of grants is exhausted.
        """

    @abc.abstractmethod
    def unmap_grant_ref(self, index: int, count: int) -> None:
        """Drop the mapping at *index*, which must have exactly *count* grants
        (0 matches any size, as in Linux's ``gntdev_find_map_index``).

        Its unmap notification fires now unless the memory is still mapped in
        this process (then it fires at the last munmap).

        Raises:
            ENOENT: no mapping starts at *index* or its size is not *count*
                (``gntdev_ioctl_unmap_grant_ref``).
        """

    @abc.abstractmethod
    def map_memory(self, index: int, count: int, *, writable: bool) -> list[MemorySpan]:
        """Make the mapping's pages accessible and hand them out as spans.

        This is where the hypervisor maps the grants (Linux does it at mmap
        time), so this is where a bad grant is reported.  The mapping becomes
        read-only or writable by this call, as an mmap's protection decides on
        Linux.  Spans may be passed to other processes.

        Raises:
            EINVAL: no mapping at *index* with *count* grants; *writable* on a
                mapping an earlier call made read-only; a ref not granted to
                this domain; an unknown domain; *writable* on a read-only
                grant.  For a refused grant the detail names the ref and
                domain, and ``gntst`` carries Xen's status when the backend
                learns it (``GNTST_bad_domain``, ``GNTST_bad_gntref``,
                ``GNTST_general_error``; Linux's mmap reports only EINVAL).
        """

    @abc.abstractmethod
    def get_offset_for_vaddr(self, vaddr: int) -> tuple[int, int]:
        """``(index, count)`` of the mapping whose memory this process mapped at
        *vaddr* (the start of the range), as ``IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR``.

        Raises:
            EINVAL: *vaddr* is not the start of a mapping of this instance.
        """

    @abc.abstractmethod
    def set_max_grants(self, count: int) -> None:
        """Limit the grants this instance may map.

        Raises:
            ENOTTY: the kernel does not implement it (current Linux).
        """

    @abc.abstractmethod
    def set_unmap_notify(self, offset: int, action: int, port: int) -> None:
        """Arm the unmap notification of the mapping containing byte *offset*.

        *action* is a mask of ``UNMAP_NOTIFY_CLEAR_BYTE`` (zero the byte at
        *offset* in the granter's page) and ``UNMAP_NOTIFY_SEND_EVENT`` (notify
        *port*).  One notification per mapping; a later call replaces it.

        Raises:
            ENOENT: *offset* in no mapping (``gntdev_ioctl_notify``).
            EINVAL: unknown *action* bits; CLEAR_BYTE on a mapping made
                read-only; SEND_EVENT with a port not bound in this domain.
        """

    @abc.abstractmethod
    def grant_copy(self, segments: Sequence[GrantCopySegment]) -> list[int]:
        """Copy between local buffers and granted pages; one ``GNTST_*`` per segment.

        *segments* may be a :class:`GrantCopyBatch` (a copy ring's doorbell):
        a sequence of segments like any other, which a backend may also read
        by its columns.

        The call succeeds when individual segments fail: each failure is that
        segment's status (``GNTST_bad_gntref``, ``GNTST_bad_domain``,
        ``GNTST_permission_denied``, ``GNTST_general_error``...).

        Raises:
            EINVAL: a malformed segment (both sides local, a foreign side that
                crosses its page, a local side outside its buffer), before
                anything is copied.
            EFAULT: a local destination buffer is read-only.
        """

    @abc.abstractmethod
    def dmabuf_export_from_refs(self, domid: int, refs: Sequence[int], flags: int = 0) -> OwnedFd:
        """Map *refs* of *domid* and export them as one dma-buf.

        Raises:
            ENOTTY: the kernel has no gntdev dma-buf support (capability ``dmabuf``).
            EINVAL: no refs, bad flags, a bad grant; or a domain that refuses
                export (a PV one: capability ``dmabuf_export`` false).
        """

    @abc.abstractmethod
    def dmabuf_export_wait_released(self, fd: int, timeout_ms: int) -> None:
        """Wait until the dma-buf exported as *fd* by this instance is released.

        *fd* is the number :meth:`dmabuf_export_from_refs` returned; it need
        not be open any more.  Released means no descriptor and no mmap of
        the buffer is left, in any process.

        Raises:
            ENOENT: no live dma-buf was exported by this instance as *fd* —
                never, or already released (Linux forgets a buffer once it is
                released, so after an export ENOENT means "released").
            ETIMEDOUT: still in use after *timeout_ms* (0 polls once).
        """

    @abc.abstractmethod
    def dmabuf_import_to_refs(self, fd: int, domid: int, count: int) -> tuple[int, ...]:
        """Grant the *count* pages of dma-buf *fd* to *domid*; return the refs.

        The instance keeps a reference to the buffer until
        :meth:`dmabuf_import_release` or close.  *fd* is never reopened: what
        is granted is the dma-buf's own memory.

        Raises:
            ENOTTY: no dma-buf support.
            EINVAL: *count* does not match the buffer's pages, or *fd* is not a
                dma-buf (on the emulated hypervisor: not a writable descriptor
                of memory it made — any other file, a client's memfd included).
            EBADF: *fd* is not open.
        """

    @abc.abstractmethod
    def dmabuf_import_release(self, fd: int) -> None:
        """End the grants of the imported dma-buf *fd* and drop the instance's reference.

        Raises:
            ENOENT: *fd* was not imported by this instance.
            EBADF: *fd* is not open.
        """


# --------------------------------------------------------------------------- gntalloc


class GntallocInstance(_Closeable):
    """One open gntalloc file: shares this domain's own pages with another domain."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """The descriptor that *is* this instance."""

    @abc.abstractmethod
    def alloc_gref(self, domid: int, count: int, *, writable: bool = True) -> GrantAllocation:
        """Allocate *count* zeroed pages and grant each to *domid*.

        Raises:
            EINVAL: count is 0.
            ENOSPC / ENOMEM: the grant limit is reached.
        """

    @abc.abstractmethod
    def dealloc_gref(self, index: int, count: int) -> None:
        """End the grants of the *count* pages at *index* (consecutive pages,
        possibly of several allocations, as Linux's ``find_grefs``).

        Their unmap notifications fire now.  As on Linux, pages a remote
        domain still maps stay alive, and their grants valid, until it unmaps
        them; then the grants end and the refs are no longer mappable.

        Raises:
            EINVAL: no *count* allocated pages at *index*.
        """

    @abc.abstractmethod
    def set_unmap_notify(self, offset: int, action: int, port: int) -> None:
        """Arm the notification sent when this instance's mapping of the page at
        *offset* goes away (``ioctl_gntalloc_unmap_notify``).

        Raises:
            ENOENT: *offset* in no allocated page (``gntalloc_ioctl_unmap_notify``).
            EINVAL: unknown *action* bits; SEND_EVENT with an unbound port.
        """

    @abc.abstractmethod
    def memory_spans(self, index: int, count: int) -> list[MemorySpan]:
        """The *count* allocated pages at *index*, writable, as spans.

        Raises:
            ENOENT: no *count* allocated pages at *index* (``gntalloc_mmap``).
        """


# --------------------------------------------------------------------------- evtchn


class EvtchnHandle(_Closeable):
    """One open evtchn file: binds, notifies and receives event-channel ports.

    :meth:`fileno` becomes readable when a port fires; :meth:`read_pending`
    then returns it.  A fired port stays masked until :meth:`unmask`, so
    repeated notifications coalesce into one; a port notified while masked
    fires once more when unmasked (Xen keeps its pending bit).

    Ports are per-domain numbers; 0 is never a port.  The handle owns the
    ports bound through it: another handle, even of the same domain, gets
    ``ENOTCONN`` for them.  Like any open file the handle lives until the last
    copy of :meth:`fileno` is closed (it may be passed to another process);
    then every port it bound is closed, and the remote end of each
    interdomain channel becomes unbound, offered again to this domain.
    """

    @abc.abstractmethod
    def fileno(self) -> int:
        """Non-blocking descriptor, readable while ports are pending.

        Reading it gives the fired ports as native ``uint32`` values, as
        ``read(2)`` of ``/dev/xen/evtchn`` does.
        """

    @abc.abstractmethod
    def bind_unbound_port(self, remote_domain: int) -> int:
        """Allocate a local port that *remote_domain* may bind to.

        Xen does not check that *remote_domain* exists (``evtchn_alloc_unbound``
        looks up only the local domain): a port offered to a missing domain is
        allocated and simply never connects.

        Raises:
            EACCES: the handle is restricted (:meth:`restrict_domid`).
            EINVAL: *remote_domain* is not a ``domid_t``.
            ENOSPC: the domain has no free port.
        """

    @abc.abstractmethod
    def bind_interdomain(self, remote_domain: int, remote_port: int) -> int:
        """Connect to *remote_port* of *remote_domain*; return the local port.

        The new local port is pending once right away (Xen sets it so that
        nothing sent to the unbound port is lost): consume and unmask it.

        Raises:
            EACCES: the handle is restricted to another domain.
            EINVAL: the remote port is not unbound-for-this-domain.
            ESRCH: unknown domain.
        """

    @abc.abstractmethod
    def bind_virq(self, virq: int) -> int:
        """Bind a virtual IRQ (on vcpu 0, as Linux does); return the local port.

        Raises:
            EACCES: the handle is restricted.
            EINVAL: *virq* is not below ``NR_VIRQS`` (24).
            EEXIST: already bound in this domain (by any handle, or by the
                kernel itself on a real host).
        """

    @abc.abstractmethod
    def unbind(self, port: int) -> None:
        """Close *port*; the remote end becomes unbound, offered again to this domain.

        A port that already fired stays in the queue :meth:`read_pending` reads.

        Raises:
            ENOTCONN: *port* not bound by this handle.
            EINVAL: *port* beyond the hypervisor's number of channels.
        """

    @abc.abstractmethod
    def notify(self, port: int) -> None:
        """Signal the remote end of *port*.

        Notifying a port whose remote end closed (it is unbound again), or a
        VIRQ port, succeeds and does nothing, as on Xen.

        Raises:
            ENOTCONN: *port* not bound by this handle.
        """

    @abc.abstractmethod
    def read_pending(self, max_ports: int = 256) -> list[int]:
        """Fired ports, without blocking; ``[]`` when none are pending.

        At most ``max_ports``, and at most a page's worth (``PAGE_SIZE // 4``) per call.

        Raises:
            EFBIG: the handle's queue overflowed; :meth:`reset` it.
        """

    @abc.abstractmethod
    def unmask(self, port: int) -> None:
        """Let *port* fire again; if it was notified while masked it fires now.
        Ports this handle did not bind are ignored, as by Linux."""

    @abc.abstractmethod
    def restrict_domid(self, domid: int) -> None:
        """Confine the handle to *domid* for good (``IOCTL_EVTCHN_RESTRICT_DOMID``).

        Afterwards :meth:`bind_interdomain` to other domains, and every
        :meth:`bind_unbound_port` and :meth:`bind_virq`, fail with ``EACCES``;
        ports bound before keep working.

        Raises:
            EINVAL: *domid* is 0 or not below ``DOMID_FIRST_RESERVED``.
            EACCES: already restricted.
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """Empty the queue of fired ports and clear an overflow (``IOCTL_EVTCHN_RESET``).

        Ports that fired stay masked: unmask them to hear from them again.
        """


# --------------------------------------------------------------------------- mem-buf


class MemBufDevice(_Closeable):
    """The Qualcomm mem-buf device: memory moved and shared between VMs as memparcels.

    ACL rules for every operation (``EINVAL``, the detail naming the entry):
    1..16 entries (``MEM_BUF_MAX_NR_ACL_ENTS``), VMIDs ``MEM_BUF_VMID_PRIMARY_VM``
    or ``MEM_BUF_VMID_TRUSTED_VM``, perms non-zero and within
    ``MEM_BUF_PERM_VALID_FLAGS``.  The driver itself lets zero perms through
    to the resource manager; backends refuse them.  Descriptors handed out
    (export, import, alloc) outlive the device.
    """

    #: The operations wait inside the driver for the remote VM or the resource
    #: manager (seconds, on real hardware): callers serving an event loop run
    #: them in a worker thread.
    blocking: bool = False

    @property
    @abc.abstractmethod
    def abi(self) -> MemBufAbi:
        """The ioctl ABI the device speaks."""

    @abc.abstractmethod
    def alloc(
        self,
        size: int,
        acl: Sequence[AclEntry],
        *,
        src_mem_type: int = 0,
        src_heap_id: int = 0,
        dst_mem_type: int = 0,
        dst_heap_id: int = 0,
    ) -> OwnedFd:
        """Allocate *size* bytes from another VM into this one; return the mem-buf fd
        (closing it returns the memory).

        The driver rounds sizes up to its hotplug alignment; backends refuse
        sizes that are not page multiples instead, so nobody gets silently
        more than asked.

        Raises:
            EINVAL: size 0 or not page aligned, bad ACL, memory types not
                below ``MEM_BUF_MAX_MEM_TYPE``.
        """

    @abc.abstractmethod
    def export(self, dma_buf_fd: int, acl: Sequence[AclEntry]) -> MemparcelExport:
        """Share dma-buf *dma_buf_fd* with the VMs of *acl* as a memparcel.

        The memparcel lives while ``export_fd`` is open somewhere: closing the
        last copy of it revokes the memory from the other VMs.

        Raises:
            EINVAL: bad ACL (the entry count is checked before *dma_buf_fd*,
                the entries after), not an exportable dma-buf (real mem-buf:
                cached, non-secure, not yet mmapped; emulated: a memfd opened
                for reading), already exported.
            EBADF: *dma_buf_fd* is not open.
        """

    @abc.abstractmethod
    def import_memparcel(self, memparcel_hdl: int, acl: Sequence[AclEntry]) -> OwnedFd:
        """Import memparcel *memparcel_hdl* as a dma-buf fd (close it to release).

        The resource manager accepts the memparcel only with exactly its ACL
        (the same set of VMID/perms pairs, in any order) and only for a VM in
        it; it answers a bad or released handle the same way, which
        ``gh_rm_remap_error`` turns into ``EINVAL``.

        The import never gives this VM write access its perms lack, nor more
        access than the exported descriptor had.

        Raises:
            EINVAL: bad ACL; an ACL other than the export's; this VM not in
                it; no such memparcel (never exported, or its export fd closed).
            EACCES: (emulated) WRITE perms on a memparcel exported through a
                read-only descriptor.
        """


# --------------------------------------------------------------------------- backend


class Backend(_Closeable):
    """The devices of one domain.

    ``domid`` is the Xen domain the devices act as; ``vmid`` the mem-buf VMID.
    """

    name: str
    domid: int
    vmid: int

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend supports."""

    @abc.abstractmethod
    def open_gntdev(self) -> GntdevInstance:
        """A fresh gntdev instance (its first mapping has index 0)."""

    @abc.abstractmethod
    def open_gntalloc(self) -> GntallocInstance:
        """A fresh gntalloc instance."""

    @abc.abstractmethod
    def open_evtchn(self) -> EvtchnHandle:
        """A fresh event-channel handle."""

    @abc.abstractmethod
    def open_membuf(self) -> MemBufDevice:
        """The mem-buf device.

        Raises:
            ENODEV: no mem-buf device on this host.
        """
