"""Mem-buf operations: Qualcomm mem-buf memparcels for local clients.

The operations check what the driver checks before anything else (ACL count
against ``nr_acl_entries``, 1..16 entries, reserved fields zero), leave the
semantic checks (VMIDs, perms, sizes, memory types) to the backend, and hand
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

from grant_broker.backend.contract import MemBufDevice
from grant_broker.backend.membuf_rules import check_acl_count
from grant_broker.core.checks import check_peers, check_reserved_zero, invalid
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
from grant_broker_protocol.abi import AclEntry
from grant_broker_protocol.v1 import common_pb2, membuf_pb2

# No VM lends a client more than this in one piece; anything larger is a
# mistake (or a sparse-file trick on the emulated backend), refused up front.
MAX_ALLOC_BYTES = 1 << 36

_Result = TypeVar("_Result")


def _acl(op: str, nr_acl_entries: int, entries: Sequence[membuf_pb2.AclEntry]) -> list[AclEntry]:
    if nr_acl_entries != len(entries):
        raise invalid(op, f"nr_acl_entries is {nr_acl_entries} but {len(entries)} ACL entries are given")
    acl = [AclEntry(entry.vmid, entry.perms) for entry in entries]
    check_acl_count(acl, op)
    return acl


async def _on_device(device: MemBufDevice, call: Callable[[], _Result]) -> _Result:
    # A real driver waits for the remote VM inside the ioctl: keep the loop serving.
    if device.blocking:
        return await asyncio.to_thread(call)
    return call()


async def alloc(session: Session, request: membuf_pb2.MemBufAllocRequest) -> Reply[membuf_pb2.MemBufAllocResponse]:
    op = "mem-buf alloc"
    acl = _acl(op, request.nr_acl_entries, request.acl_list)
    check_peers(session, op, "lend memory to", vmids=[entry.vmid for entry in acl])
    check_reserved_zero(op, reserved0=request.reserved0, reserved1=request.reserved1, reserved2=request.reserved2)
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
    return Reply(membuf_pb2.MemBufAllocResponse(mem_buf_fd=common_pb2.FdRef(index=0)), [fd])


async def export(session: Session, request: membuf_pb2.MemBufExportRequest) -> Reply[membuf_pb2.MemBufExportResponse]:
    op = "mem-buf export"
    # Descriptors first, even for a request about to be refused: a transfer
    # left unclaimed would count against the session's pending transfers.
    (dma_buf,) = await session.take_fds(op, request.fd_transfer, [request.dma_buf_fd.index])
    # The backend dups what it keeps of the dma-buf (a dup keeps the client's
    # open file description and so its access mode; nothing reopens it), and
    # the broker's copy of the client's descriptor is not needed past the call.
    with dma_buf:
        session.check_live(op)
        acl = _acl(op, request.nr_acl_entries, request.acl_list)
        check_reserved_zero(op, reserved0=request.reserved0, reserved1=request.reserved1, reserved2=request.reserved2)
        check_peers(session, op, "share memory with", vmids=[entry.vmid for entry in acl])
        device = session.membuf
        exported = await _on_device(device, functools.partial(device.export, dma_buf.fileno(), acl))
    session.usage.membufs += 1
    return Reply(
        membuf_pb2.MemBufExportResponse(export_fd=common_pb2.FdRef(index=0), memparcel_hdl=exported.memparcel_hdl),
        [exported.export_fd],
    )


async def import_(session: Session, request: membuf_pb2.MemBufImportRequest) -> Reply[membuf_pb2.MemBufImportResponse]:
    op = "mem-buf import"
    acl = _acl(op, request.nr_acl_entries, request.acl_list)
    check_peers(session, op, "import memory shared with", vmids=[entry.vmid for entry in acl])
    check_reserved_zero(
        op,
        reserved0=request.reserved0,
        reserved1=request.reserved1,
        reserved2=request.reserved2,
        reserved3=request.reserved3,
    )
    device = session.membuf
    fd = await _on_device(device, functools.partial(device.import_memparcel, request.memparcel_hdl, acl))
    session.usage.membufs += 1
    return Reply(membuf_pb2.MemBufImportResponse(dma_buf_import_fd=common_pb2.FdRef(index=0)), [fd])
