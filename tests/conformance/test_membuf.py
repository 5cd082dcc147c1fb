"""mem-buf (Qualcomm ``/dev/membuf``, legacy 2020 ABI): allocation, export, import.

Written against the backend contract only.  ``domains.local`` exports and
``domains.peer`` imports; a host without mem-buf (any Xen host) answers
``ENODEV`` from ``open_membuf`` and these tests skip.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from grant_broker.backend.contract import PAGE_SIZE, AclEntry, Backend, MemBufDevice
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.mem_buf import (
    MEM_BUF_MAX_MEM_TYPE,
    MEM_BUF_MAX_NR_ACL_ENTS,
    MEM_BUF_PERM_FLAG_READ,
    MEM_BUF_PERM_FLAG_WRITE,
    MEM_BUF_PERM_VALID_FLAGS,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
)

from .conftest import Domains

RW = MEM_BUF_PERM_FLAG_READ | MEM_BUF_PERM_FLAG_WRITE
SHARED_ACL = (AclEntry(MEM_BUF_VMID_PRIMARY_VM, RW), AclEntry(MEM_BUF_VMID_TRUSTED_VM, RW))
BUFFER_SIZE = 2 * PAGE_SIZE
NEVER_ISSUED_HDL = 0xFFFF_FFFF


# --------------------------------------------------------------------------- fixtures


@dataclass
class MemBuf:
    local: MemBufDevice  # the exporting VM
    peer: MemBufDevice  # the importing VM


def _open_membuf(backend: Backend) -> MemBufDevice:
    try:
        return backend.open_membuf()
    except BrokerError as exc:
        if exc.errno == errno.ENODEV:
            pytest.skip(f"no mem-buf device: {exc}")
        raise


@pytest.fixture
def membuf(domains: Domains) -> Iterator[MemBuf]:
    with _open_membuf(domains.local) as local, _open_membuf(domains.peer) as peer:
        yield MemBuf(local, peer)


@pytest.fixture
def dma_buf(membuf: MemBuf) -> Iterator[OwnedFd]:
    """A buffer for the local VM to export.

    The emulated mem-buf takes a memfd as a dma-buf.  A real mem-buf exports
    only cached, non-secure ION / dma-heap buffers: a real host joining CI
    allocates one here instead.
    """
    fd = OwnedFd(os.memfd_create("conformance dma-buf", os.MFD_CLOEXEC))
    os.ftruncate(fd.fileno(), BUFFER_SIZE)
    with fd:
        yield fd


def _errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(BrokerError) as caught:
        call()
    return caught.value.errno


# ACL validation is the same on all three operations; each helper closes what
# it gets, so a wrongly accepted ACL fails the test without leaking.


def _alloc_with(membuf: MemBuf, dma_buf: OwnedFd, acl: Sequence[AclEntry]) -> None:
    membuf.local.alloc(PAGE_SIZE, acl).close()


def _export_with(membuf: MemBuf, dma_buf: OwnedFd, acl: Sequence[AclEntry]) -> None:
    membuf.local.export(dma_buf.fileno(), acl).export_fd.close()


def _import_with(membuf: MemBuf, dma_buf: OwnedFd, acl: Sequence[AclEntry]) -> None:
    exported = membuf.local.export(dma_buf.fileno(), SHARED_ACL)
    with exported.export_fd:
        membuf.peer.import_memparcel(exported.memparcel_hdl, acl).close()


ACL_OPERATIONS = pytest.mark.parametrize(
    "operation", [_alloc_with, _export_with, _import_with], ids=["alloc", "export", "import"]
)


# --------------------------------------------------------------------------- alloc


def test_alloc_returns_an_open_descriptor(membuf: MemBuf) -> None:
    with membuf.local.alloc(PAGE_SIZE, SHARED_ACL) as fd:
        os.fstat(fd.fileno())


def test_alloc_of_zero_bytes_is_einval(membuf: MemBuf) -> None:
    assert _errno_of(lambda: membuf.local.alloc(0, SHARED_ACL)) == errno.EINVAL


def test_alloc_of_unaligned_size_is_einval(membuf: MemBuf) -> None:
    assert _errno_of(lambda: membuf.local.alloc(PAGE_SIZE + 1, SHARED_ACL)) == errno.EINVAL


@pytest.mark.parametrize("which", ["src_mem_type", "dst_mem_type"])
def test_alloc_with_unknown_mem_type_is_einval(membuf: MemBuf, which: str) -> None:
    kwargs = {which: int(MEM_BUF_MAX_MEM_TYPE)}
    assert _errno_of(lambda: membuf.local.alloc(PAGE_SIZE, SHARED_ACL, **kwargs)) == errno.EINVAL


# --------------------------------------------------------------------------- ACL validation


@ACL_OPERATIONS
def test_acl_with_zero_entries_is_einval(membuf: MemBuf, dma_buf: OwnedFd, operation: Callable[..., None]) -> None:
    assert _errno_of(lambda: operation(membuf, dma_buf, ())) == errno.EINVAL


@ACL_OPERATIONS
def test_acl_with_17_entries_is_einval(membuf: MemBuf, dma_buf: OwnedFd, operation: Callable[..., None]) -> None:
    acl = SHARED_ACL + (AclEntry(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ),) * (MEM_BUF_MAX_NR_ACL_ENTS - 1)
    assert len(acl) == 17
    assert _errno_of(lambda: operation(membuf, dma_buf, acl)) == errno.EINVAL


@ACL_OPERATIONS
def test_unknown_vmid_is_einval(membuf: MemBuf, dma_buf: OwnedFd, operation: Callable[..., None]) -> None:
    unknown = max(MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM) + 1
    acl = (*SHARED_ACL, AclEntry(unknown, RW))
    assert _errno_of(lambda: operation(membuf, dma_buf, acl)) == errno.EINVAL


@ACL_OPERATIONS
def test_perms_outside_rwx_are_einval(membuf: MemBuf, dma_buf: OwnedFd, operation: Callable[..., None]) -> None:
    outside = (MEM_BUF_PERM_VALID_FLAGS + 1) | MEM_BUF_PERM_FLAG_READ
    acl = (AclEntry(MEM_BUF_VMID_PRIMARY_VM, RW), AclEntry(MEM_BUF_VMID_TRUSTED_VM, outside))
    assert _errno_of(lambda: operation(membuf, dma_buf, acl)) == errno.EINVAL


@ACL_OPERATIONS
def test_zero_perms_are_einval(membuf: MemBuf, dma_buf: OwnedFd, operation: Callable[..., None]) -> None:
    acl = (AclEntry(MEM_BUF_VMID_PRIMARY_VM, RW), AclEntry(MEM_BUF_VMID_TRUSTED_VM, 0))
    assert _errno_of(lambda: operation(membuf, dma_buf, acl)) == errno.EINVAL


# --------------------------------------------------------------------------- export


def test_export_gives_a_nonzero_handle_and_an_open_export_fd(membuf: MemBuf, dma_buf: OwnedFd) -> None:
    exported = membuf.local.export(dma_buf.fileno(), SHARED_ACL)
    with exported.export_fd:
        os.fstat(exported.export_fd.fileno())
        assert 0 < exported.memparcel_hdl <= 0xFFFF_FFFF


def test_export_of_a_closed_fd_is_ebadf(membuf: MemBuf) -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.close(read_end)  # nothing opens a descriptor between here and the export
    assert _errno_of(lambda: membuf.local.export(read_end, SHARED_ACL)) == errno.EBADF


def test_export_of_a_non_dmabuf_is_einval(membuf: MemBuf) -> None:
    read_end, write_end = os.pipe()
    try:
        assert _errno_of(lambda: membuf.local.export(read_end, SHARED_ACL)) == errno.EINVAL
    finally:
        os.close(read_end)
        os.close(write_end)


# --------------------------------------------------------------------------- import


def test_export_then_import_shares_memory(membuf: MemBuf, dma_buf: OwnedFd) -> None:
    exported = membuf.local.export(dma_buf.fileno(), SHARED_ACL)
    with exported.export_fd, membuf.peer.import_memparcel(exported.memparcel_hdl, SHARED_ACL) as imported:
        with mmap.mmap(dma_buf.fileno(), BUFFER_SIZE) as mine, mmap.mmap(imported.fileno(), BUFFER_SIZE) as theirs:
            mine[:5] = b"hello"
            assert theirs[:5] == b"hello"
            theirs[PAGE_SIZE : PAGE_SIZE + 5] = b"world"
            assert mine[PAGE_SIZE : PAGE_SIZE + 5] == b"world"


def test_import_with_wrong_acl_is_refused(membuf: MemBuf, dma_buf: OwnedFd) -> None:
    exported = membuf.local.export(dma_buf.fileno(), SHARED_ACL)
    read_only_peer = (AclEntry(MEM_BUF_VMID_PRIMARY_VM, RW), AclEntry(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ))
    with exported.export_fd:
        code = _errno_of(lambda: membuf.peer.import_memparcel(exported.memparcel_hdl, read_only_peer))
    assert code == errno.EINVAL


def test_import_by_a_vm_outside_the_acl_is_refused(membuf: MemBuf, dma_buf: OwnedFd) -> None:
    only_local = (AclEntry(MEM_BUF_VMID_PRIMARY_VM, RW),)
    exported = membuf.local.export(dma_buf.fileno(), only_local)
    with exported.export_fd:
        code = _errno_of(lambda: membuf.peer.import_memparcel(exported.memparcel_hdl, only_local))
    assert code == errno.EINVAL


def test_import_of_unknown_handle_is_refused(membuf: MemBuf) -> None:
    code = _errno_of(lambda: membuf.peer.import_memparcel(NEVER_ISSUED_HDL, SHARED_ACL))
    assert code == errno.EINVAL


def test_closing_export_fd_revokes_memparcel(membuf: MemBuf, dma_buf: OwnedFd) -> None:
    exported = membuf.local.export(dma_buf.fileno(), SHARED_ACL)
    exported.export_fd.close()
    code = _errno_of(lambda: membuf.peer.import_memparcel(exported.memparcel_hdl, SHARED_ACL))
    assert code == errno.EINVAL


def test_a_copy_of_the_export_fd_keeps_the_memparcel(membuf: MemBuf, dma_buf: OwnedFd) -> None:
    exported = membuf.local.export(dma_buf.fileno(), SHARED_ACL)
    with exported.export_fd.dup():  # the copy alone keeps it alive
        exported.export_fd.close()
        membuf.peer.import_memparcel(exported.memparcel_hdl, SHARED_ACL).close()
    code = _errno_of(lambda: membuf.peer.import_memparcel(exported.memparcel_hdl, SHARED_ACL))
    assert code == errno.EINVAL
