"""``/dev/xen/gntdev``: other domains' grants mapped into this one (Linux ``drivers/xen/gntdev.c``).

Each :class:`XenGntdev` is one open gntdev file (its :meth:`~XenGntdev.fileno`)
on which :meth:`~XenGntdev.map_grant_refs`, :meth:`~XenGntdev.unmap_grant_ref`,
grant copy, unmap notifications and dma-buf are plain ioctls.  What needs
more than an ioctl is how mapped pages reach a client.

Spans: a fresh gntdev instance per :meth:`~XenGntdev.map_memory`
------------------------------------------------------------------------
The hypervisor maps grants when the gntdev file is mmapped, and on a PV dom0
(the usual kind) Linux 6.1 lets each mapping be mmapped **once in its
lifetime**: a second mmap, even after the first was unmapped, fails with
EINVAL (observed on Xen 4.17 + Linux 6.1 PV dom0).
The broker therefore cannot mmap the pages itself and then hand them on.
:meth:`~XenGntdev.map_memory` instead

1. checks the grants by mapping them once on a *throw-away* instance (map,
   mmap, munmap, close): this is the real hypercall, so a refused grant is
   reported here as the contract asks, with the ref and domain named (and
   Xen's ``GNTST_*`` status, learnt from a one-byte grant-copy read of each
   ref);
2. maps the refs again on a **fresh instance whose only mapping is this one**
   (index 0) and hands out a descriptor of that instance with offset 0 — what
   the Qubes GUI daemon gives the X server, and what Wayland needs.  A
   read-only span is a fresh instance opened ``O_RDONLY``, so nobody can mmap
   it writable (EACCES) or ``mprotect`` it writable later;
3. keeps its own copy of that descriptor, to forward unmap notifications to
   it and to drop it on :meth:`~XenGntdev.unmap_grant_ref`.

The client's own mmap of the span is the one real mapping.  A grant revoked
between step 1 and that mmap makes the mmap fail (EINVAL), as it would have
without the broker.

Security consequence of handing out a gntdev descriptor
-------------------------------------------------------
A descriptor of a gntdev instance is the whole instance: whoever holds it
can issue gntdev ioctls on it.  The fresh instance keeps the broker's own
mappings out of reach (no unmapping, re-arming notifications of or dma-buf
exporting the broker's mappings, nor those of other clients), and only the
one mapping is on it.  But the holder can still ``IOCTL_GNTDEV_MAP_GRANT_REF``
**any grant that any domain offered to this domain** and mmap it, arm unmap
notifications on ports of this domain, and do grant copies — the kernel has
no way to confine an instance to some grants.  So a client that receives a
span is trusted with every grant offered to the broker's domain: policy must
decide who may receive one (clients that may not should use grant copy, which
the broker performs on their behalf).

Notifications: with spans handed out, the broker's own instance keeps only a
reservation of the mapping (never mmapped); a notification armed with
:meth:`~XenGntdev.set_unmap_notify` is armed on the fresh instance(s), whose
mapping is the one that goes away last — at the client's munmap or at
:meth:`~XenGntdev.unmap_grant_ref`, whichever is later — and disarmed on the
reservation, so it fires once.  Each :meth:`~XenGntdev.map_memory` call makes
one more such mapping; with several, each fires the notification when it goes.

``get_offset_for_vaddr``: Linux's ioctl looks the address up in the calling
process and does not check that the mapping there belongs to the instance it
is asked on, nor that the address is the start of it.  The backend checks
the start (``/proc/self/maps``) and that it is a gntdev mapping, then
recognises the mapping by its count among this instance's mappings with
spans handed out (several equally plausible: the most recently mapped).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from grant_broker.backend.contract import (
    PAGE_SIZE,
    CopyForeign,
    CopyLocal,
    GntdevInstance,
    GrantCopySegment,
    GrantRef,
    GrantRefs,
    MemorySpan,
    U32_TYPECODE,
    packed_grants,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi import gntdev as uapi
from grant_broker.uapi.grant_table import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_domain,
    GNTST_okay,
    gntst_name,
)
from grant_broker.uapi.ioctl import flexible

from ._core import DOMID_FIRST_RESERVED, U16_MAX, U32_MAX, U64_MAX, check, fits, ioctl, live, open_device, suppressing

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_NOTIFY_ACTIONS = uapi.UNMAP_NOTIFY_CLEAR_BYTE | uapi.UNMAP_NOTIFY_SEND_EVENT
# A refused mapping of more refs than this is diagnosed by grant copy only,
# not by mapping each ref on its own.
_DIAGNOSE_ONE_BY_ONE = 64


def _refs_text(refs: Sequence[GrantRef]) -> str:
    shown = ", ".join(f"ref {g.ref} of domain {g.domid}" for g in refs[:4])
    return shown + (f" and {len(refs) - 4} more" if len(refs) > 4 else "")


def _map_argument(grants: GrantRefs) -> ctypes.Structure:
    """The ``IOCTL_GNTDEV_MAP_GRANT_REF`` argument for *grants*: the refs
    array (``struct ioctl_gntdev_grant_ref { __u32 domid; __u32 ref; }``)
    filled at once from the packed arrays, not field by field."""
    count = len(grants)
    arg = uapi.map_grant_ref_for(count)
    if count:
        pairs = array(U32_TYPECODE, bytes(8 * count))
        pairs[0::2] = grants.domids
        pairs[1::2] = grants.refs
        ctypes.memmove(ctypes.addressof(arg.refs), pairs.buffer_info()[0], 8 * count)
    return arg


@dataclass(eq=False)
class _Mapping:
    """A mapping of this instance (``struct gntdev_grant_map``), as the broker sees it."""

    index: int  # bytes
    refs: GrantRefs
    readonly: bool | None = None  # decided by the first map_memory
    spans: list[OwnedFd] = field(default_factory=list)  # the broker's copies of the fresh instances
    notify: tuple[int, int, int] | None = None  # (action, offset in the mapping, port)
    notify_on_reservation: bool = False  # armed on this instance's own mapping
    last_span: int = -1  # when the latest span was made (for get_offset_for_vaddr)

    @property
    def count(self) -> int:
        return len(self.refs)

    def contains(self, offset: int) -> bool:
        return self.index <= offset < self.index + (self.count << PAGE_SHIFT)


class XenGntdev(GntdevInstance):
    """One open ``/dev/xen/gntdev``.

    Args:
        path: the device node.
        fd: an already open instance to adopt (tests); else *path* is opened.
    """

    def __init__(self, path: str = uapi.DEVICE_PATH, *, fd: OwnedFd | None = None) -> None:
        self.path = path
        self._fd = fd if fd is not None else open_device(path, os.O_RDWR, "gntdev open")
        self._maps: list[_Mapping] = []  # sorted by index, as the kernel's priv->maps
        self._lock = threading.RLock()
        self._spans_made = itertools.count()

    # ------------------------------------------------------------------ lifetime

    def fileno(self) -> int:
        return self._fd.fileno()

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def close(self) -> None:
        """Close the instance and the broker's copies of the spans' instances.

        Spans a client still holds keep their mapping until the client closes
        them (as copies of one gntdev descriptor would).
        """
        with self._lock:
            maps, self._maps = self._maps, []
            for mapping in maps:
                for span in mapping.spans:
                    span.close()
            self._fd.close()

    def _live(self, operation: str) -> int:
        return live(self._fd, operation, "gntdev instance")

    # ------------------------------------------------------------------ map / unmap

    def map_grant_refs(self, refs: Sequence[GrantRef]) -> int:
        operation = "gntdev map grant refs"
        with self._lock:
            fd = self._live(operation)
            grants = packed_grants(refs, operation)  # each domid and ref a __u32, or EINVAL
            check(bool(grants), errno.EINVAL, operation, "no grant refs given")
            arg = _map_argument(grants)
            ioctl(fd, uapi.IOCTL_GNTDEV_MAP_GRANT_REF, arg, operation, f"{len(grants)} grants: {_refs_text(grants)}")
            mapping = _Mapping(arg.index, grants)
            self._maps.append(mapping)
            self._maps.sort(key=lambda m: m.index)
            return mapping.index

    def _find(self, index: int, count: int) -> _Mapping | None:
        """``gntdev_find_map_index``: by page; count 0 matches any size."""
        page = index >> PAGE_SHIFT
        for mapping in self._maps:
            if mapping.index >> PAGE_SHIFT == page and (count == 0 or mapping.count == count):
                return mapping
        return None

    def unmap_grant_ref(self, index: int, count: int) -> None:
        operation = "gntdev unmap grant ref"
        with self._lock:
            fd = self._live(operation)
            detail = f"no mapping of {count} grants at index {index:#x}"
            check(fits(index, U64_MAX) and fits(count, U32_MAX), errno.ENOENT, operation, detail)
            arg = uapi.ioctl_gntdev_unmap_grant_ref(index=index, count=count)
            ioctl(fd, uapi.IOCTL_GNTDEV_UNMAP_GRANT_REF, arg, operation, detail)
            mapping = self._find(index, count)
            if mapping is not None:
                self._maps.remove(mapping)
                self._drop_spans(mapping)

    @staticmethod
    def _drop_spans(mapping: _Mapping) -> None:
        """The mapping is gone: so are the fresh instances' mappings (a client
        that mmapped one keeps it until munmap, and its notification waits)."""
        spans, mapping.spans = mapping.spans, []
        for span in spans:
            with suppressing(errno.ENOENT, errno.EBADF):
                arg = uapi.ioctl_gntdev_unmap_grant_ref(index=0, count=mapping.count)
                ioctl(span.fileno(), uapi.IOCTL_GNTDEV_UNMAP_GRANT_REF, arg, "gntdev unmap grant ref")
            span.close()

    # ------------------------------------------------------------------ memory

    def map_memory(self, index: int, count: int, *, writable: bool) -> list[MemorySpan]:
        operation = "gntdev map memory"
        with self._lock:
            self._live(operation)
            detail = f"no mapping of {count} grants at index {index:#x}"
            check(fits(index, U64_MAX) and not index & (PAGE_SIZE - 1) and count > 0, errno.EINVAL, operation, detail)
            mapping = self._find(index, count)
            check(mapping is not None and mapping.index == index, errno.EINVAL, operation, detail)
            assert mapping is not None
            if mapping.readonly is None:
                # As gntdev_mmap sets map->flags before it maps: decided even if mapping fails.
                mapping.readonly = not writable
            elif writable and mapping.readonly:
                raise BrokerError(
                    errno.EINVAL, operation, f"the mapping at index {index:#x} was made read-only by its first map"
                )
            self._check_grants(mapping.refs, writable=writable, operation=operation)
            span = self._fresh_instance(mapping, writable=writable, operation=operation)
            try:
                handed_out = span.dup()
            except OSError as exc:
                raise BrokerError.from_oserror(exc, operation) from exc
            return [MemorySpan(handed_out, 0, count << PAGE_SHIFT, writable)]

    def _fresh_instance(self, mapping: _Mapping, *, writable: bool, operation: str) -> OwnedFd:
        """The mapping's refs on an instance of their own (index 0), kept in ``mapping.spans``."""
        flags = os.O_RDWR if writable else os.O_RDONLY
        fresh = open_device(self.path, flags, operation)
        try:
            arg = _map_argument(mapping.refs)
            ioctl(fresh.fileno(), uapi.IOCTL_GNTDEV_MAP_GRANT_REF, arg, operation, _refs_text(mapping.refs))
            check(arg.index == 0, errno.EIO, operation, f"a fresh gntdev instance answered index {arg.index:#x}, not 0")
            if mapping.notify is not None:
                action, offset, port = mapping.notify
                self._arm(fresh.fileno(), offset, action, port, operation)
        except BaseException:
            fresh.close()
            raise
        mapping.spans.append(fresh)
        mapping.last_span = next(self._spans_made)
        if mapping.notify_on_reservation:
            self._arm(self.fileno(), mapping.index, 0, 0, operation)
            mapping.notify_on_reservation = False
        return fresh

    def _probe(self, refs: GrantRefs, *, writable: bool, operation: str) -> BrokerError | None:
        """Map *refs* once on a throw-away instance (the hypercall); the error, if refused."""
        probe = open_device(self.path, os.O_RDWR, operation)
        try:
            arg = _map_argument(refs)
            ioctl(probe.fileno(), uapi.IOCTL_GNTDEV_MAP_GRANT_REF, arg, operation, _refs_text(refs))
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            try:
                mmap.mmap(probe.fileno(), len(refs) << PAGE_SHIFT, mmap.MAP_SHARED, prot, offset=arg.index).close()
            except OSError as exc:
                return BrokerError.from_oserror(exc, operation)
            return None
        finally:
            probe.close()

    def _check_grants(self, refs: GrantRefs, *, writable: bool, operation: str) -> None:
        """Raise, naming the culprit, unless the hypervisor maps *refs* as asked."""
        if max(refs.domains) >= DOMID_FIRST_RESERVED:
            for grant in refs:
                if grant.domid >= DOMID_FIRST_RESERVED:
                    # Xen's map_grant_ref looks the granter up with rcu_lock_domain_by_id:
                    # DOMID_SELF and the other reserved ids are no domain to it
                    # (a grant copy accepts DOMID_SELF), and beyond 0xFFFF the id
                    # would not even fit domid_t.
                    raise BrokerError(
                        errno.EINVAL, operation, f"ref {grant.ref} of domain {grant.domid}: not a domain a grant can be mapped from",
                        gntst=GNTST_bad_domain,
                    )
        refused = self._probe(refs, writable=writable, operation=operation)
        if refused is None:
            return
        if refused.errno != errno.EINVAL:
            refused.detail = f"mapping {_refs_text(refs)}"
            raise refused
        # Linux's mmap says only EINVAL; learn which ref and why from a grant
        # copy of one byte of each (the status of Xen's own check).
        statuses = self._read_probe(refs)
        for grant, status in zip(refs, statuses):
            if status != GNTST_okay:
                raise BrokerError(
                    errno.EINVAL, operation,
                    f"ref {grant.ref} of domain {grant.domid} refused by the hypervisor ({gntst_name(status)})",
                    gntst=status,
                )
        if len(refs) <= _DIAGNOSE_ONE_BY_ONE:
            for i, grant in enumerate(refs):
                one = refs[i : i + 1]
                if self._probe(one, writable=writable, operation=operation) is None:
                    continue
                if writable and self._probe(one, writable=False, operation=operation) is None:
                    why = "it is granted read-only"
                else:
                    why = "the hypervisor refused it"
                raise BrokerError(
                    errno.EINVAL, operation, f"ref {grant.ref} of domain {grant.domid} cannot be mapped{' writable' * writable}: {why}"
                )
        raise BrokerError(errno.EINVAL, operation, f"the hypervisor refused to map {_refs_text(refs)}")

    def _read_probe(self, refs: Sequence[GrantRef]) -> list[int]:
        scratch = bytearray(len(refs))
        segments = [
            GrantCopySegment(CopyForeign(g.ref, 0, g.domid), CopyLocal(memoryview(scratch), i), 1)
            for i, g in enumerate(refs)
        ]
        try:
            return self.grant_copy(segments)
        except BrokerError:
            return [GNTST_okay] * len(refs)

    def get_offset_for_vaddr(self, vaddr: int) -> tuple[int, int]:
        operation = "gntdev get offset for vaddr"
        with self._lock:
            fd = self._live(operation)
            detail = f"no mapping of this instance starts at address {vaddr:#x}"
            check(fits(vaddr, U64_MAX) and _gntdev_vma_starts_at(vaddr, os.fstat(fd)), errno.EINVAL, operation, detail)
            arg = uapi.ioctl_gntdev_get_offset_for_vaddr(vaddr=vaddr)
            ioctl(fd, uapi.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, arg, operation, detail)
            found: _Mapping | None = None
            if arg.offset != 0:
                found = self._find(arg.offset, arg.count)  # this instance's own descriptor, mmapped by someone
            else:
                candidates = [m for m in self._maps if m.count == arg.count and (m.spans or m.index == 0)]
                if candidates:
                    found = max(candidates, key=lambda m: m.last_span)
            check(found is not None, errno.EINVAL, operation, detail)
            assert found is not None
            return found.index, found.count

    def set_max_grants(self, count: int) -> None:
        operation = "gntdev set max grants"
        with self._lock:
            fd = self._live(operation)
            check(fits(count, U32_MAX), errno.EINVAL, operation, f"limit {count} is out of range")
            arg = uapi.ioctl_gntdev_set_max_grants(count=count)
            ioctl(fd, uapi.IOCTL_GNTDEV_SET_MAX_GRANTS, arg, operation, f"limit {count} (current Linux has no per-instance limit)")

    # ------------------------------------------------------------------ notifications

    @staticmethod
    def _arm(fd: int, offset: int, action: int, port: int, operation: str) -> None:
        arg = uapi.ioctl_gntdev_unmap_notify(index=offset, action=action, event_channel_port=port)
        ioctl(fd, uapi.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, arg, operation, _notify_text(offset, action, port))

    def set_unmap_notify(self, offset: int, action: int, port: int) -> None:
        operation = "gntdev set unmap notify"
        with self._lock:
            fd = self._live(operation)
            # gntdev_ioctl_notify's order: action bits, the port, the mapping.
            check(fits(action, U32_MAX) and not action & ~_NOTIFY_ACTIONS, errno.EINVAL, operation, f"unknown action bits in {action:#x}")
            if action & uapi.UNMAP_NOTIFY_SEND_EVENT:
                check(fits(port, U32_MAX), errno.EINVAL, operation, f"event channel port {port} is out of range")
            else:
                port = 0
            mapping = next((m for m in self._maps if m.contains(offset)), None)
            if mapping is None:
                # The kernel's answer, in its order (EINVAL for the port, else ENOENT).
                check(fits(offset, U64_MAX), errno.ENOENT, operation, f"offset {offset:#x} is in no mapping of this instance")
                self._arm(fd, offset, action, port, operation)
                return
            if action & uapi.UNMAP_NOTIFY_CLEAR_BYTE and mapping.readonly:
                # The reservation itself is never mmapped, so the kernel cannot know.
                raise BrokerError(errno.EINVAL, operation, f"CLEAR_BYTE on the read-only mapping at index {mapping.index:#x}")
            relative = offset - mapping.index
            if not mapping.spans:
                self._arm(fd, offset, action, port, operation)
                mapping.notify, mapping.notify_on_reservation = (action, relative, port), True
                return
            previous = mapping.notify
            armed: list[OwnedFd] = []
            try:
                for span in list(mapping.spans):
                    try:
                        self._arm(span.fileno(), relative, action, port, operation)
                    except BrokerError as exc:
                        if exc.errno != errno.ENOENT:
                            raise
                        # The holder unmapped it with its own ioctl: that span is gone.
                        mapping.spans.remove(span)
                        span.close()
                        continue
                    armed.append(span)
            except BrokerError:
                for span in armed:  # best effort: put the earlier notification back
                    with suppressing(errno.EINVAL, errno.ENOENT):
                        old_action, old_offset, old_port = previous or (0, 0, 0)
                        self._arm(span.fileno(), old_offset, old_action, old_port, operation)
                raise
            mapping.notify = (action, relative, port)
            if not mapping.spans:  # every span was gone: the reservation is what is left
                self._arm(fd, offset, action, port, operation)
                mapping.notify_on_reservation = True

    # ------------------------------------------------------------------ grant copy

    def grant_copy(self, segments: Sequence[GrantCopySegment]) -> list[int]:
        operation = "gntdev grant copy"
        with self._lock:
            fd = self._live(operation)
            # Every segment is checked before anything is copied (the kernel
            # checks each as it reaches it, after copying the earlier ones).
            plans = [_check_segment(i, seg, operation) for i, seg in enumerate(segments)]
            statuses = [GNTST_bad_domain if plan is None else GNTST_okay for plan in plans]
            sendable = [(i, seg) for i, (seg, plan) in enumerate(zip(segments, plans)) if plan is not None]
            if not sendable:
                return statuses
            pins: list[object] = []  # ctypes objects holding the local buffers exported
            try:
                array = (uapi.gntdev_grant_copy_segment * len(sendable))()
                for slot, (_, seg) in zip(array, sendable):
                    _fill_segment(slot, seg, pins)
                arg = uapi.ioctl_gntdev_grant_copy(
                    count=len(sendable), segments=ctypes.cast(array, ctypes.POINTER(uapi.gntdev_grant_copy_segment))
                )
                ioctl(fd, uapi.IOCTL_GNTDEV_GRANT_COPY, arg, operation, f"{len(sendable)} segments")
                for slot, (i, _) in zip(array, sendable):
                    statuses[i] = slot.status
            finally:
                pins.clear()  # release the buffer exports before returning
            return statuses

    # ------------------------------------------------------------------ dma-buf

    def dmabuf_export_from_refs(self, domid: int, refs: Sequence[int], flags: int = 0) -> OwnedFd:
        operation = "gntdev dma-buf export from refs"
        with self._lock:
            fd = self._live(operation)
            refs = tuple(refs)
            check(fits(domid, U32_MAX) and fits(flags, U32_MAX) and all(fits(r, U32_MAX) for r in refs),
                  errno.EINVAL, operation, f"domain {domid}, flags {flags:#x} or a ref is out of range")
            arg = flexible(uapi.ioctl_gntdev_dmabuf_exp_from_refs, len(refs))()
            arg.flags, arg.count, arg.domid = flags, len(refs), domid
            for i, ref in enumerate(refs):
                arg.refs[i] = ref
            ioctl(fd, uapi.IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS, arg, operation, f"{len(refs)} refs of domain {domid}")
            return OwnedFd(arg.fd)

    def dmabuf_export_wait_released(self, fd: int, timeout_ms: int) -> None:
        operation = "gntdev dma-buf export wait released"
        instance = self._live(operation)
        check(fits(fd, U32_MAX) and fits(timeout_ms, U32_MAX), errno.EINVAL, operation, f"fd {fd}, timeout {timeout_ms} ms")
        arg = uapi.ioctl_gntdev_dmabuf_exp_wait_released(fd=fd, wait_to_ms=timeout_ms)
        # Not under the lock: the kernel waits up to timeout_ms.
        ioctl(instance, uapi.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED, arg, operation, f"the dma-buf exported as fd {fd}")

    def dmabuf_import_to_refs(self, fd: int, domid: int, count: int) -> tuple[int, ...]:
        operation = "gntdev dma-buf import to refs"
        with self._lock:
            instance = self._live(operation)
            check(fits(fd, U32_MAX) and fits(domid, U32_MAX) and 0 < count <= U32_MAX,
                  errno.EINVAL, operation, f"fd {fd}, domain {domid}, count {count}")
            arg = flexible(uapi.ioctl_gntdev_dmabuf_imp_to_refs, count)()
            arg.fd, arg.count, arg.domid = fd, count, domid
            ioctl(instance, uapi.IOCTL_GNTDEV_DMABUF_IMP_TO_REFS, arg, operation, f"fd {fd}: {count} pages to domain {domid}")
            return tuple(arg.refs[:count])

    def dmabuf_import_release(self, fd: int) -> None:
        operation = "gntdev dma-buf import release"
        with self._lock:
            instance = self._live(operation)
            check(fits(fd, U32_MAX), errno.EBADF, operation, f"fd {fd}")
            arg = uapi.ioctl_gntdev_dmabuf_imp_release(fd=fd)
            ioctl(instance, uapi.IOCTL_GNTDEV_DMABUF_IMP_RELEASE, arg, operation, f"fd {fd}")

    def __repr__(self) -> str:
        state = "closed" if self._fd.closed else f"fd={self._fd.fileno()}"
        return f"<XenGntdev {state} mappings={[(hex(m.index), m.count) for m in self._maps]}>"


# --------------------------------------------------------------------------- helpers


def _notify_text(offset: int, action: int, port: int) -> str:
    what = [name for bit, name in ((uapi.UNMAP_NOTIFY_CLEAR_BYTE, "CLEAR_BYTE"), (uapi.UNMAP_NOTIFY_SEND_EVENT, "SEND_EVENT")) if action & bit]
    text = f"{'|'.join(what) or 'no action'} at offset {offset:#x}"
    return text + (f", port {port}" if action & uapi.UNMAP_NOTIFY_SEND_EVENT else "")


def _byte_view(side: CopyLocal, i: int, name: str, operation: str) -> memoryview:
    view = side.buffer
    try:
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError:
        raise BrokerError(errno.EINVAL, operation, f"segment {i}: {name} buffer is not contiguous") from None


def _check_segment(i: int, seg: GrantCopySegment, operation: str) -> bool | None:
    """Validate one segment as the contract says; None if it names a domain
    that no ``domid_t`` can (its status is then GNTST_bad_domain, unsent)."""
    source, dest, length = seg.source, seg.dest, seg.length
    if isinstance(source, CopyLocal) and isinstance(dest, CopyLocal):
        raise BrokerError(errno.EINVAL, operation, f"segment {i}: both sides are local buffers")
    check(fits(length, U16_MAX), errno.EINVAL, operation, f"segment {i}: length {length} does not fit the 16-bit field")
    sendable: bool | None = True
    for side, name in ((source, "source"), (dest, "destination")):
        if isinstance(side, CopyForeign):
            check(fits(side.ref, U32_MAX), errno.EINVAL, operation, f"segment {i}: {name} ref {side.ref} is out of range")
            if side.offset < 0 or side.offset + length > PAGE_SIZE:
                raise BrokerError(
                    errno.EINVAL, operation,
                    f"segment {i}: {name} ref {side.ref} of domain {side.domid}: "
                    f"{length} bytes at offset {side.offset} cross the page boundary",
                )
            check(side.domid >= 0, errno.EINVAL, operation, f"segment {i}: {name} domain {side.domid} is negative")
            if side.domid > U16_MAX:
                sendable = None
            continue
        view = _byte_view(side, i, name, operation)
        if side.offset < 0 or side.offset + length > view.nbytes:
            # Linux would answer EFAULT, or copy beyond the buffer: the contract says EINVAL.
            raise BrokerError(
                errno.EINVAL, operation,
                f"segment {i}: {name} range {side.offset}..{side.offset + length} is outside its {view.nbytes}-byte buffer",
            )
        if name == "destination" and view.readonly:
            # The kernel would write into it all the same (a bytes object is
            # writable memory to it): refuse with the header's EFAULT.
            raise BrokerError(errno.EFAULT, operation, f"segment {i}: destination buffer is read-only")
    return sendable


def _local_address(side: CopyLocal, length: int, pins: list[object]) -> int:
    """The address of the segment's bytes, kept valid (and the buffer pinned) by *pins*."""
    if length == 0:
        return 0  # the kernel copies nothing and reads no address
    view = _byte_view(side, 0, "local", "gntdev grant copy")
    if view.readonly:
        # A read-only source (bytes, a read-only view): ctypes cannot take its
        # address, so the kernel reads a private copy of the range instead.
        copy = (ctypes.c_char * length).from_buffer_copy(view[side.offset : side.offset + length])
        pins.append(copy)
        return ctypes.addressof(copy)
    whole = (ctypes.c_char * view.nbytes).from_buffer(view)  # exports the buffer: it cannot move or shrink
    pins.append(whole)
    return ctypes.addressof(whole) + side.offset


def _fill_segment(slot: uapi.gntdev_grant_copy_segment, seg: GrantCopySegment, pins: list[object]) -> None:
    """``struct gntdev_grant_copy_segment`` for *seg* (validated by :func:`_check_segment`)."""
    flags = 0
    for union, side, gref_flag in ((slot.source, seg.source, GNTCOPY_source_gref), (slot.dest, seg.dest, GNTCOPY_dest_gref)):
        if isinstance(side, CopyForeign):
            union.foreign.ref, union.foreign.offset, union.foreign.domid = side.ref, side.offset, side.domid
            flags |= gref_flag
        else:
            union.virt = _local_address(side, seg.length, pins)
    slot.len = seg.length
    slot.flags = flags
    slot.status = 0


def _gntdev_vma_starts_at(vaddr: int, device: os.stat_result) -> bool:
    """Whether a mapping of the gntdev device node starts exactly at *vaddr* in this process."""
    want_dev = f"{os.major(device.st_dev):02x}:{os.minor(device.st_dev):02x}"
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and int(fields[0].partition("-")[0], 16) == vaddr:
                    return fields[3] == want_dev and int(fields[4]) == device.st_ino
    except OSError:
        return False
    return False
