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

Emulated memory is a memfd.  A "dma-buf" is an anonymous shmem file opened
for reading: a memfd (one that answers ``F_GET_SEALS`` and has no name — a
file on tmpfs answers ``F_GET_SEALS`` too), the client's own or what the
emulated hypervisor handed out.  An export fd is the read end of a pipe whose
write end the registry keeps and watches (see :class:`.evtchn.PipeWatch`).

The registry never reopens the exported descriptor: it keeps a duplicate
(``dma_buf_get``) and an import is another duplicate of it, so an importer
gets exactly the access the exporter had — an open file description cannot
gain access, while a reopen through ``/proc`` is made with the broker's
credentials.  The import's access must also match the importing VM's perms:

* WRITE on a memparcel exported through a read-only descriptor: EACCES;
* no WRITE on one exported read-write: a read-only descriptor is needed.
  For memory the hypervisor made it is one of its own
  (:meth:`.grants.Backing.descriptor`); for a client's memfd there
  is none to be had without reopening the client's file, so the import is
  refused (EINVAL, an emulation limit — export an O_RDONLY descriptor to share
  read-only).

Importers share the exported file description, and so its file offset:
``mmap``, ``pread`` and ``pwrite`` do not use it.  Memory ``alloc`` makes is
a memfd sealed against resizing, as all memory the hypervisor makes; a
client's memfd exported here can still be shrunk by its owner (its importers,
never the broker, would then fault: the broker maps no mem-buf memory).
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
from .grants import Backing, HypervisorMemory, access_mode, new_memfd

__all__ = ["EmulatedMemBufDevice", "MemparcelRegistry"]



class _Hypervisor(Protocol):
    memparcels: MemparcelRegistry
    memory: HypervisorMemory


def _describe(acl: frozenset[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"vmid {vmid}: perms {perms:#x}" for vmid, perms in sorted(acl)) + "]"


def _is_memfd(fd: int, st: os.stat_result) -> bool:
    """An anonymous shmem file: what the emulation takes for a dma-buf."""
    # memfd_fcntl answers F_GET_SEALS only for shmem/hugetlbfs files, and a
    # memfd has no name (no link): a file on tmpfs, named, is no dma-buf.
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
        return False
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
    memory: OwnedFd  # the registry's reference to the dma-buf (dma_buf_get): a dup, never a reopen
    writable: bool  # whether *memory* was opened read-write
    backing: Backing | None  # the hypervisor's own memory behind it, held; None for a client's memfd
    inode: tuple[int, int]
    size: int
    export_pipe: PipeWatch  # closed by every holder -> revoked


class MemparcelRegistry:
    """Every memparcel of the emulated hypervisor (the resource manager's view).

    Thread-safe.  The hypervisor only calls :meth:`close`.
    """

    def __init__(self, hypervisor: _Hypervisor) -> None:
        self._memory = hypervisor.memory
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
            mode = access_mode(fcntl.fcntl(dma_buf_fd, fcntl.F_GETFL))
        except (OSError, OverflowError) as exc:
            raise membuf_error(errno.EBADF, op, f"fd {dma_buf_fd} is not open") from exc
        if mode not in (os.O_RDONLY, os.O_RDWR) or not _is_memfd(dma_buf_fd, st):
            raise membuf_error(
                errno.EINVAL, op,
                f"fd {dma_buf_fd} is not a dma-buf (the emulation takes memfds opened for reading)",
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
            # A duplicate keeps the exporter's open file description and so
            # its access mode: the registry holds no more than the client had.
            memory = OwnedFd(os.dup(dma_buf_fd))
            try:
                read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                memory.close()
                raise
            export_fd = OwnedFd(read_fd)
            pipe = PipeWatch(OwnedFd(write_fd))
            hdl = self._new_hdl()
            backing = self._memory.backing_of(st)
            if backing is not None:
                backing.hold()  # its read-only descriptor may be needed by an import
            parcel = _Memparcel(
                hdl, exporter_vmid, acl_set, memory, mode == os.O_RDWR, backing, inode, st.st_size, pipe
            )
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
            return self._hand_out(op, parcel, importer_vmid, writable=bool(perms & MEM_BUF_PERM_FLAG_WRITE))

    @staticmethod
    def _hand_out(op: str, parcel: _Memparcel, importer_vmid: int, *, writable: bool) -> OwnedFd:
        """The importer's descriptor: exactly as writable as its perms, never
        more than the exported descriptor (see the module's docstring)."""
        if writable and not parcel.writable:
            raise membuf_error(
                errno.EACCES, op,
                f"memparcel {parcel.hdl:#x} was exported through a read-only descriptor: no VM can import it writable",
            )
        if writable or not parcel.writable:
            return parcel.memory.dup()
        if parcel.backing is not None and not parcel.backing.closed:
            return parcel.backing.descriptor(writable=False)
        raise membuf_error(
            errno.EINVAL, op,
            f"emulation limit: memparcel {parcel.hdl:#x} is a client's memfd exported read-write, and the emulation "
            f"cannot give VM {importer_vmid} (read-only perms) a read-only descriptor of a client's file; "
            "export an O_RDONLY descriptor to share it read-only",
        )

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
        backing, parcel.backing = parcel.backing, None
        if backing is not None:
            backing.drop()


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
        try:
            # Lent memory does not change size: sealed, as all the hypervisor makes.
            return OwnedFd(new_memfd(f"mem-buf alloc vm{self.vmid}", size))
        except OSError as exc:
            raise BrokerError.from_oserror(exc, op, f"{size} bytes") from exc

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
