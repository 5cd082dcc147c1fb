"""The MemBuf service: Qualcomm mem-buf memparcels for local clients.

The servicer checks what the driver checks before anything else (ACL count
against ``nr_acl_entries``, 1..16 entries, reserved fields zero), leaves the
semantic checks (VMIDs, perms, sizes, memory types) to the backend, and hands
every descriptor straight to the client: the broker keeps none of them.  So a
memparcel lives as long as the client's export fd — beyond the session if the
client passed it on — and an imported or allocated buffer as long as its fd,
exactly as with the device used directly.  ``Usage.membufs`` counts the
descriptors handed out by this session.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from grant_broker.backend.contract import AclEntry, MemBufDevice
from grant_broker.backend.membuf_rules import check_acl_count
from grant_broker.service.gntdev import ensure_live, send_owned
from grant_broker.service.session import SessionRegistry
from grant_broker.service.status import invalid, rpc
from grant_broker_protocol.v1 import common_pb2, membuf_pb2, membuf_pb2_grpc


# No VM lends a client more than this in one piece; anything larger is a
# mistake (or a sparse-file trick on the emulated backend), refused up front.
MAX_ALLOC_BYTES = 1 << 36


def _acl(op: str, nr_acl_entries: int, entries: Sequence[membuf_pb2.AclEntry]) -> list[AclEntry]:
    if nr_acl_entries != len(entries):
        raise invalid(op, f"nr_acl_entries is {nr_acl_entries} but {len(entries)} ACL entries are given")
    acl = [AclEntry(entry.vmid, entry.perms) for entry in entries]
    check_acl_count(acl, op)
    return acl


_Result = TypeVar("_Result")


async def _on_device(device: MemBufDevice, call: Callable[[], _Result]) -> _Result:
    # A real driver waits for the remote VM inside the ioctl: keep the loop serving.
    if device.blocking:
        return await asyncio.to_thread(call)
    return call()


def _reserved_zero(op: str, **fields: int) -> None:
    for name, value in fields.items():
        if value != 0:
            raise invalid(op, f"{name} is {value}; reserved fields must be 0")


class MemBufService(membuf_pb2_grpc.MemBufServicer):
    """``grant_broker.v1.MemBuf`` over the backend contract."""

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    @rpc
    async def Alloc(
        self, request: membuf_pb2.MemBufAllocRequest, context: grpc.aio.ServicerContext
    ) -> membuf_pb2.MemBufAllocResponse:
        op = "mem-buf alloc"
        session = self.registry.session_for(context)
        acl = _acl(op, request.nr_acl_entries, request.acl_list)
        _reserved_zero(op, reserved0=request.reserved0, reserved1=request.reserved1, reserved2=request.reserved2)
        if not 0 < request.size <= MAX_ALLOC_BYTES:
            raise invalid(op, f"size {request.size} is not between 1 and {MAX_ALLOC_BYTES} bytes")
        device = session.membuf
        fd = await _on_device(
            device,
            functools.partial(
                device.alloc,
                request.size,
                acl,
                src_mem_type=request.src_mem_type,
                src_heap_id=request.src_data.heap_id,
                dst_mem_type=request.dst_mem_type,
                dst_heap_id=request.dst_data.heap_id,
            ),
        )
        session.usage.membufs += 1
        transfer = await send_owned(session, [fd])
        return membuf_pb2.MemBufAllocResponse(fd_transfer=transfer, mem_buf_fd=common_pb2.FdRef(index=0))

    @rpc
    async def Export(
        self, request: membuf_pb2.MemBufExportRequest, context: grpc.aio.ServicerContext
    ) -> membuf_pb2.MemBufExportResponse:
        op = "mem-buf export"
        session = self.registry.session_for(context)
        # Descriptors first, even for a request about to be refused: a frame
        # left unclaimed would count against the session's pending frames.
        (dma_buf,) = await session.take_fds(op, request.fd_transfer, [request.dma_buf_fd.index])
        # The backend dups what it keeps of the dma-buf: the broker's copy of
        # the client's descriptor is not needed past the call.
        with dma_buf:
            ensure_live(session, op)
            acl = _acl(op, request.nr_acl_entries, request.acl_list)
            _reserved_zero(op, reserved0=request.reserved0, reserved1=request.reserved1, reserved2=request.reserved2)
            device = session.membuf
            export = await _on_device(device, functools.partial(device.export, dma_buf.fileno(), acl))
        session.usage.membufs += 1
        transfer = await send_owned(session, [export.export_fd])
        return membuf_pb2.MemBufExportResponse(
            fd_transfer=transfer, export_fd=common_pb2.FdRef(index=0), memparcel_hdl=export.memparcel_hdl
        )

    @rpc
    async def Import(
        self, request: membuf_pb2.MemBufImportRequest, context: grpc.aio.ServicerContext
    ) -> membuf_pb2.MemBufImportResponse:
        op = "mem-buf import"
        session = self.registry.session_for(context)
        acl = _acl(op, request.nr_acl_entries, request.acl_list)
        _reserved_zero(
            op,
            reserved0=request.reserved0,
            reserved1=request.reserved1,
            reserved2=request.reserved2,
            reserved3=request.reserved3,
        )
        device = session.membuf
        fd = await _on_device(device, functools.partial(device.import_memparcel, request.memparcel_hdl, acl))
        session.usage.membufs += 1
        transfer = await send_owned(session, [fd])
        return membuf_pb2.MemBufImportResponse(fd_transfer=transfer, dma_buf_import_fd=common_pb2.FdRef(index=0))
