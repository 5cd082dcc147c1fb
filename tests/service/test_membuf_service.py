"""The MemBuf service through real sockets: alloc, export by one VM, import by another."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE
from grant_broker_protocol.fds import OwnedFd
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.membuf import (
    MEM_BUF_PERM_FLAG_READ,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
    PERM_RW,
    AclEntry,
)

from .conftest import InProcessBroker

ACL = [(MEM_BUF_VMID_TRUSTED_VM, PERM_RW)]


@pytest.fixture
async def primary(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=1, vmid=MEM_BUF_VMID_PRIMARY_VM) as session:
        yield session


@pytest.fixture
async def trusted(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=2, vmid=MEM_BUF_VMID_TRUSTED_VM) as session:
        yield session


def dma_buf(data: bytes, size: int = PAGE_SIZE) -> OwnedFd:
    """A buffer to export (the emulated mem-buf takes memfds as dma-bufs)."""
    fd = OwnedFd(os.memfd_create("dma-buf", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    os.ftruncate(fd.fileno(), size)
    os.pwrite(fd.fileno(), data, 0)
    return fd


async def test_alloc_gives_a_mappable_fd_of_the_size(primary: Session) -> None:
    with await primary.membuf.alloc(2 * PAGE_SIZE, [AclEntry(MEM_BUF_VMID_PRIMARY_VM, PERM_RW)]) as fd:
        assert os.fstat(fd.fileno()).st_size == 2 * PAGE_SIZE
        with mmap.mmap(fd.fileno(), 2 * PAGE_SIZE) as memory:
            memory[0:2] = b"ok"
    assert (await primary.describe()).usage.membufs == 1


async def test_alloc_of_a_partial_page_is_einval(primary: Session) -> None:
    with pytest.raises(BrokerClientError) as raised:
        await primary.membuf.alloc(PAGE_SIZE + 1, ACL)
    assert raised.value.errno == errno.EINVAL and raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_export_then_import_by_handle_shares_the_data(primary: Session, trusted: Session) -> None:
    with dma_buf(b"parcel") as buffer:
        parcel = await primary.membuf.export(buffer, ACL)
    with parcel.export_fd, await trusted.membuf.import_(parcel.handle, ACL) as imported:
        assert parcel.handle != 0
        with mmap.mmap(imported.fileno(), PAGE_SIZE) as memory:
            assert memory[0:6] == b"parcel"


async def test_import_with_a_wrong_acl_is_refused(primary: Session, trusted: Session) -> None:
    with dma_buf(b"x") as buffer:
        parcel = await primary.membuf.export(buffer, ACL)
    with parcel.export_fd:
        with pytest.raises(BrokerClientError) as raised:
            await trusted.membuf.import_(parcel.handle, [(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ)])
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.errno == errno.EINVAL
        assert "does not match" in raised.value.detail


async def test_closing_the_export_fd_revokes_the_memparcel(primary: Session, trusted: Session) -> None:
    with dma_buf(b"x") as buffer:
        parcel = await primary.membuf.export(buffer, ACL)
    parcel.export_fd.close()
    await asyncio.sleep(0.05)
    with pytest.raises(BrokerClientError) as raised:
        await trusted.membuf.import_(parcel.handle, ACL)
    assert raised.value.errno == errno.EINVAL and "revoked" in raised.value.detail


async def test_export_of_something_that_is_not_a_dma_buf_is_einval(primary: Session) -> None:
    read_end, write_end = os.pipe()
    with OwnedFd(read_end), OwnedFd(write_end):
        with pytest.raises(BrokerClientError) as raised:
            await primary.membuf.export(read_end, ACL)
    assert raised.value.errno == errno.EINVAL


@pytest.mark.parametrize("operation", ["alloc", "export", "import"])
async def test_an_error_names_its_operation_once(primary: Session, operation: str) -> None:
    with dma_buf(b"x") as buffer:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "alloc": lambda: primary.membuf.alloc(PAGE_SIZE, []),
            "export": lambda: primary.membuf.export(buffer, []),
            "import": lambda: primary.membuf.import_(1, []),
        }
        with pytest.raises(BrokerClientError) as raised:
            await calls[operation]()
    assert raised.value.operation == f"mem-buf {operation}"
    assert str(raised.value).startswith(f"mem-buf {operation}: Invalid argument (EINVAL): an ACL needs 1..16 entries")
