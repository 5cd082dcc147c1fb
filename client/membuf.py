"""Qualcomm mem-buf through the broker: ``session.membuf``.

Share a dma-buf with another VM and import it there:

>>> async def lend(session, dma_buf_fd: int) -> int:                       # doctest: +SKIP
...     parcel = await session.membuf.export(dma_buf_fd, [(MEM_BUF_VMID_TRUSTED_VM, PERM_RW)])
...     keep_open(parcel.export_fd)       # closing it takes the memory back
...     return parcel.handle
>>> async def borrow(session, handle: int) -> OwnedFd:                     # doctest: +SKIP
...     return await session.membuf.import_(handle, [(MEM_BUF_VMID_TRUSTED_VM, PERM_RW)])

ACL entries are :class:`AclEntry` or ``(vmid, perms)`` pairs; perms are
``MEM_BUF_PERM_FLAG_*`` bits.  An ACL that does not match the export is
refused with INVALID_ARGUMENT (EINVAL).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from grant_broker.backend.contract import AclEntry
from grant_broker.fds import OwnedFd
from grant_broker.uapi.mem_buf import (
    MEM_BUF_PERM_FLAG_EXEC,
    MEM_BUF_PERM_FLAG_READ,
    MEM_BUF_PERM_FLAG_WRITE,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
)
from grant_broker.v1 import common_pb2, membuf_pb2, membuf_pb2_grpc

if TYPE_CHECKING:
    from grant_broker_client.session import Session

PERM_RW = MEM_BUF_PERM_FLAG_READ | MEM_BUF_PERM_FLAG_WRITE

AclLike = AclEntry | tuple[int, int]

__all__ = [
    "MEM_BUF_PERM_FLAG_EXEC",
    "MEM_BUF_PERM_FLAG_READ",
    "MEM_BUF_PERM_FLAG_WRITE",
    "MEM_BUF_VMID_PRIMARY_VM",
    "MEM_BUF_VMID_TRUSTED_VM",
    "PERM_RW",
    "AclEntry",
    "AclLike",
    "MemBufClient",
    "Memparcel",
]


class Memparcel(NamedTuple):
    """An exported dma-buf: keep :attr:`export_fd` open as long as the other VMs
    may use the memory; closing it (its last copy) takes the memory back."""

    export_fd: OwnedFd
    handle: int


def _acl(entries: Iterable[AclLike]) -> list[membuf_pb2.AclEntry]:
    acl = []
    for entry in entries:
        vmid, perms = (entry.vmid, entry.perms) if isinstance(entry, AclEntry) else entry
        acl.append(membuf_pb2.AclEntry(vmid=vmid, perms=perms))
    return acl


class MemBufClient:
    """``/dev/membuf`` (the 2020 ALLOC/EXPORT/IMPORT ABI) through the broker.  Use ``session.membuf``."""

    def __init__(self, session: "Session") -> None:
        self._session = session
        self._stub = membuf_pb2_grpc.MemBufStub(session.grpc_channel)

    async def alloc(
        self,
        size: int,
        acl: Iterable[AclLike],
        *,
        src_mem_type: int = 0,
        src_heap_id: int = 0,
        dst_mem_type: int = 0,
        dst_heap_id: int = 0,
    ) -> OwnedFd:
        """Borrow *size* bytes (a page multiple) from another VM; closing the fd returns them."""
        entries = _acl(acl)
        response = await self._session.call(
            self._stub.Alloc,
            membuf_pb2.MemBufAllocRequest(
                size=size,
                acl_list=entries,
                nr_acl_entries=len(entries),
                src_mem_type=src_mem_type,
                src_data=membuf_pb2.MemBufIonData(heap_id=src_heap_id),
                dst_mem_type=dst_mem_type,
                dst_data=membuf_pb2.MemBufIonData(heap_id=dst_heap_id),
            ),
        )
        (fd,) = await self._session.receive_fds(response.fd_transfer, 1)
        return fd

    async def export(self, dma_buf_fd: int | OwnedFd, acl: Iterable[AclLike]) -> Memparcel:
        """Share dma-buf *dma_buf_fd* (borrowed) with the VMs of *acl*."""
        entries = _acl(acl)
        fd = dma_buf_fd if isinstance(dma_buf_fd, int) else dma_buf_fd.fileno()
        transfer = await self._session.send_fds([fd])
        response = await self._session.call(
            self._stub.Export,
            membuf_pb2.MemBufExportRequest(
                fd_transfer=transfer, dma_buf_fd=common_pb2.FdRef(index=0), nr_acl_entries=len(entries), acl_list=entries
            ),
        )
        (export_fd,) = await self._session.receive_fds(response.fd_transfer, 1)
        return Memparcel(export_fd, response.memparcel_hdl)

    async def import_(self, handle: int, acl: Iterable[AclLike]) -> OwnedFd:
        """Import memparcel *handle* as a dma-buf fd; *acl* must match the export's."""
        entries = _acl(acl)
        response = await self._session.call(
            self._stub.Import,
            membuf_pb2.MemBufImportRequest(memparcel_hdl=handle, nr_acl_entries=len(entries), acl_list=entries),
        )
        (fd,) = await self._session.receive_fds(response.fd_transfer, 1)
        return fd
