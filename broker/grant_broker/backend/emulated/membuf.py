"""mem-buf of the emulated hypervisor: memparcels shared between VMs.

Follows the legacy (2020) ABI of Qualcomm's ``/dev/membuf`` driver
(``drivers/soc/qcom/mem_buf/mem-buf.c`` in the msm kernel trees) and the
Gunyah/Haven resource manager behind it:

* ``validate_ioctl_arg``: 1..``MEM_BUF_MAX_NR_ACL_ENTS`` ACL entries, a
  non-zero size, memory types below ``MEM_BUF_MAX_MEM_TYPE`` — ``EINVAL``.
* ``mem_buf_acl_to_vmid_perms_list`` / ``mem_buf_acl_to_hh_acl``: each entry's
  VMID must be ``MEM_BUF_VMID_PRIMARY_VM`` or ``MEM_BUF_VMID_TRUSTED_VM`` and
  its perms within ``MEM_BUF_PERM_VALID_FLAGS`` — ``EINVAL``.
* ``mem_buf_export_dma_buf``: ``dma_buf_get`` answers ``EBADF`` for a closed
  descriptor and ``EINVAL`` for one that is not a dma-buf.  The export fd's
  release (``mem_buf_export_release``) takes the memory back from the other
  VMs, so the memparcel is gone once every copy of that fd is closed.
* ``mem_buf_import_dma_buf`` hands the handle and ACL to the resource manager
  (``MEM_ACCEPT`` with ``VALIDATE_ACL_ATTRS``); an unknown or released handle
  and an ACL that differs from the memparcel's come back as resource-manager
  errors that ``gh_rm_remap_error`` turns into ``EINVAL``.

Two rules are the broker's own, stricter than the driver, and documented in
the contract: sizes must be page multiples (the driver silently rounds up to
its hotplug alignment), and perms must not be zero (the driver passes an
empty grant on to the resource manager).

Emulated memory is a memfd.  A "dma-buf" is any shmem-backed descriptor (one
that answers ``F_GET_SEALS``: a memfd, or what the emulated gntdev/gntalloc
hand out); an import reopens the exported memfd through ``/proc/self/fd`` so
both sides share pages but not file offsets, read-only when the importing VM
has no write permission.  An export fd is the read end of a pipe whose write
end the registry keeps and watches (see :class:`.evtchn.PipeWatch`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from grant_broker.backend.contract import AclEntry, MemBufAbi, MemBufDevice, MemparcelExport
from grant_broker.backend.membuf_rules import (
    U32_MAX,
    check_acl_count,
    check_acl_entries,
    check_alloc,
    membuf_error,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.mem_buf import (
    MEM_BUF_PERM_FLAG_WRITE,
)

from .evtchn import PipeWatch

__all__ = ["EmulatedMemBufDevice", "MemparcelRegistry"]



class _Hypervisor(Protocol):
    memparcels: MemparcelRegistry








def _describe(acl: frozenset[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"vmid {vmid}: perms {perms:#x}" for vmid, perms in sorted(acl)) + "]"


def _is_shmem(fd: int) -> bool:
    # memfd_fcntl answers F_GET_SEALS only for shmem/hugetlbfs files.
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return True


@dataclass(eq=False)
class _Memparcel:
    hdl: int
    exporter_vmid: int
    acl: frozenset[tuple[int, int]]
    memory: OwnedFd  # the registry's reference to the dma-buf (dma_buf_get)
    inode: tuple[int, int]
    size: int
    export_pipe: PipeWatch  # closed by every holder -> revoked


class MemparcelRegistry:
    """Every memparcel of the emulated hypervisor (the resource manager's view).

    Thread-safe.  The hypervisor only calls :meth:`close`.
    """

    def __init__(self, hypervisor: object) -> None:
        self._hypervisor = hypervisor
        self._lock: threading.RLock = getattr(hypervisor, "lock", None) or threading.RLock()  # one lock order
        self._parcels: dict[int, _Memparcel] = {}
        self._last_hdl = 0
        self._closed = False

    def close(self) -> None:
        """Revoke every memparcel and close every descriptor the registry holds.

        Descriptors already handed out (imports, export fds) stay the callers'.
        """
        with self._lock:
            self._closed = True
            for parcel in list(self._parcels.values()):
                self._revoke(parcel)

    # ----------------------------------------------------------- device side

    def _export(self, exporter_vmid: int, dma_buf_fd: int, acl: Sequence[AclEntry]) -> MemparcelExport:
        op = "mem-buf export"
        check_acl_count(acl, op)
        try:
            st = os.fstat(dma_buf_fd)
        except (OSError, OverflowError) as exc:
            raise membuf_error(errno.EBADF, op, f"fd {dma_buf_fd} is not open") from exc
        if not stat.S_ISREG(st.st_mode) or not _is_shmem(dma_buf_fd):
            raise membuf_error(
                errno.EINVAL, op,
                f"fd {dma_buf_fd} is not a dma-buf (the emulation takes shmem descriptors such as memfds)",
            )
        if st.st_size == 0:
            raise membuf_error(errno.EINVAL, op, f"dma-buf fd {dma_buf_fd} is empty")
        acl_set = check_acl_entries(acl, op)
        with self._lock:
            self._sweep()
            if self._closed:
                raise membuf_error(errno.ENODEV, op, "the emulated hypervisor is closed")
            inode = (st.st_dev, st.st_ino)
            for parcel in self._parcels.values():
                if parcel.inode == inode:
                    # The memory is already assigned to other VMs; hyp-assigning
                    # it again from HLOS fails in the real driver.
                    raise membuf_error(
                        errno.EINVAL, op, f"fd {dma_buf_fd} is already exported as memparcel {parcel.hdl:#x}"
                    )
            memory = OwnedFd(os.dup(dma_buf_fd))
            try:
                read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                memory.close()
                raise
            export_fd = OwnedFd(read_fd)
            pipe = PipeWatch(OwnedFd(write_fd))
            hdl = self._new_hdl()
            parcel = _Memparcel(hdl, exporter_vmid, acl_set, memory, inode, st.st_size, pipe)
            self._parcels[hdl] = parcel
            pipe.watch(lambda: self._on_export_closed(parcel))
            return MemparcelExport(export_fd=export_fd, memparcel_hdl=hdl)

    def _import(self, importer_vmid: int, memparcel_hdl: int, acl: Sequence[AclEntry]) -> OwnedFd:
        op = "mem-buf import"
        check_acl_count(acl, op)
        acl_set = check_acl_entries(acl, op)
        with self._lock:
            self._sweep()
            parcel = self._parcels.get(memparcel_hdl)
            if parcel is None:
                # RM: HANDLE_INVALID / MEM_RELEASED -> gh_rm_remap_error -> EINVAL
                raise membuf_error(
                    errno.EINVAL, op,
                    f"memparcel {memparcel_hdl:#x} is unknown or revoked (its export fd was closed)",
                )
            perms = 0
            for vmid, entry_perms in parcel.acl:
                if vmid == importer_vmid:
                    perms |= entry_perms
            if not perms:
                raise membuf_error(
                    errno.EINVAL, op,
                    f"memparcel {memparcel_hdl:#x} is not shared with VM {importer_vmid}: {_describe(parcel.acl)}",
                )
            if acl_set != parcel.acl:
                # MEM_ACCEPT with VALIDATE_ACL_ATTRS: the ACL must be the memparcel's.
                raise membuf_error(
                    errno.EINVAL, op,
                    f"ACL {_describe(acl_set)} does not match memparcel {memparcel_hdl:#x}'s {_describe(parcel.acl)}",
                )
            return self._reopen(parcel, writable=bool(perms & MEM_BUF_PERM_FLAG_WRITE))

    @staticmethod
    def _reopen(parcel: _Memparcel, *, writable: bool) -> OwnedFd:
        """A new open file of the same memory, as an imported dma-buf is a new file."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            return OwnedFd(os.open(f"/proc/self/fd/{parcel.memory.fileno()}", flags))
        except OSError:
            # No /proc: share the open file itself (offsets shared, perms not enforced).
            return parcel.memory.dup()

    def _new_hdl(self) -> int:
        # Handles are nonzero u32s; never reuse one while it is live.
        hdl = self._last_hdl
        while True:
            hdl = hdl % U32_MAX + 1
            if hdl not in self._parcels:
                self._last_hdl = hdl
                return hdl

    def _on_export_closed(self, parcel: _Memparcel) -> None:
        with self._lock:
            if self._parcels.get(parcel.hdl) is parcel and parcel.export_pipe.readers_gone():
                self._revoke(parcel)

    def _sweep(self) -> None:
        """Revoke memparcels whose export fd has been closed by every holder."""
        for parcel in list(self._parcels.values()):
            if not parcel.export_pipe.watched_elsewhere() and parcel.export_pipe.readers_gone():
                self._revoke(parcel)

    def _revoke(self, parcel: _Memparcel) -> None:
        """``mem_buf_export_release``: unassign the memory and drop the dma-buf reference.

        Imports already made keep their pages (a memfd cannot be taken back);
        on real hardware the reclaim would fail while they are mapped.
        """
        if self._parcels.get(parcel.hdl) is parcel:
            del self._parcels[parcel.hdl]
        parcel.export_pipe.close()
        parcel.memory.close()


class EmulatedMemBufDevice(MemBufDevice):
    """``/dev/membuf`` of the VM *vmid* (a ``MEM_BUF_VMID_*``) on the emulated hypervisor.

    The device holds no descriptor: what it hands out lives on after it closes,
    as export and import fds outlive the device file on Linux.
    """

    def __init__(self, hypervisor: _Hypervisor, vmid: int) -> None:
        self._registry: MemparcelRegistry = hypervisor.memparcels
        self.vmid = vmid
        self._closed = False

    @property
    def abi(self) -> MemBufAbi:
        return MemBufAbi.LEGACY_2020

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise membuf_error(errno.EBADF, operation, "the device is closed")

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
        op = "mem-buf alloc"
        self._check_open(op)
        check_alloc(
            op, size, acl,
            src_mem_type=src_mem_type, src_heap_id=src_heap_id, dst_mem_type=dst_mem_type, dst_heap_id=dst_heap_id,
        )
        fd = OwnedFd(os.memfd_create(f"mem-buf alloc vm{self.vmid}", os.MFD_CLOEXEC))
        try:
            os.ftruncate(fd.fileno(), size)
        except OSError as exc:
            fd.close()
            raise BrokerError.from_oserror(exc, op, f"{size} bytes") from exc
        return fd

    def export(self, dma_buf_fd: int, acl: Sequence[AclEntry]) -> MemparcelExport:
        self._check_open("mem-buf export")
        return self._registry._export(self.vmid, dma_buf_fd, acl)

    def import_memparcel(self, memparcel_hdl: int, acl: Sequence[AclEntry]) -> OwnedFd:
        self._check_open("mem-buf import")
        if not 0 <= memparcel_hdl <= U32_MAX:
            raise membuf_error(errno.EINVAL, "mem-buf import", f"memparcel handle {memparcel_hdl} does not fit in a __u32")
        return self._registry._import(self.vmid, memparcel_hdl, acl)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"EmulatedMemBufDevice(vmid={self.vmid}{', closed' if self._closed else ''})"
