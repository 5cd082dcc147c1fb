"""What the three Xen device modules share: opening a device, calling an
ioctl so that a failure is a :class:`~grant_broker_protocol.errors.BrokerError`, and
refusing values the C structs cannot hold.

Like libxengnttab's private ``osdep`` header, this is the only thing
:mod:`.gntdev`, :mod:`.gntalloc` and :mod:`.evtchn` have in common; each of
them then speaks to one device.

Why ranges are checked here and not left to the kernel: ctypes integer
fields silently truncate (``c_uint16`` takes 0x10000 as 0), and several
kernel structs narrow on their own (``ioctl_evtchn_bind_interdomain`` carries
an ``unsigned int`` domain that Xen reads as a 16-bit ``domid_t``).  A domain
65536 would quietly become domain 0 — so values are refused before any
struct is built, with the errno the contract gives for them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
DOMID_FIRST_RESERVED = 0x7FF0  # xen/include/public/xen.h
DOMID_SELF = 0x7FF0


def open_device(path: str, flags: int, operation: str) -> OwnedFd:
    """``open(path, flags | O_CLOEXEC)``; ENOENT/ENXIO/ENODEV mean "no such device"."""
    try:
        return OwnedFd(os.open(path, flags | os.O_CLOEXEC))
    except OSError as exc:
        raise BrokerError.from_oserror(exc, operation, f"cannot open {path}") from None


def ioctl(fd: int, request: int, arg: ctypes.Structure | int, operation: str, detail: str = "") -> int:
    """``ioctl(fd, request, arg)`` and its return value.

    *arg* is a mutable buffer (a ctypes struct): the kernel reads it and
    writes its results back into it, and the call returns the ioctl's own
    return value (the port number of the evtchn binds).  An int *arg* is
    passed as the ioctl's integer argument.
    """
    try:
        # A mutable buffer gives the ioctl's int return value (mutate_flag is
        # True); typeshed cannot tell it from a read-only one and says Any.
        result: int = fcntl.ioctl(fd, request, arg)
        return result
    except OSError as exc:
        raise BrokerError(exc.errno or errno.EIO, operation, detail) from None


def live(fd: OwnedFd, operation: str, what: str) -> int:
    """The descriptor of an instance, or EBADF once it is closed."""
    if fd.closed:
        raise BrokerError(errno.EBADF, operation, f"the {what} is closed")
    return fd.fileno()


def check(ok: bool, code: int, operation: str, detail: str) -> None:
    if not ok:
        raise BrokerError(code, operation, detail)


def fits(value: int, maximum: int) -> bool:
    return 0 <= value <= maximum


@contextmanager
def suppressing(*codes: int) -> Iterator[None]:
    """Ignore a BrokerError with one of *codes* (cleanup of what may already be gone)."""
    try:
        yield
    except BrokerError as exc:
        if exc.errno not in codes:
            raise
