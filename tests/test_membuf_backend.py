"""The real mem-buf backend (:mod:`grant_broker.backend.membuf`) without mem-buf hardware.

No ``/dev/membuf`` exists on any machine this runs on, so the backend's single
call into the kernel (``membuf._ioctl``) is replaced by fake drivers that play
the 2020 driver's part:

* :class:`LegacyDriver` validates like ``validate_ioctl_arg`` (EINVAL for
  unknown commands, empty ACLs, non-zero reserved fields) and records, at
  ioctl time, the argument's bytes and the memory its pointers lead to;
* the bytes are compared with ``struct.pack`` and with what gcc lays out for
  the same values when compiling ``../shared/seeds/mem-buf.h``;
* :class:`RegistryDriver` answers through the emulated hypervisor's memparcel
  registry, so the backend conformance scenarios of
  ``tests/conformance/test_membuf.py`` run against the real backend end to end.

What the kernel itself does is used where it can be: ``/dev/null`` answers
the probe with ENOTTY as a non-mem-buf device does, and a missing node ENOENT.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grant_broker.backend import membuf as backend
from grant_broker.backend import membuf_rules as rules
from grant_broker.backend.contract import PAGE_SIZE, AclEntry, MemBufAbi
from grant_broker.backend.emulated import EmulatedHypervisor
from grant_broker.backend.emulated.membuf import MemparcelRegistry
from grant_broker.backend.membuf import RealMemBufDevice, probe_abi, probe_device
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.ioctl import _IOC_SIZE
from grant_broker.uapi.mem_buf import (
    MEM_BUF_IOC_ALLOC,
    MEM_BUF_IOC_EXPORT,
    MEM_BUF_IOC_IMPORT,
    MEM_BUF_MAX_MEM_TYPE,
    MEM_BUF_MAX_NR_ACL_ENTS,
    MEM_BUF_PERM_FLAG_EXEC,
    MEM_BUF_PERM_FLAG_READ,
    MEM_BUF_PERM_FLAG_WRITE,
    MEM_BUF_PERM_VALID_FLAGS,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
    acl_entry,
    mem_buf_alloc_ioctl_arg,
    mem_buf_export_ioctl_arg,
    mem_buf_import_ioctl_arg,
    mem_buf_ion_data,
)

SEED_HEADER = Path(__file__).resolve().parents[1].parent / "shared" / "seeds" / "mem-buf.h"
GCC = shutil.which("gcc")

RW = MEM_BUF_PERM_FLAG_READ | MEM_BUF_PERM_FLAG_WRITE
ACL = (AclEntry(MEM_BUF_VMID_PRIMARY_VM, RW), AclEntry(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ))

# The little-endian layouts of the seed header, written out by hand (gcc
# confirms them in test_gcc_layout_of_every_argument).
ALLOC_LAYOUT = "<QQIIQIIQQQQ"  # size acl_list nr src_type src_data dst_type mem_buf_fd dst_data reserved0..2
EXPORT_LAYOUT = "<IIQIIQQQ"  # dma_buf_fd nr acl_list export_fd memparcel_hdl reserved0..2
IMPORT_LAYOUT = "<IIQIIQQQ"  # memparcel_hdl nr acl_list dma_buf_import_fd reserved0 reserved1..3
NAMES = {MEM_BUF_IOC_ALLOC: "alloc", MEM_BUF_IOC_EXPORT: "export", MEM_BUF_IOC_IMPORT: "import"}
ARG_TYPES = {
    MEM_BUF_IOC_ALLOC: mem_buf_alloc_ioctl_arg,
    MEM_BUF_IOC_EXPORT: mem_buf_export_ioctl_arg,
    MEM_BUF_IOC_IMPORT: mem_buf_import_ioctl_arg,
}
LEGACY_ARG_UNION_SIZE = max(ctypes.sizeof(t) for t in ARG_TYPES.values())  # union mem_buf_ioctl_arg


# --------------------------------------------------------------------------- fake drivers


@dataclass
class Call:
    """One ioctl as the driver saw it when it was issued."""

    request: int
    raw: bytes  # the argument's bytes on entry
    acl: list[tuple[int, int]] = field(default_factory=list)  # read through acl_list
    heaps: tuple[int, int] | None = None  # (src, dst) read through src_data / dst_data

    @property
    def name(self) -> str:
        return NAMES.get(self.request, hex(self.request))


_U32 = 0xFFFF_FFFF


def _read_acl(address: int, count: int) -> list[tuple[int, int]]:
    # Allocate ACL arrays of the same size and scribble on them first: were
    # the caller's array already freed, one of these would likely reuse its
    # memory and the entries read below would be 0xffffffff.
    scribbles = [(acl_entry * count)(*[acl_entry(_U32, _U32)] * count) for _ in range(32)]
    entries = [(e.vmid, e.perms) for e in (acl_entry * count).from_address(address)]
    del scribbles
    return entries


class LegacyDriver:
    """The 2020 driver's ``mem_buf_dev_ioctl`` up to the point where it does work.

    Subclasses (or tests, through ``answer``) decide what the work gives.
    """

    def __init__(self, vmid: int = MEM_BUF_VMID_PRIMARY_VM) -> None:
        self.vmid = vmid
        self.calls: list[Call] = []
        # request -> function(arg) that fills the outputs or raises OSError
        self.answer: dict[int, Callable[[ctypes.Structure], None]] = {}

    @property
    def operations(self) -> list[Call]:
        """The calls that passed validation (the probe's never do)."""
        return [c for c in self.calls if c.request in NAMES and not _invalid(c)]

    def ioctl(self, request: int, arg: ctypes.Structure) -> None:
        call = Call(request, bytes(arg))
        self.calls.append(call)
        if _IOC_SIZE(request) > LEGACY_ARG_UNION_SIZE or request not in ARG_TYPES or _invalid(call):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # validate_ioctl_arg
        assert type(arg) is ARG_TYPES[request] and ctypes.sizeof(arg) == _IOC_SIZE(request)
        call.acl = _read_acl(arg.acl_list, arg.nr_acl_entries)
        if request == MEM_BUF_IOC_ALLOC:
            call.heaps = (mem_buf_ion_data.from_address(arg.src_data).heap_id,
                          mem_buf_ion_data.from_address(arg.dst_data).heap_id)
        for vmid, perms in call.acl:  # mem_buf_vmid_to_vmid / mem_buf_perms_to_perms
            if vmid not in (MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM) or perms & ~MEM_BUF_PERM_VALID_FLAGS:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        handler = self.answer.get(request)
        if handler is None:
            raise OSError(errno.ENOSYS, "the test gave no answer")
        handler(arg)


def _invalid(call: Call) -> bool:
    """``validate_ioctl_arg`` of the 2020 driver, on the argument's bytes."""
    if call.request == MEM_BUF_IOC_ALLOC:
        size, acl_list, nr, src, _, dst, _, _, *reserved = struct.unpack(ALLOC_LAYOUT, call.raw)
        return (not size or not nr or not acl_list or nr > MEM_BUF_MAX_NR_ACL_ENTS
                or src >= MEM_BUF_MAX_MEM_TYPE or dst >= MEM_BUF_MAX_MEM_TYPE or any(reserved))
    if call.request == MEM_BUF_IOC_EXPORT:
        _, nr, acl_list, _, _, *reserved = struct.unpack(EXPORT_LAYOUT, call.raw)
    elif call.request == MEM_BUF_IOC_IMPORT:
        _, nr, acl_list, _, *reserved = struct.unpack(IMPORT_LAYOUT, call.raw)
        reserved = reserved[:3]  # the driver checks reserved0..2, not reserved3
    else:
        return True  # unknown commands: validate_ioctl_arg's default case
    return not nr or not acl_list or nr > MEM_BUF_MAX_NR_ACL_ENTS or any(reserved)


class LaterDriver(LegacyDriver):
    """A post-2020 driver whose ALLOC has the legacy layout: EXPORT / IMPORT are gone (ENOTTY)."""

    def ioctl(self, request: int, arg: ctypes.Structure) -> None:
        self.calls.append(Call(request, bytes(arg)))
        if request == MEM_BUF_IOC_ALLOC:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))


class RegistryDriver(LegacyDriver):
    """The 2020 driver of VM *vmid* with the emulated hypervisor as resource manager.

    Descriptors the emulation creates are handed over by number, as the
    kernel installs a new descriptor in the calling process.
    """

    def __init__(self, registry: MemparcelRegistry, vmid: int) -> None:
        super().__init__(vmid)
        self.registry = registry
        self.answer = {MEM_BUF_IOC_ALLOC: self._alloc, MEM_BUF_IOC_EXPORT: self._export,
                       MEM_BUF_IOC_IMPORT: self._import}

    @staticmethod
    def _acl(arg: ctypes.Structure) -> list[AclEntry]:
        return [AclEntry(vmid, perms) for vmid, perms in _read_acl(arg.acl_list, arg.nr_acl_entries)]

    def _alloc(self, arg: ctypes.Structure) -> None:
        fd = os.memfd_create("fake mem-buf alloc", os.MFD_CLOEXEC)
        os.ftruncate(fd, arg.size)
        arg.mem_buf_fd = fd

    def _export(self, arg: ctypes.Structure) -> None:
        try:
            exported = self.registry._export(self.vmid, arg.dma_buf_fd, self._acl(arg))
        except BrokerError as exc:
            raise OSError(exc.errno, exc.strerror) from None  # the kernel says nothing more
        arg.export_fd = exported.export_fd.detach()
        arg.memparcel_hdl = exported.memparcel_hdl

    def _import(self, arg: ctypes.Structure) -> None:
        try:
            imported = self.registry._import(self.vmid, arg.memparcel_hdl, self._acl(arg))
        except BrokerError as exc:
            raise OSError(exc.errno, exc.strerror) from None
        arg.dma_buf_import_fd = imported.detach()


class FakeKernel:
    """Device nodes (plain files under *root*) whose ioctls reach fake drivers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.drivers: dict[tuple[int, int], LegacyDriver] = {}

    def node(self, driver: LegacyDriver, name: str = "membuf") -> str:
        path = self.root / name
        path.touch()
        st = path.stat()
        self.drivers[(st.st_dev, st.st_ino)] = driver
        return str(path)

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure) -> None:
        st = os.fstat(fd)
        driver = self.drivers.get((st.st_dev, st.st_ino))
        if driver is None:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))  # a regular file
        driver.ioctl(request, arg)


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fd_baseline: None) -> FakeKernel:
    fake = FakeKernel(tmp_path)
    monkeypatch.setattr(backend, "_ioctl", fake.ioctl)
    return fake


@pytest.fixture
def driver() -> LegacyDriver:
    return LegacyDriver()


@pytest.fixture
def device(kernel: FakeKernel, driver: LegacyDriver) -> Iterator[RealMemBufDevice]:
    with RealMemBufDevice.open(kernel.node(driver)) as dev:
        yield dev


def _new_fd(text: str = "result") -> int:
    """A fresh descriptor for a fake driver to return, as the kernel installs one.

    Inheritable, as from a driver that forgot O_CLOEXEC: the backend must fix that.
    """
    return os.memfd_create(text, 0)


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _errno_of(call: Callable[[], object]) -> BrokerError:
    with pytest.raises(BrokerError) as caught:
        call()
    return caught.value


# --------------------------------------------------------------------------- open and probe


def test_default_node_is_dev_membuf() -> None:
    assert RealMemBufDevice.open.__defaults__ == ("/dev/membuf",)
    assert probe_abi.__defaults__ == ("/dev/membuf",)


def test_open_of_a_missing_node_is_enodev(tmp_path: Path, fd_baseline: None) -> None:
    missing = str(tmp_path / "membuf")
    error = _errno_of(lambda: RealMemBufDevice.open(missing))
    assert error.errno == errno.ENODEV
    assert error.operation == "mem-buf open"
    assert "no mem-buf device" in str(error) and missing in str(error)
    assert _errno_of(lambda: probe_abi(missing)).errno == errno.ENODEV


@pytest.mark.skipif(os.path.exists("/dev/membuf"), reason="this host has a mem-buf device")
def test_this_host_has_no_membuf() -> None:
    assert _errno_of(RealMemBufDevice.open).errno == errno.ENODEV


def test_other_open_errors_keep_their_errno(tmp_path: Path, fd_baseline: None) -> None:
    # A directory cannot be opened O_RDWR (EISDIR), even by root.
    error = _errno_of(lambda: RealMemBufDevice.open(str(tmp_path)))
    assert (error.errno, error.operation) == (errno.EISDIR, "mem-buf open")
    assert str(tmp_path) in error.detail


def test_a_device_that_is_not_membuf_is_an_unsupported_abi(fd_baseline: None) -> None:
    """The real kernel: /dev/null answers every mem-buf command with ENOTTY."""
    error = _errno_of(lambda: RealMemBufDevice.open("/dev/null"))
    assert error.errno == errno.ENOTTY
    assert error.operation == "mem-buf probe ABI"
    message = str(error)
    assert "/dev/null" in message and "legacy 2020" in message and "will not guess" in message
    assert "MEM_BUF_IOC_IMPORT -> ENOTTY" in message
    assert _errno_of(lambda: probe_abi("/dev/null")).errno == errno.ENOTTY
    with OwnedFd(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)) as null:
        assert _errno_of(lambda: probe_device(null.fileno(), "/dev/null")).errno == errno.ENOTTY


def test_probe_sends_zeroed_legacy_commands_then_an_undefined_one(
    kernel: FakeKernel, driver: LegacyDriver
) -> None:
    path = kernel.node(driver)
    with RealMemBufDevice.open(path) as dev:
        assert dev.abi is MemBufAbi.LEGACY_2020
        assert dev.probe.answers == {
            "MEM_BUF_IOC_ALLOC": errno.EINVAL, "MEM_BUF_IOC_EXPORT": errno.EINVAL, "MEM_BUF_IOC_IMPORT": errno.EINVAL,
        }
        assert dev.probe.undefined_command == errno.EINVAL
        assert "validate_ioctl_arg" in dev.probe.describe() and path in dev.probe.describe()
    assert [c.request for c in driver.calls] == [
        MEM_BUF_IOC_ALLOC, MEM_BUF_IOC_EXPORT, MEM_BUF_IOC_IMPORT, backend.UNDEFINED_COMMAND
    ]
    for call in driver.calls:
        assert call.raw == bytes(_IOC_SIZE(call.request)), f"{call.name}: probe argument not all zero"
    assert not driver.operations
    assert probe_abi(path) is MemBufAbi.LEGACY_2020


def test_undefined_command_fits_the_legacy_argument_union() -> None:
    # Otherwise the 2020 driver's size check, not validate_ioctl_arg, would answer it.
    assert _IOC_SIZE(backend.UNDEFINED_COMMAND) <= LEGACY_ARG_UNION_SIZE
    assert backend.UNDEFINED_COMMAND not in NAMES


def test_a_driver_that_knows_the_numbers_is_reported_so(kernel: FakeKernel) -> None:
    class Dispatching(LegacyDriver):
        def ioctl(self, request: int, arg: ctypes.Structure) -> None:
            if request not in NAMES:
                self.calls.append(Call(request, bytes(arg)))
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
            super().ioctl(request, arg)

    with RealMemBufDevice.open(kernel.node(Dispatching())) as dev:
        assert dev.abi is MemBufAbi.LEGACY_2020
        assert dev.probe.undefined_command == errno.ENOTTY
        assert "numbers are known" in dev.probe.describe()


def test_a_later_mem_buf_abi_is_refused_with_enotty(kernel: FakeKernel) -> None:
    later = LaterDriver()
    path = kernel.node(later)
    error = _errno_of(lambda: RealMemBufDevice.open(path))
    assert error.errno == errno.ENOTTY
    message = str(error)
    assert path in message and "LEND" in message
    assert "MEM_BUF_IOC_ALLOC -> EINVAL, MEM_BUF_IOC_EXPORT -> ENOTTY, MEM_BUF_IOC_IMPORT -> ENOTTY" in message
    assert len(later.calls) == 3  # nothing more is sent to a device that is refused


@pytest.mark.parametrize("answer", [errno.EPERM, errno.EFAULT, backend.KERNEL_ENOTSUPP, 0])
def test_answers_that_fit_no_abi_are_eproto(kernel: FakeKernel, answer: int) -> None:
    class Odd(LegacyDriver):
        def ioctl(self, request: int, arg: ctypes.Structure) -> None:
            self.calls.append(Call(request, bytes(arg)))
            if request == MEM_BUF_IOC_EXPORT and answer:
                raise OSError(answer, "odd")
            if request != MEM_BUF_IOC_EXPORT:
                raise OSError(errno.EINVAL, "invalid")

    path = kernel.node(Odd())
    error = _errno_of(lambda: RealMemBufDevice.open(path))
    assert error.errno == errno.EPROTO
    assert path in str(error) and "will not guess" in str(error)
    expected = "success" if answer == 0 else errno.errorcode.get(answer, f"errno {answer}")
    assert f"MEM_BUF_IOC_EXPORT -> {expected}" in str(error)


# --------------------------------------------------------------------------- the arguments' bytes


def test_alloc_argument(device: RealMemBufDevice, driver: LegacyDriver) -> None:
    returned = _new_fd()
    driver.answer[MEM_BUF_IOC_ALLOC] = lambda arg: setattr(arg, "mem_buf_fd", returned)
    with device.alloc(3 * PAGE_SIZE, ACL, src_heap_id=0x19, dst_heap_id=0x1A) as fd:
        assert fd.fileno() == returned
        assert not os.get_inheritable(fd.fileno())
    (call,) = driver.operations
    size, acl_list, nr, src_type, src_data, dst_type, mem_buf_fd, dst_data, *reserved = struct.unpack(
        ALLOC_LAYOUT, call.raw)
    assert (size, nr, src_type, dst_type, mem_buf_fd, reserved) == (3 * PAGE_SIZE, 2, 0, 0, 0, [0, 0, 0])
    assert acl_list and src_data and dst_data
    assert call.acl == [(MEM_BUF_VMID_PRIMARY_VM, RW), (MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ)]
    assert call.heaps == (0x19, 0x1A)
    assert call.raw == struct.pack(ALLOC_LAYOUT, 3 * PAGE_SIZE, acl_list, 2, 0, src_data, 0, 0, dst_data, 0, 0, 0)


def test_export_argument(device: RealMemBufDevice, driver: LegacyDriver) -> None:
    returned = _new_fd("export")

    def answer(arg: ctypes.Structure) -> None:
        arg.export_fd = returned
        arg.memparcel_hdl = 0xC0FFEE

    driver.answer[MEM_BUF_IOC_EXPORT] = answer
    acl = (AclEntry(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ | MEM_BUF_PERM_FLAG_EXEC),)
    with OwnedFd(_new_fd("dma-buf")) as dma_buf:
        exported = device.export(dma_buf.fileno(), acl)
        with exported.export_fd:
            assert exported.export_fd.fileno() == returned
            assert exported.memparcel_hdl == 0xC0FFEE
            assert not os.get_inheritable(returned)
        (call,) = driver.operations
        dma_buf_fd, nr, acl_list, export_fd, hdl, *reserved = struct.unpack(EXPORT_LAYOUT, call.raw)
        assert (dma_buf_fd, nr, export_fd, hdl, reserved) == (dma_buf.fileno(), 1, 0, 0, [0, 0, 0])
        assert call.acl == [(MEM_BUF_VMID_TRUSTED_VM, 0b101)]
        os.fstat(dma_buf.fileno())  # borrowed, still open


def test_import_argument(device: RealMemBufDevice, driver: LegacyDriver) -> None:
    returned = _new_fd("import")
    driver.answer[MEM_BUF_IOC_IMPORT] = lambda arg: setattr(arg, "dma_buf_import_fd", returned)
    acl = [AclEntry(i % 2, (i % 7) + 1) for i in range(MEM_BUF_MAX_NR_ACL_ENTS)]
    with device.import_memparcel(0xFFFF_FFFF, acl) as fd:
        assert fd.fileno() == returned
    (call,) = driver.operations
    hdl, nr, acl_list, import_fd, *reserved = struct.unpack(IMPORT_LAYOUT, call.raw)
    assert (hdl, nr, import_fd, reserved) == (0xFFFF_FFFF, 16, 0, [0, 0, 0, 0])
    assert call.acl == [(e.vmid, e.perms) for e in acl]


def test_the_acl_outlives_the_call(device: RealMemBufDevice, driver: LegacyDriver) -> None:
    """Many calls, each read through its pointer after scribbling on fresh arrays."""
    driver.answer[MEM_BUF_IOC_IMPORT] = lambda arg: setattr(arg, "dma_buf_import_fd", _new_fd())
    for n in range(1, MEM_BUF_MAX_NR_ACL_ENTS + 1):
        acl = [AclEntry(MEM_BUF_VMID_TRUSTED_VM, (n + i) % 7 + 1) for i in range(n)]
        device.import_memparcel(n, acl).close()
        assert driver.operations[-1].acl == [(e.vmid, e.perms) for e in acl]


# --------------------------------------------------------------------------- gcc's layout


C_PROGRAM = textwrap.dedent("""\
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include "{header}"

    static unsigned long long v(char **argv, int i) {{ return strtoull(argv[i], NULL, 0); }}
    static void dump(const void *p, size_t n) {{
        const unsigned char *b = p;
        for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
        printf("\\n");
    }}

    /* Fill each struct as a C caller would (zeroed, then the named fields) and print its bytes. */
    int main(int argc, char **argv) {{
        if (argc == 2 && !strcmp(argv[1], "ioc")) {{
            printf("%lu %lu %lu\\n", (unsigned long)MEM_BUF_IOC_ALLOC, (unsigned long)MEM_BUF_IOC_EXPORT,
                   (unsigned long)MEM_BUF_IOC_IMPORT);
        }} else if (argc == 9 && !strcmp(argv[1], "alloc")) {{
            struct mem_buf_alloc_ioctl_arg a;
            memset(&a, 0, sizeof a);
            a.size = v(argv, 2); a.acl_list = v(argv, 3); a.nr_acl_entries = v(argv, 4);
            a.src_mem_type = v(argv, 5); a.src_data = v(argv, 6); a.dst_mem_type = v(argv, 7); a.dst_data = v(argv, 8);
            dump(&a, sizeof a);
        }} else if (argc == 5 && !strcmp(argv[1], "export")) {{
            struct mem_buf_export_ioctl_arg a;
            memset(&a, 0, sizeof a);
            a.dma_buf_fd = v(argv, 2); a.nr_acl_entries = v(argv, 3); a.acl_list = v(argv, 4);
            dump(&a, sizeof a);
        }} else if (argc == 5 && !strcmp(argv[1], "import")) {{
            struct mem_buf_import_ioctl_arg a;
            memset(&a, 0, sizeof a);
            a.memparcel_hdl = v(argv, 2); a.nr_acl_entries = v(argv, 3); a.acl_list = v(argv, 4);
            dump(&a, sizeof a);
        }} else if (argc >= 2 && !strcmp(argv[1], "acl")) {{
            struct acl_entry e[MEM_BUF_MAX_NR_ACL_ENTS];
            int n = (argc - 2) / 2;
            memset(e, 0, sizeof e);
            for (int i = 0; i < n; i++) {{ e[i].vmid = v(argv, 2 + 2 * i); e[i].perms = v(argv, 3 + 2 * i); }}
            dump(e, n * sizeof e[0]);
        }} else if (argc == 3 && !strcmp(argv[1], "ion")) {{
            struct mem_buf_ion_data d = {{ .heap_id = v(argv, 2) }};
            dump(&d, sizeof d);
        }} else {{
            return 2;
        }}
        return 0;
    }}
""")


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., bytes]:
    """Run the program gcc compiled against the seed header: ``c_layout("alloc", ...)`` -> bytes."""
    if GCC is None:
        pytest.skip("gcc not found on PATH; cannot compile the seed header")
    if not SEED_HEADER.exists():
        # ../shared/seeds/ is reference data kept beside the clone (CI always has
        # it), never copied into the repository: its absence is a failure.
        pytest.fail(f"C header not found: {SEED_HEADER}. The reference headers are not in the repository; "
                    "they are read from ../shared/seeds/ beside the clone.", pytrace=False)
    work = tmp_path_factory.mktemp("membuf_layout")
    src, exe = work / "layout.c", work / "layout"
    src.write_text(C_PROGRAM.format(header=SEED_HEADER))
    build = subprocess.run([GCC, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"compiling {src} failed:\n{build.stderr}"

    def run(*args: object) -> bytes:
        out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=True).stdout
        return bytes.fromhex(out.strip()) if args[0] != "ioc" else out.encode()

    return run


def test_gcc_ioctl_numbers(c_layout: Callable[..., bytes]) -> None:
    assert c_layout("ioc").decode().split() == [str(MEM_BUF_IOC_ALLOC), str(MEM_BUF_IOC_EXPORT), str(MEM_BUF_IOC_IMPORT)]


def test_gcc_layout_of_every_argument(
    device: RealMemBufDevice, driver: LegacyDriver, c_layout: Callable[..., bytes]
) -> None:
    """What the backend passed, byte for byte, is what a C caller of the seed header passes."""
    driver.answer = {
        MEM_BUF_IOC_ALLOC: lambda arg: setattr(arg, "mem_buf_fd", _new_fd()),
        MEM_BUF_IOC_EXPORT: lambda arg: setattr(arg, "export_fd", _new_fd()),
        MEM_BUF_IOC_IMPORT: lambda arg: setattr(arg, "dma_buf_import_fd", _new_fd()),
    }
    acl = (AclEntry(MEM_BUF_VMID_TRUSTED_VM, 7), AclEntry(MEM_BUF_VMID_PRIMARY_VM, 2), AclEntry(1, 1))
    device.alloc(1 << 33, acl, src_heap_id=0xDEADBEEF, dst_heap_id=3).close()
    with OwnedFd(_new_fd("dma-buf")) as dma_buf:
        device.export(dma_buf.fileno(), acl).export_fd.close()
    device.import_memparcel(0x12345678, acl).close()

    alloc, export, import_ = driver.operations
    _, acl_list, _, _, src_data, _, _, dst_data, *_ = struct.unpack(ALLOC_LAYOUT, alloc.raw)
    assert alloc.raw == c_layout("alloc", 1 << 33, acl_list, 3, 0, src_data, 0, dst_data)
    dma_buf_fd, _, acl_list, *_ = struct.unpack(EXPORT_LAYOUT, export.raw)
    assert export.raw == c_layout("export", dma_buf_fd, 3, acl_list)
    _, _, acl_list, *_ = struct.unpack(IMPORT_LAYOUT, import_.raw)
    assert import_.raw == c_layout("import", 0x12345678, 3, acl_list)

    c_acl = c_layout("acl", *(x for e in acl for x in (e.vmid, e.perms)))
    for call in (alloc, export, import_):
        assert struct.pack("<" + "II" * 3, *(x for pair in call.acl for x in pair)) == c_acl
    assert struct.pack("<I", alloc.heaps[0]) == c_layout("ion", 0xDEADBEEF)
    assert struct.pack("<I", alloc.heaps[1]) == c_layout("ion", 3)


# --------------------------------------------------------------------------- kernel errors


def _fail_with(code: int) -> Callable[[ctypes.Structure], None]:
    def answer(arg: ctypes.Structure) -> None:
        raise OSError(code, os.strerror(code) if code < 200 else "Unknown error")
    return answer


def test_import_refused_by_the_resource_manager(device: RealMemBufDevice, driver: LegacyDriver) -> None:
    driver.answer[MEM_BUF_IOC_IMPORT] = _fail_with(errno.EINVAL)
    error = _errno_of(lambda: device.import_memparcel(0x2A, ACL))
    assert (error.errno, error.operation) == (errno.EINVAL, "mem-buf import")
    assert "memparcel 0x2a" in error.detail
    assert "vmid 0 (MEM_BUF_VMID_PRIMARY_VM): perms 0x3" in error.detail
    assert "vmid 1 (MEM_BUF_VMID_TRUSTED_VM): perms 0x1" in error.detail
    assert "resource manager" in error.detail


def test_export_errors_name_the_dma_buf(device: RealMemBufDevice, driver: LegacyDriver) -> None:
    driver.answer[MEM_BUF_IOC_EXPORT] = _fail_with(errno.EINVAL)
    with OwnedFd(_new_fd("dma-buf")) as dma_buf:
        number = dma_buf.fileno()
        error = _errno_of(lambda: device.export(number, ACL))
    assert (error.errno, error.operation) == (errno.EINVAL, "mem-buf export")
    assert f"dma-buf fd {number} to ACL [vmid 0" in error.detail
    assert "cached, non-secure" in error.detail


@pytest.mark.parametrize("code", [errno.ETIMEDOUT, errno.ENOMEM, errno.EPERM, errno.EFAULT])
def test_alloc_errors_keep_their_errno(device: RealMemBufDevice, driver: LegacyDriver, code: int) -> None:
    driver.answer[MEM_BUF_IOC_ALLOC] = _fail_with(code)
    error = _errno_of(lambda: device.alloc(PAGE_SIZE, ACL, src_heap_id=5))
    assert (error.errno, error.operation) == (code, "mem-buf alloc")
    assert f"{PAGE_SIZE} bytes from heap 5" in error.detail and "MEM_BUF_VMID_TRUSTED_VM" in error.detail


@pytest.mark.parametrize(("request_", "role"), [(MEM_BUF_IOC_ALLOC, "consumer"), (MEM_BUF_IOC_EXPORT, "supplier"),
                                                (MEM_BUF_IOC_IMPORT, "consumer")])
def test_kernel_enotsupp_becomes_eopnotsupp(
    device: RealMemBufDevice, driver: LegacyDriver, request_: int, role: str
) -> None:
    driver.answer[request_] = _fail_with(backend.KERNEL_ENOTSUPP)
    with OwnedFd(_new_fd("dma-buf")) as dma_buf:
        call = {
            MEM_BUF_IOC_ALLOC: lambda: device.alloc(PAGE_SIZE, ACL),
            MEM_BUF_IOC_EXPORT: lambda: device.export(dma_buf.fileno(), ACL),
            MEM_BUF_IOC_IMPORT: lambda: device.import_memparcel(1, ACL),
        }[request_]
        error = _errno_of(call)
    assert error.errno == errno.EOPNOTSUPP
    assert "ENOTSUPP (524)" in error.detail and f"not a {role}" in error.detail


def test_a_returned_number_that_is_not_open_is_eproto(device: RealMemBufDevice, driver: LegacyDriver) -> None:
    with OwnedFd(_new_fd()) as probe:
        stale = probe.fileno()
    driver.answer[MEM_BUF_IOC_IMPORT] = lambda arg: setattr(arg, "dma_buf_import_fd", stale)
    error = _errno_of(lambda: device.import_memparcel(1, ACL))
    assert error.errno == errno.EPROTO and f"dma_buf_import_fd {stale}" in error.detail


# --------------------------------------------------------------------------- validation before any ioctl


BAD_ACLS = {
    "no entries": (),
    "17 entries": ACL + (AclEntry(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ),) * 15,
    "unknown vmid": (AclEntry(2, RW),),
    "negative vmid": (AclEntry(-1, RW),),
    "perms outside RWX": (AclEntry(MEM_BUF_VMID_PRIMARY_VM, 0x8 | MEM_BUF_PERM_FLAG_READ),),
    "negative perms": (AclEntry(MEM_BUF_VMID_PRIMARY_VM, -1),),
    "zero perms": (AclEntry(MEM_BUF_VMID_PRIMARY_VM, RW), AclEntry(MEM_BUF_VMID_TRUSTED_VM, 0)),
}


@pytest.mark.parametrize("acl", BAD_ACLS.values(), ids=BAD_ACLS.keys())
@pytest.mark.parametrize("operation", ["alloc", "export", "import"])
def test_bad_acls_never_reach_the_driver(
    device: RealMemBufDevice, driver: LegacyDriver, acl: tuple[AclEntry, ...], operation: str
) -> None:
    with OwnedFd(_new_fd("dma-buf")) as dma_buf:
        call = {
            "alloc": lambda: device.alloc(PAGE_SIZE, acl),
            "export": lambda: device.export(dma_buf.fileno(), acl),
            "import": lambda: device.import_memparcel(1, acl),
        }[operation]
        error = _errno_of(call)
    assert (error.errno, error.operation) == (errno.EINVAL, f"mem-buf {operation}")
    assert not driver.operations and len(driver.calls) == 4  # the probe's


RULES = {
    "check_acl_count": lambda operation: rules.check_acl_count((), operation),
    "check_acl_entries": lambda operation: rules.check_acl_entries((AclEntry(2, RW),), operation),
    "check_alloc": lambda operation: rules.check_alloc(
        operation, PAGE_SIZE + 1, ACL, src_mem_type=0, src_heap_id=0, dst_mem_type=0, dst_heap_id=0),
}


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_a_rule_names_the_operation_as_its_caller_does(rule: Callable[[str], object]) -> None:
    error = _errno_of(lambda: rule("mem-buf alloc"))
    assert error.operation == "mem-buf alloc"
    assert str(error).startswith("mem-buf alloc: Invalid argument (EINVAL): ")


BAD_ALLOCS = {
    "size 0": dict(size=0),
    "negative size": dict(size=-PAGE_SIZE),
    "unaligned size": dict(size=PAGE_SIZE + 1),
    "size beyond u64": dict(size=1 << 64),
    "src_mem_type": dict(src_mem_type=int(MEM_BUF_MAX_MEM_TYPE)),
    "dst_mem_type": dict(dst_mem_type=int(MEM_BUF_MAX_MEM_TYPE)),
    "negative mem type": dict(src_mem_type=-1),
    "src heap beyond u32": dict(src_heap_id=1 << 32),
    "negative dst heap": dict(dst_heap_id=-1),
}


@pytest.mark.parametrize("kwargs", BAD_ALLOCS.values(), ids=BAD_ALLOCS.keys())
def test_bad_allocs_never_reach_the_driver(device: RealMemBufDevice, driver: LegacyDriver, kwargs: dict) -> None:
    args = {"size": PAGE_SIZE, **kwargs}
    error = _errno_of(lambda: device.alloc(args.pop("size"), ACL, **args))
    assert (error.errno, error.operation) == (errno.EINVAL, "mem-buf alloc")
    assert not driver.operations


@pytest.mark.parametrize("hdl", [-1, 1 << 32])
def test_import_of_a_handle_beyond_u32_is_einval(device: RealMemBufDevice, driver: LegacyDriver, hdl: int) -> None:
    assert _errno_of(lambda: device.import_memparcel(hdl, ACL)).errno == errno.EINVAL
    assert not driver.operations


@pytest.mark.parametrize("fd", [-1, 1 << 31, "closed"])
def test_export_of_a_non_descriptor_is_ebadf(device: RealMemBufDevice, driver: LegacyDriver, fd: int | str) -> None:
    if fd == "closed":
        with OwnedFd(_new_fd()) as gone:
            fd = gone.fileno()
    error = _errno_of(lambda: device.export(fd, ACL))
    assert error.errno == errno.EBADF and f"fd {fd}" in error.detail
    assert not driver.operations


def test_export_checks_count_then_fd_then_entries(device: RealMemBufDevice) -> None:
    """The contract's order, which is the driver's (validate, dma_buf_get, ACL copy)."""
    with OwnedFd(_new_fd()) as gone:
        closed = gone.fileno()
    assert _errno_of(lambda: device.export(closed, ())).errno == errno.EINVAL
    assert _errno_of(lambda: device.export(closed, BAD_ACLS["unknown vmid"])).errno == errno.EBADF


def test_a_closed_device_is_ebadf(kernel: FakeKernel, driver: LegacyDriver) -> None:
    dev = RealMemBufDevice.open(kernel.node(driver))
    dev.close()
    dev.close()
    assert dev.closed and "closed" in repr(dev)
    error = _errno_of(lambda: dev.import_memparcel(1, ACL))
    assert error.errno == errno.EBADF and "closed" in error.detail
    assert not driver.operations


def test_close_during_an_operation_waits_for_it(kernel: FakeKernel, driver: LegacyDriver) -> None:
    dev = RealMemBufDevice.open(kernel.node(driver))
    seen: list[bool] = []

    def answer(arg: ctypes.Structure) -> None:
        dev.close()  # as another thread would, mid-ioctl
        seen.append(dev._fd.closed)
        arg.dma_buf_import_fd = _new_fd()

    driver.answer[MEM_BUF_IOC_IMPORT] = answer
    dev.import_memparcel(1, ACL).close()
    assert seen == [False] and dev._fd.closed


# --------------------------------------------------------------------------- conformance, end to end
#
# The backend conformance scenarios, run against RealMemBufDevice whose
# driver answers through the emulated hypervisor's memparcel registry: what
# the emulated backend is held to, the real backend's ioctl path is too.

from conformance import test_membuf as conformance  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture
def membuf(kernel: FakeKernel) -> Iterator[conformance.MemBuf]:
    with EmulatedHypervisor() as hypervisor:
        local = RegistryDriver(hypervisor.memparcels, MEM_BUF_VMID_PRIMARY_VM)
        peer = RegistryDriver(hypervisor.memparcels, MEM_BUF_VMID_TRUSTED_VM)
        with RealMemBufDevice.open(kernel.node(local, "membuf-primary")) as a, \
                RealMemBufDevice.open(kernel.node(peer, "membuf-trusted")) as b:
            yield conformance.MemBuf(a, b)


@pytest.fixture
def dma_buf(membuf: conformance.MemBuf) -> Iterator[OwnedFd]:
    fd = OwnedFd(os.memfd_create("conformance dma-buf", os.MFD_CLOEXEC))
    os.ftruncate(fd.fileno(), conformance.BUFFER_SIZE)
    with fd:
        yield fd


for _name, _test in vars(conformance).items():
    if _name.startswith("test_") and callable(_test):
        globals()[f"test_conformance_{_name[len('test_'):]}"] = _test
del _name, _test
