"""The real mem-buf backend: Qualcomm ``/dev/membuf`` through ``ioctl``, legacy 2020 ABI.

Speaks exactly one ABI, the one of ``../shared/seeds/mem-buf.h`` (ALLOC /
EXPORT / IMPORT, mirrored in :mod:`grant_broker.uapi.mem_buf`), and says so
only after asking the device.  Kernel trees disagree on this interface: later
drivers replaced EXPORT / IMPORT by LEND / SHARE / RETRIEVE / RECLAIM, and
some reorder ``mem_buf_alloc_ioctl_arg``, which changes its size and so the
ioctl number.  A device that does not answer the legacy numbers is refused
with a :class:`BrokerError` naming it, never driven with a guessed layout.

Probing (:func:`probe_device`) sends each legacy command an all-zero
argument.  The 2020 driver (``drivers/soc/qcom/mem_buf/mem-buf.c``,
``mem_buf_dev_ioctl``) copies the argument in and runs
``validate_ioctl_arg`` before anything else: ``size == 0`` /
``nr_acl_entries == 0`` / ``acl_list == NULL`` are ``EINVAL`` there, before a
dma-buf is looked up, the resource manager is called or the capability is
checked.  A kernel without that command number answers ``ENOTTY`` (the later
drivers' dispatch does, for the removed EXPORT / IMPORT; so does any device
that is not mem-buf).  One more zeroed request with a command number no
mem-buf ABI defines tells the two dispatch styles apart: the 2020 driver's
``validate_ioctl_arg`` answers ``EINVAL`` to unknown commands too (so its
``EINVAL`` alone does not prove the number is known), later ones ``ENOTTY``.
That answer is recorded in :class:`MemBufProbe`, not used to refuse.

Every operation checks what the contract requires before the ioctl (the
contract is stricter than the driver: page-multiple sizes, non-zero perms,
known VMIDs), builds the argument from the uapi mirrors with every reserved
field zero, and passes the ACL and per-type data by pointer, the ctypes
objects referenced for the whole call.  Descriptors the kernel returns become
:class:`OwnedFd` (close-on-exec); kernel errors become :class:`BrokerError`
with the kernel's errno and a detail naming the VMIDs, fds or handle.

No mem-buf hardware was available when this was written: the ioctl path is
tested against a fake device that checks the exact bytes against gcc's layout
of the seed header (``tests/test_membuf_backend.py``; ``docs/membuf.md``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

from grant_broker.backend.contract import AclEntry, MemBufAbi, MemBufDevice, MemparcelExport
from grant_broker.backend.membuf_rules import (
    U32_MAX,
    check_acl_count,
    check_acl_entries,
    check_alloc,
    membuf_error,
    vmid_name,
)
from grant_broker_protocol.errors import BrokerError, errno_name
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.ioctl import _IOWR
from grant_broker.uapi.mem_buf import (
    DEVICE_PATH,
    MEM_BUF_ION_MEM_TYPE,
    MEM_BUF_IOC_ALLOC,
    MEM_BUF_IOC_EXPORT,
    MEM_BUF_IOC_IMPORT,
    MEM_BUF_IOC_MAGIC,
    acl_list_for,
    mem_buf_alloc_ioctl_arg,
    mem_buf_export_ioctl_arg,
    mem_buf_import_ioctl_arg,
    mem_buf_ion_data,
)

__all__ = ["MemBufProbe", "RealMemBufDevice", "probe_abi", "probe_device"]

_INT_MAX = 0x7FFF_FFFF

# include/linux/errno.h: ENOTSUPP is kernel-internal, yet the 2020 driver
# returns it to userspace when the VM's role (device tree
# "qcom,mem-buf-capabilities": supplier / consumer / dual) excludes the
# command.  Python has no name for it; the broker reports EOPNOTSUPP.
KERNEL_ENOTSUPP = 524

# The legacy commands, probed in this order.
LEGACY_COMMANDS: tuple[tuple[str, int, type[ctypes.Structure]], ...] = (
    ("MEM_BUF_IOC_ALLOC", MEM_BUF_IOC_ALLOC, mem_buf_alloc_ioctl_arg),
    ("MEM_BUF_IOC_EXPORT", MEM_BUF_IOC_EXPORT, mem_buf_export_ioctl_arg),
    ("MEM_BUF_IOC_IMPORT", MEM_BUF_IOC_IMPORT, mem_buf_import_ioctl_arg),
)

# A command no mem-buf ABI defines (they use numbers 0..6), sized to fit the
# 2020 driver's argument union so it reaches validate_ioctl_arg rather than
# the size check.
UNDEFINED_COMMAND = _IOWR(MEM_BUF_IOC_MAGIC, 0xFF, mem_buf_import_ioctl_arg)


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> None:
    """``ioctl(fd, request, &arg)``, *arg* updated in place; raises OSError.

    The only call into the device: tests replace it with a fake driver.
    """
    fcntl.ioctl(fd, request, arg, True)


# --------------------------------------------------------------------------- ABI probe


@dataclass(frozen=True)
class MemBufProbe:
    """What a device answered to the ABI probe.

    Attributes:
        path: the device node probed.
        abi: the ABI the answers identify.
        answers: command name -> errno of its zeroed request (0: it succeeded).
        undefined_command: errno of the request with a number no ABI defines.
    """

    path: str
    abi: MemBufAbi
    answers: Mapping[str, int]
    undefined_command: int

    def describe(self) -> str:
        """One sentence for logs and ``Capabilities.notes``."""
        if self.undefined_command == errno.EINVAL:
            dispatch = "an undefined command answered EINVAL too, as the 2020 driver's validate_ioctl_arg does"
        else:
            dispatch = f"an undefined command answered {_answer_name(self.undefined_command)}, so the numbers are known"
        return (
            f"{self.path}: mem-buf ABI {self.abi.value}: {', '.join(self.answers)} refused an empty request "
            f"with EINVAL; {dispatch}"
        )


def _answer_name(code: int) -> str:
    return "success" if code == 0 else errno_name(code)


def _answers_text(answers: Mapping[str, int]) -> str:
    return ", ".join(f"{name} -> {_answer_name(code)}" for name, code in answers.items())


def _ask(fd: int, request: int, arg_type: type[ctypes.Structure]) -> int:
    """The errno of *request* with an all-zero argument (0 if it succeeded)."""
    arg = arg_type()  # ctypes zero-fills: no ACL, no size, every reserved field 0
    try:
        _ioctl(fd, request, arg)
    except OSError as exc:
        return exc.errno or errno.EIO
    # An all-zero request cannot succeed on any mem-buf driver.  If something
    # claims it did, the descriptor numbers in *arg* are not trusted enough
    # to close; the caller refuses the device.
    return 0


def probe_device(fd: int, path: str = DEVICE_PATH) -> MemBufProbe:
    """Find out which mem-buf ABI the open device *fd* (opened from *path*) speaks.

    Sends each legacy command a zeroed argument (rejected by the 2020 driver
    with EINVAL before it touches anything), then one undefined command.

    Raises:
        ENOTTY: a legacy command number is unknown to the device: another
            mem-buf ABI (later drivers, reordered structs) or no mem-buf at all.
        EPROTO: answers that fit no ABI (an errno other than EINVAL / ENOTTY,
            or a zeroed request that succeeded).
    """
    op = "mem-buf probe ABI"
    answers = MappingProxyType({name: _ask(fd, request, arg) for name, request, arg in LEGACY_COMMANDS})
    if any(code == errno.ENOTTY for code in answers.values()):
        raise BrokerError(
            errno.ENOTTY, op,
            f"{path} does not speak the legacy 2020 mem-buf ABI ({_answers_text(answers)}): it is a later "
            "mem-buf (LEND / SHARE / RETRIEVE / RECLAIM), a kernel tree with another struct layout, or not "
            "a mem-buf device; the broker supports only the legacy ABI and will not guess another",
        )
    if any(code != errno.EINVAL for code in answers.values()):
        raise BrokerError(
            errno.EPROTO, op,
            f"{path} answered empty requests unlike any known mem-buf driver ({_answers_text(answers)}; "
            "the 2020 driver answers EINVAL to each); its ABI is unknown and the broker will not guess it",
        )
    undefined = _ask(fd, UNDEFINED_COMMAND, mem_buf_import_ioctl_arg)
    return MemBufProbe(path, MemBufAbi.LEGACY_2020, answers, undefined)


def _open_device(path: str) -> OwnedFd:
    try:
        return OwnedFd(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        # ENXIO / ENODEV: the node exists but no driver is behind it.
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            raise BrokerError(
                errno.ENODEV, "mem-buf open", f"no mem-buf device at {path} ({errno_name(exc.errno or 0)})"
            ) from exc
        raise BrokerError.from_oserror(exc, "mem-buf open", path) from exc


def probe_abi(path: str = DEVICE_PATH) -> MemBufAbi:
    """Open *path*, probe it (:func:`probe_device`), close it; return its ABI.

    Raises:
        ENODEV: no mem-buf device at *path*.
        ENOTTY / EPROTO: as :func:`probe_device` (an unsupported ABI).
        other: opening failed (EACCES ...).
    """
    with _open_device(path) as fd:
        return probe_device(fd.fileno(), path).abi


# --------------------------------------------------------------------------- validation






def _describe_acl(acl: Sequence[AclEntry]) -> str:
    return "ACL [" + ", ".join(f"{vmid_name(e.vmid)}: perms {e.perms:#x}" for e in acl) + "]"






def _type_data(mem_type: int, heap_id: int) -> mem_buf_ion_data:
    """The per-type data ``src_data`` / ``dst_data`` point at (only ION exists in this ABI)."""
    assert mem_type == MEM_BUF_ION_MEM_TYPE, mem_type  # checked against MEM_BUF_MAX_MEM_TYPE before
    return mem_buf_ion_data(heap_id=heap_id)


# Why the driver answers EINVAL, per operation (it says no more than the errno).
_EINVAL_HINTS = {
    "mem-buf alloc": "the driver or the remote VM refused the request",
    "mem-buf export": "not an exportable dma-buf (a cached, non-secure ION buffer nobody has mmapped), or already exported",
    "mem-buf import": "the resource manager refused it: no such memparcel (never exported, or its export fd closed), "
              "this VM not in its ACL, or an ACL other than the memparcel's",
}
_ROLES = {"mem-buf alloc": "consumer", "mem-buf export": "supplier", "mem-buf import": "consumer"}


def _failure(exc: OSError, operation: str, detail: str) -> BrokerError:
    code = exc.errno or errno.EIO
    if code == KERNEL_ENOTSUPP:
        return membuf_error(
            errno.EOPNOTSUPP, operation,
            f"{detail}: the driver answered ENOTSUPP (524): this VM's mem-buf is not a {_ROLES[operation]} "
            "(device tree qcom,mem-buf-capabilities)",
        )
    if code == errno.EINVAL:
        return membuf_error(code, operation, f"{detail}: {_EINVAL_HINTS[operation]}")
    return membuf_error(code, operation, detail)


# --------------------------------------------------------------------------- the device


class RealMemBufDevice(MemBufDevice):
    """``/dev/membuf`` of this VM, legacy 2020 ABI (probed on open).

    Thread-safe: :meth:`close` during an operation in another thread closes
    the device file only once that operation has returned.  ALLOC and IMPORT
    wait for the remote VM or resource manager inside the driver (up to its
    ``MEM_BUF_TIMEOUT_MS``, 3.5 s, for ALLOC): callers on an event loop should
    run them in a thread.
    """

    blocking = True

    def __init__(self, fd: OwnedFd, probe: MemBufProbe) -> None:
        """Take ownership of *fd*, which :func:`probe_device` identified as *probe*.

        Use :meth:`open`.
        """
        self._fd = fd
        self.probe = probe
        self._lock = threading.Lock()
        self._busy = 0
        self._closing = False

    @classmethod
    def open(cls, path: str = DEVICE_PATH) -> RealMemBufDevice:
        """Open the mem-buf device at *path* and probe its ABI.

        Raises:
            ENODEV: no mem-buf device at *path*.
            ENOTTY / EPROTO: the device speaks an ABI other than the legacy 2020 one.
            other: opening failed (EACCES ...), with the path.
        """
        fd = _open_device(path)
        try:
            probe = probe_device(fd.fileno(), path)
        except BaseException:
            fd.close()
            raise
        return cls(fd, probe)

    @property
    def abi(self) -> MemBufAbi:
        return self.probe.abi

    @property
    def path(self) -> str:
        return self.probe.path

    # ------------------------------------------------------------- plumbing

    @contextmanager
    def _device(self, operation: str) -> Iterator[int]:
        """The device descriptor, kept open until the block ends."""
        with self._lock:
            if self._closing:
                raise membuf_error(errno.EBADF, operation, f"the device {self.path} is closed")
            self._busy += 1
        try:
            yield self._fd.fileno()
        finally:
            with self._lock:
                self._busy -= 1
                if self._closing and not self._busy:
                    self._fd.close()

    def _call(
        self, operation: str, request: int, arg: ctypes.Structure, keepalive: tuple[object, ...], detail: str
    ) -> None:
        """Issue the ioctl.  *keepalive* holds the ctypes objects *arg* points
        at: referenced by this frame, they outlive the call."""
        with self._device(operation) as fd:
            try:
                _ioctl(fd, request, arg)
            except OSError as exc:
                raise _failure(exc, operation, detail) from exc
        del keepalive

    @staticmethod
    def _adopt(raw: int, operation: str, what: str, detail: str) -> OwnedFd:
        """Own the descriptor number the driver wrote into the argument."""
        fd = OwnedFd(raw)
        try:
            os.set_inheritable(raw, False)  # the driver asks for O_CLOEXEC; make sure
        except OSError as exc:
            fd.detach()  # not a descriptor of ours: never close it
            raise membuf_error(
                errno.EPROTO, operation, f"{detail}: the driver returned {what} {raw}, which is not open"
            ) from exc
        return fd

    # ------------------------------------------------------------- operations

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
        check_alloc(
            op, size, acl,
            src_mem_type=src_mem_type, src_heap_id=src_heap_id, dst_mem_type=dst_mem_type, dst_heap_id=dst_heap_id,
        )

        acl_list = acl_list_for((entry.vmid, entry.perms) for entry in acl)
        src_data = _type_data(src_mem_type, src_heap_id)
        dst_data = _type_data(dst_mem_type, dst_heap_id)
        arg = mem_buf_alloc_ioctl_arg(
            size=size,
            acl_list=ctypes.addressof(acl_list),
            nr_acl_entries=len(acl_list),
            src_mem_type=src_mem_type,
            src_data=ctypes.addressof(src_data),
            dst_mem_type=dst_mem_type,
            dst_data=ctypes.addressof(dst_data),
        )  # mem_buf_fd and reserved0..2 stay 0
        detail = f"{size} bytes from heap {src_heap_id} into heap {dst_heap_id}, {_describe_acl(acl)}"
        self._call(op, MEM_BUF_IOC_ALLOC, arg, (acl_list, src_data, dst_data), detail)
        return self._adopt(arg.mem_buf_fd, op, "mem_buf_fd", detail)

    def export(self, dma_buf_fd: int, acl: Sequence[AclEntry]) -> MemparcelExport:
        op = "mem-buf export"
        check_acl_count(acl, op)
        # The driver looks the dma-buf up (dma_buf_get: EBADF) before it reads
        # the entries; the contract keeps that order.  The client's descriptor
        # is only fstat'ed here and named to the kernel, which takes its own
        # reference (dma_buf_get accepts nothing but a dma-buf): the broker
        # never reopens or maps it, so it lends the client no access.
        if not 0 <= dma_buf_fd <= _INT_MAX:
            raise membuf_error(errno.EBADF, op, f"fd {dma_buf_fd} is not a descriptor")
        try:
            os.fstat(dma_buf_fd)
        except OSError as exc:
            raise membuf_error(errno.EBADF, op, f"fd {dma_buf_fd} is not open") from exc
        check_acl_entries(acl, op)

        acl_list = acl_list_for((entry.vmid, entry.perms) for entry in acl)
        arg = mem_buf_export_ioctl_arg(
            dma_buf_fd=dma_buf_fd, nr_acl_entries=len(acl_list), acl_list=ctypes.addressof(acl_list)
        )  # export_fd, memparcel_hdl and reserved0..2 stay 0
        detail = f"dma-buf fd {dma_buf_fd} to {_describe_acl(acl)}"
        self._call(op, MEM_BUF_IOC_EXPORT, arg, (acl_list,), detail)
        export_fd = self._adopt(arg.export_fd, op, "export_fd", detail)
        return MemparcelExport(export_fd=export_fd, memparcel_hdl=arg.memparcel_hdl)

    def import_memparcel(self, memparcel_hdl: int, acl: Sequence[AclEntry]) -> OwnedFd:
        op = "mem-buf import"
        if not 0 <= memparcel_hdl <= U32_MAX:
            raise membuf_error(errno.EINVAL, op, f"memparcel handle {memparcel_hdl} does not fit in a __u32")
        check_acl_count(acl, op)
        check_acl_entries(acl, op)

        acl_list = acl_list_for((entry.vmid, entry.perms) for entry in acl)
        arg = mem_buf_import_ioctl_arg(
            memparcel_hdl=memparcel_hdl, nr_acl_entries=len(acl_list), acl_list=ctypes.addressof(acl_list)
        )  # dma_buf_import_fd and reserved0..3 stay 0
        detail = f"memparcel {memparcel_hdl:#x} with {_describe_acl(acl)}"
        self._call(op, MEM_BUF_IOC_IMPORT, arg, (acl_list,), detail)
        return self._adopt(arg.dma_buf_import_fd, op, "dma_buf_import_fd", detail)

    # ------------------------------------------------------------- lifetime

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close the device file (once no operation is using it).  Descriptors
        handed out stay valid: they are files of their own."""
        with self._lock:
            self._closing = True
            if not self._busy:
                self._fd.close()

    def __repr__(self) -> str:
        return f"RealMemBufDevice({self.path!r}, {self.abi.value}{', closed' if self._closing else ''})"
