"""Qualcomm mem-buf through the broker: ``session.membuf``.

Example — VM 0 lends a buffer to VM 1, which imports it by handle (on the
emulated backend, where a session may choose its VM, and memfds stand for
dma-bufs)::

    import os
    import grant_broker_client
    from grant_broker_client.membuf import MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM, PERM_RW

    async def lend_and_borrow(socket_path: str) -> None:
        acl = [(MEM_BUF_VMID_TRUSTED_VM, PERM_RW)]
        async with await grant_broker_client.connect(socket_path, domid=1, vmid=MEM_BUF_VMID_PRIMARY_VM) as lender, \\
                   await grant_broker_client.connect(socket_path, domid=2, vmid=MEM_BUF_VMID_TRUSTED_VM) as borrower:
            buffer = os.memfd_create("dma-buf", os.MFD_CLOEXEC)
            os.ftruncate(buffer, 4096)
            os.pwrite(buffer, b"lent", 0)
            parcel = await lender.membuf.export(buffer, acl)     # keep parcel.export_fd open while lent
            os.close(buffer)
            with parcel.export_fd, await borrower.membuf.import_(parcel.handle, acl) as imported:
                assert os.pread(imported.fileno(), 4, 0) == b"lent"

    # asyncio.run(lend_and_borrow("/run/grant-broker/broker.sock"))

ACL entries are :class:`AclEntry` or ``(vmid, perms)`` pairs; perms are
``MEM_BUF_PERM_FLAG_*`` bits.  An ACL that does not match the export is
refused with INVALID_ARGUMENT (EINVAL).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import grpc

from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.abi import (
    AclEntry,
    MEM_BUF_PERM_FLAG_EXEC,
    MEM_BUF_PERM_FLAG_READ,
    MEM_BUF_PERM_FLAG_WRITE,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
)
from grant_broker_protocol.v1 import common_pb2, membuf_pb2, membuf_pb2_grpc
from grant_broker_client.errors import BrokerClientError

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
        self._stub_instance: membuf_pb2_grpc.MemBufStub | None = None

    @property
    def _stub(self) -> membuf_pb2_grpc.MemBufStub:
        # Made on first use, and never on a closed session: grpcio (1.85)
        # hangs or crashes when a stub is built on a closed aio channel.
        if self._stub_instance is None:
            if self._session.closed:
                raise BrokerClientError(errno.EPIPE, "mem-buf", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)
            self._stub_instance = membuf_pb2_grpc.MemBufStub(self._session.grpc_channel)
        return self._stub_instance

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
