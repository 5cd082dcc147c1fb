"""Mirror of the Linux uapi header include/uapi/xen/gntalloc.h (/dev/xen/gntalloc).

gntalloc is the granting side: it allocates local pages, grants them to a
domain and hands back an mmap offset plus one grant ref per page.  Its
ioctls share gntdev's magic ``'G'`` with distinct numbers (5, 6, 7).
"""

from __future__ import annotations

import ctypes

from .ioctl import _IOC, _IOC_NONE, flexible

DEVICE_PATH = "/dev/xen/gntalloc"

_GNTALLOC_MAGIC = "G"


class ioctl_gntalloc_alloc_gref(ctypes.Structure):
    """include/uapi/xen/gntalloc.h: struct ioctl_gntalloc_alloc_gref.

    Asks for ``count`` fresh pages granted to ``domid`` (writable when
    ``flags`` has GNTALLOC_FLAG_WRITABLE).  The kernel returns the mmap
    offset in ``index`` and one ref per page in ``gref_ids``, which really
    holds ``count`` entries: build it with :func:`alloc_gref_for`.
    """

    _fields_ = [
        ("domid", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("index", ctypes.c_uint64),
        ("gref_ids", ctypes.c_uint32 * 1),
    ]


IOCTL_GNTALLOC_ALLOC_GREF = _IOC(_IOC_NONE, _GNTALLOC_MAGIC, 5, ioctl_gntalloc_alloc_gref)

# ioctl_gntalloc_alloc_gref.flags: the grantee may write, not only read
# (a value clients send, defined in the protocol's abi).
from grant_broker_protocol.abi import GNTALLOC_FLAG_WRITABLE as GNTALLOC_FLAG_WRITABLE  # noqa: E402


class ioctl_gntalloc_dealloc_gref(ctypes.Structure):
    """include/uapi/xen/gntalloc.h: struct ioctl_gntalloc_dealloc_gref.

    Gives back ``count`` grants starting at mmap offset ``index``; pages stay
    alive until both our mapping and the grantee's are gone.
    """

    _fields_ = [
        ("index", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
    ]


IOCTL_GNTALLOC_DEALLOC_GREF = _IOC(_IOC_NONE, _GNTALLOC_MAGIC, 6, ioctl_gntalloc_dealloc_gref)


class ioctl_gntalloc_unmap_notify(ctypes.Structure):
    """include/uapi/xen/gntalloc.h: struct ioctl_gntalloc_unmap_notify.

    Same shape and meaning as gntdev's: on teardown clear the byte at
    ``index`` and/or signal ``event_channel_port`` per ``action``.
    """

    _fields_ = [
        ("index", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("event_channel_port", ctypes.c_uint32),
    ]


IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = _IOC(_IOC_NONE, _GNTALLOC_MAGIC, 7, ioctl_gntalloc_unmap_notify)

# Both gntalloc.h and gntdev.h define these, with the same values.
from grant_broker_protocol.abi import UNMAP_NOTIFY_CLEAR_BYTE as UNMAP_NOTIFY_CLEAR_BYTE  # noqa: E402
from grant_broker_protocol.abi import UNMAP_NOTIFY_SEND_EVENT as UNMAP_NOTIFY_SEND_EVENT  # noqa: E402


def alloc_gref_type(count: int) -> type[ctypes.Structure]:
    """The ioctl_gntalloc_alloc_gref layout with room for ``count`` grant refs."""
    return flexible(ioctl_gntalloc_alloc_gref, count)


def alloc_gref_for(domid: int, count: int, *, writable: bool = True) -> ctypes.Structure:
    """A ready ALLOC_GREF argument: ``domid``, ``count`` and flags set, ``gref_ids`` sized for ``count``.

    Size is ``sizeof(ioctl_gntalloc_alloc_gref) + (count - 1) * 4``; the ioctl
    number keeps the one-element size.

    Raises:
        ValueError: negative ``count``.
    """
    arg = alloc_gref_type(count)()
    arg.domid = domid
    arg.count = count
    arg.flags = GNTALLOC_FLAG_WRITABLE if writable else 0
    return arg
