"""The emulated hypervisor never lends a client more authority than it holds (issue 14, §1 §2 §6).

Backend-specific: on a real host the kernel decides all of this (a dma-buf is
a dma-buf, a read-only gntdev mapping is the device), so these checks live
here and not in the conformance suite.

* **§1** A dma-buf import takes only memory the emulated hypervisor made,
  named by a writable descriptor: any other file (an O_PATH or O_RDONLY
  descriptor of a file the client may not write, a client's own memfd) is
  EINVAL, as ``dma_buf_get`` answers for a non-dma-buf.  No descriptor a
  client supplied is ever reopened through ``/proc``.
* **§2** Read-only hand-outs are O_RDONLY descriptors of memfds of mode 0600
  owned by the broker's user, which no other unprivileged user can reopen
  writable; a mem-buf import never has more access than the descriptor that
  was exported.
* **§6** Memory the hypervisor made never changes size: it is sealed against
  shrinking and growing, so a holder cannot SIGBUS the others mapping it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from grant_broker.backend.contract import (
    PAGE_SIZE,
    AclEntry,
    Backend,
    CopyForeign,
    CopyLocal,
    GrantCopySegment,
    GrantRef,
)
from grant_broker.backend.emulated import EmulatedHypervisor
from grant_broker.uapi.grant_table import GNTST_okay
from grant_broker.uapi.mem_buf import (
    MEM_BUF_PERM_FLAG_READ,
    MEM_BUF_PERM_FLAG_WRITE,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd

NOBODY = 65534
RW = MEM_BUF_PERM_FLAG_READ | MEM_BUF_PERM_FLAG_WRITE
SHARE_RW = (AclEntry(MEM_BUF_VMID_TRUSTED_VM, RW),)
SHARE_READ = (AclEntry(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ),)
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@dataclass
class Domains:
    hypervisor: EmulatedHypervisor
    granter: Backend  # domain 1, mem-buf VM 0
    grantee: Backend  # domain 2, mem-buf VM 1


@pytest.fixture
def domains(fd_baseline: None) -> Iterator[Domains]:
    with EmulatedHypervisor() as hypervisor:
        granter = hypervisor.backend(1, vmid=MEM_BUF_VMID_PRIMARY_VM)
        grantee = hypervisor.backend(2, vmid=MEM_BUF_VMID_TRUSTED_VM)
        with granter, grantee:
            yield Domains(hypervisor, granter, grantee)


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(BrokerError) as caught:
        result = call()
        if isinstance(result, OwnedFd):
            result.close()
    return caught.value.errno


@contextmanager
def granted_page(domains: Domains, *, writable: bool = True) -> Iterator[int]:
    """One page of the granter, granted to the grantee; yields the ref."""
    with domains.granter.open_gntalloc() as gntalloc:
        allocation = gntalloc.alloc_gref(domains.grantee.domid, 1, writable=writable)
        (span,) = gntalloc.memory_spans(allocation.index, 1)
        with span.fd:
            os.pwrite(span.fd.fileno(), b"granter", 0)
        yield allocation.refs[0]


@contextmanager
def grantee_span(domains: Domains, ref: int, *, writable: bool) -> Iterator[OwnedFd]:
    """The grantee's descriptor of the granted page (what a client receives)."""
    with domains.grantee.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs([GrantRef(domains.granter.domid, ref)])
        (span,) = gntdev.map_memory(index, 1, writable=writable)
        with span.fd:
            yield span.fd


@contextmanager
def client_memfd(*, sealed: bool = True, data: bytes = b"client") -> Iterator[OwnedFd]:
    with OwnedFd(os.memfd_create("client", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)) as fd:
        os.ftruncate(fd.fileno(), PAGE_SIZE)
        os.pwrite(fd.fileno(), data, 0)
        if sealed:
            fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, SIZE_SEALS)
        yield fd


@contextmanager
def regular_file(directory: str | None = None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=directory) as where:
        path = Path(where) / "file"
        path.write_bytes(b"root only".ljust(PAGE_SIZE, b"\0"))
        path.chmod(0o600)
        yield path


# --------------------------------------------------------------------------- §1 dma-buf import


@pytest.mark.parametrize("flags", [os.O_PATH, os.O_RDONLY, os.O_RDWR], ids=["O_PATH", "O_RDONLY", "O_RDWR"])
def test_dmabuf_import_of_a_regular_file_is_einval(domains: Domains, flags: int) -> None:
    with regular_file() as path, OwnedFd(os.open(path, flags | os.O_CLOEXEC)) as fd, domains.granter.open_gntdev() as gntdev:
        assert errno_of(lambda: gntdev.dmabuf_import_to_refs(fd.fileno(), domains.grantee.domid, 1)) == errno.EINVAL


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "unsealed"])
def test_dmabuf_import_of_a_clients_own_memfd_is_einval(domains: Domains, sealed: bool) -> None:
    # A memfd is no dma-buf on Linux either (udmabuf would make one of it).
    with client_memfd(sealed=sealed) as fd, domains.granter.open_gntdev() as gntdev:
        assert errno_of(lambda: gntdev.dmabuf_import_to_refs(fd.fileno(), domains.grantee.domid, 1)) == errno.EINVAL


def test_dmabuf_import_of_a_read_only_view_of_granted_memory_is_einval(domains: Domains) -> None:
    # Re-granting it would turn a read-only grant into writable refs.
    with granted_page(domains, writable=False) as ref, grantee_span(domains, ref, writable=False) as span:
        with domains.grantee.open_gntdev() as gntdev:
            assert errno_of(lambda: gntdev.dmabuf_import_to_refs(span.fileno(), domains.granter.domid, 1)) == errno.EINVAL


def test_dmabuf_import_of_an_o_path_view_of_granted_memory_is_einval(domains: Domains) -> None:
    # O_PATH needs no permission on the file, and gives no access to it.
    with granted_page(domains) as ref, grantee_span(domains, ref, writable=True) as span:
        with OwnedFd(os.open(f"/proc/self/fd/{span.fileno()}", os.O_PATH | os.O_CLOEXEC)) as path:
            with domains.grantee.open_gntdev() as gntdev:
                assert errno_of(lambda: gntdev.dmabuf_import_to_refs(path.fileno(), domains.granter.domid, 1)) == errno.EINVAL


def test_dmabuf_import_takes_a_dma_buf_the_hypervisor_exported(domains: Domains) -> None:
    with granted_page(domains) as ref, domains.grantee.open_gntdev() as gntdev:
        with gntdev.dmabuf_export_from_refs(domains.granter.domid, [ref]) as buffer:
            refs = gntdev.dmabuf_import_to_refs(buffer.fileno(), domains.granter.domid, 1)
            with domains.granter.open_gntdev() as back:
                index = back.map_grant_refs([GrantRef(domains.grantee.domid, refs[0])])
                (span,) = back.map_memory(index, 1, writable=False)
                with span.fd:
                    assert os.pread(span.fd.fileno(), 7, 0) == b"granter"
            gntdev.dmabuf_import_release(buffer.fileno())


def test_no_descriptor_a_client_supplied_is_reopened(domains: Domains, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reopen through /proc is of a memfd the hypervisor made itself."""
    reopened: list[tuple[int, int]] = []
    real_open = os.open

    def recording_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        text = os.fsdecode(path)
        if text.startswith("/proc/"):
            target = os.stat(text)
            reopened.append((target.st_dev, target.st_ino))
        return real_open(path, flags, *args, **kwargs)

    with client_memfd() as memfd, regular_file() as path, OwnedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as file:
        clients = {(st.st_dev, st.st_ino) for st in (os.fstat(memfd.fileno()), os.fstat(file.fileno()))}
        monkeypatch.setattr(os, "open", recording_open)
        with domains.granter.open_gntdev() as gntdev, domains.granter.open_membuf() as local, domains.grantee.open_membuf() as peer:
            for fd in (memfd, file):
                with pytest.raises(BrokerError):
                    gntdev.dmabuf_import_to_refs(fd.fileno(), domains.grantee.domid, 1)
            exported = local.export(memfd.fileno(), SHARE_RW)
            with exported.export_fd:
                peer.import_memparcel(exported.memparcel_hdl, SHARE_RW).close()
            with granted_page(domains) as ref, grantee_span(domains, ref, writable=False):
                pass
        monkeypatch.undo()
    assert not clients & set(reopened), "a client's descriptor was reopened through /proc"


def test_a_client_cannot_change_the_descriptor_the_hypervisor_writes_through(domains: Domains) -> None:
    # A span shares an open file description with whoever else got one; if it
    # were the hypervisor's own, O_APPEND set on it (F_SETFL) would turn the
    # hypervisor's pwrite into an append, which the size seals refuse: grant
    # copies and CLEAR_BYTE notifications into those pages would fail.
    with granted_page(domains) as ref, grantee_span(domains, ref, writable=True) as span:
        fcntl.fcntl(span.fileno(), fcntl.F_SETFL, fcntl.fcntl(span.fileno(), fcntl.F_GETFL) | os.O_APPEND)
        with domains.grantee.open_gntdev() as gntdev:
            source = memoryview(b"copied")
            segment = GrantCopySegment(CopyLocal(source), CopyForeign(ref, 0, domains.granter.domid), len(source))
            assert gntdev.grant_copy([segment]) == [GNTST_okay]
        assert os.pread(span.fileno(), 6, 0) == b"copied"


def test_a_span_holder_cannot_keep_a_dma_buf_export_in_use(domains: Domains) -> None:
    # An export's release is seen by its lock going; a writable span's holder
    # locking the whole file through the span must not look like the export.
    forge = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)  # struct flock: the whole file
    with granted_page(domains) as ref, grantee_span(domains, ref, writable=True) as span:
        fcntl.fcntl(span.fileno(), fcntl.F_OFD_SETLK, forge)
        with domains.grantee.open_gntdev() as gntdev:
            buffer = gntdev.dmabuf_export_from_refs(domains.granter.domid, [ref])
            number = buffer.fileno()
            buffer.close()
            try:
                gntdev.dmabuf_export_wait_released(number, 0)
            except BrokerError as exc:
                assert exc.errno == errno.ENOENT, exc  # released, and forgotten; ETIMEDOUT: still "in use"


# --------------------------------------------------------------------------- §2 read-only means read-only


def test_a_read_only_span_is_a_read_only_descriptor_only_the_brokers_user_may_reopen(domains: Domains) -> None:
    with granted_page(domains, writable=False) as ref, grantee_span(domains, ref, writable=False) as span:
        assert fcntl.fcntl(span.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        st = os.fstat(span.fileno())
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
        with pytest.raises(PermissionError):
            mmap.mmap(span.fileno(), PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_reopen_a_read_only_span_writable(domains: Domains) -> None:
    with granted_page(domains, writable=False) as ref, grantee_span(domains, ref, writable=False) as span:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.open(f"/proc/self/fd/{span.fileno()}", os.O_RDWR)
                code = 1
            except PermissionError:
                code = 0
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "nobody reopened a read-only span writable (1) or failed (2)"
        with grantee_span(domains, ref, writable=False) as again:
            assert os.pread(again.fileno(), 7, 0) == b"granter"


def test_membuf_import_with_write_of_a_read_only_export_is_eacces(domains: Domains) -> None:
    with granted_page(domains, writable=False) as ref, grantee_span(domains, ref, writable=False) as span:
        with domains.granter.open_membuf() as local, domains.grantee.open_membuf() as peer:
            exported = local.export(span.fileno(), SHARE_RW)
            with exported.export_fd:
                assert errno_of(lambda: peer.import_memparcel(exported.memparcel_hdl, SHARE_RW)) == errno.EACCES


def test_membuf_read_only_import_of_the_hypervisors_memory_is_read_only(domains: Domains) -> None:
    with granted_page(domains) as ref, domains.grantee.open_gntdev() as gntdev:
        with gntdev.dmabuf_export_from_refs(domains.granter.domid, [ref]) as buffer:
            with domains.granter.open_membuf() as local, domains.grantee.open_membuf() as peer:
                exported = local.export(buffer.fileno(), SHARE_READ)
                with exported.export_fd, peer.import_memparcel(exported.memparcel_hdl, SHARE_READ) as imported:
                    assert fcntl.fcntl(imported.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                    assert os.pread(imported.fileno(), 7, 0) == b"granter"


def test_membuf_read_only_import_of_a_clients_writable_memfd_is_einval(domains: Domains) -> None:
    # The emulation cannot make a read-only descriptor of a client's memfd
    # without reopening it; it refuses rather than hand out write access.
    with client_memfd() as memfd, domains.granter.open_membuf() as local, domains.grantee.open_membuf() as peer:
        exported = local.export(memfd.fileno(), SHARE_READ)
        with exported.export_fd:
            assert errno_of(lambda: peer.import_memparcel(exported.memparcel_hdl, SHARE_READ)) == errno.EINVAL


def test_membuf_import_shares_the_exported_descriptors_access(domains: Domains) -> None:
    with client_memfd() as memfd, domains.granter.open_membuf() as local, domains.grantee.open_membuf() as peer:
        exported = local.export(memfd.fileno(), SHARE_RW)
        with exported.export_fd, peer.import_memparcel(exported.memparcel_hdl, SHARE_RW) as imported:
            assert fcntl.fcntl(imported.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
            os.pwrite(imported.fileno(), b"peer", 0)
            assert os.pread(memfd.fileno(), 4, 0) == b"peer"


@pytest.mark.parametrize("flags", [os.O_PATH, os.O_RDONLY, os.O_RDWR], ids=["O_PATH", "O_RDONLY", "O_RDWR"])
def test_membuf_export_of_a_named_file_is_einval(domains: Domains, flags: int) -> None:
    # Files on tmpfs answer F_GET_SEALS like memfds; a dma-buf has no name.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with regular_file(shm) as path, OwnedFd(os.open(path, flags | os.O_CLOEXEC)) as fd, domains.granter.open_membuf() as local:
        assert errno_of(lambda: local.export(fd.fileno(), SHARE_RW)) == errno.EINVAL


# --------------------------------------------------------------------------- §6 memory that cannot shrink


def test_memory_the_hypervisor_hands_out_cannot_change_size(domains: Domains) -> None:
    with granted_page(domains) as ref, grantee_span(domains, ref, writable=True) as span, domains.grantee.open_gntdev() as gntdev:
        with gntdev.dmabuf_export_from_refs(domains.granter.domid, [ref]) as buffer:
            with domains.granter.open_membuf() as membuf, membuf.alloc(PAGE_SIZE, SHARE_RW) as lent:
                for name, fd in (("span", span), ("dma-buf", buffer), ("mem-buf alloc", lent)):
                    assert fcntl.fcntl(fd.fileno(), fcntl.F_GET_SEALS) & SIZE_SEALS == SIZE_SEALS, name
                    for size in (0, 2 * PAGE_SIZE):
                        with pytest.raises(PermissionError):
                            os.ftruncate(fd.fileno(), size)
            with mmap.mmap(span.fileno(), PAGE_SIZE) as memory:
                assert memory[0:7] == b"granter"
