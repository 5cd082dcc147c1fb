"""``/dev/xen/gntalloc``: this domain's own pages granted to another (Linux ``drivers/xen/gntalloc.c``).

Every operation is one ioctl on the instance, with two additions the
contract asks for:

* ``alloc_gref`` refuses a count of 0 (Linux accepts it and allocates
  nothing, answering the next index);
* ``memory_spans`` asks the kernel first — it mmaps the pages once and
  unmaps them, which is where Linux reports ENOENT for pages the instance
  does not have (``gntalloc_mmap``) — and then hands out a descriptor of the
  instance itself with the pages' index as offset.  Unlike a gntdev mapping,
  gntalloc pages can be mmapped any number of times.

Security consequence of handing out a gntalloc descriptor: the pages live in
*this* instance, so a span cannot be a fresh instance as gntdev spans are.
Its holder can issue gntalloc ioctls on the instance: allocate more pages and
grant them to any domain (counted against the kernel's global gntalloc limit,
not the broker's quotas), deallocate any of the instance's pages and arm
their unmap notifications on ports of this domain.  Give each client its own
instance and let policy decide who may receive one.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from grant_broker.backend.contract import PAGE_SIZE, GntallocInstance, GrantAllocation, MemorySpan
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi import gntalloc as uapi

from ._core import U16_MAX, U32_MAX, U64_MAX, check, fits, ioctl, live, open_device

_NOTIFY_ACTIONS = uapi.UNMAP_NOTIFY_CLEAR_BYTE | uapi.UNMAP_NOTIFY_SEND_EVENT


class XenGntalloc(GntallocInstance):
    """One open ``/dev/xen/gntalloc``.

    Args:
        path: the device node.
        fd: an already open instance to adopt (tests); else *path* is opened.
    """

    def __init__(self, path: str = uapi.DEVICE_PATH, *, fd: OwnedFd | None = None) -> None:
        self.path = path
        self._fd = fd if fd is not None else open_device(path, os.O_RDWR, "gntalloc open")
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd.fileno()

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def close(self) -> None:
        """``gntalloc_release``: every page leaves the instance (notifications fire;
        pages another domain still maps stay until it unmaps them)."""
        self._fd.close()

    def _live(self, operation: str) -> int:
        return live(self._fd, operation, "gntalloc instance")

    def alloc_gref(self, domid: int, count: int, *, writable: bool = True) -> GrantAllocation:
        operation = "gntalloc alloc gref"
        with self._lock:
            fd = self._live(operation)
            check(count > 0, errno.EINVAL, operation, f"count {count}: at least one page is needed")
            check(count <= U32_MAX, errno.EINVAL, operation, f"count {count} does not fit the 32-bit field")
            check(fits(domid, U16_MAX), errno.EINVAL, operation, f"domain {domid} does not fit the 16-bit domid field")
            arg = uapi.alloc_gref_for(domid, count, writable=writable)
            ioctl(fd, uapi.IOCTL_GNTALLOC_ALLOC_GREF, arg, operation,
                  f"{count} {'writable' if writable else 'read-only'} pages for domain {domid}")
            return GrantAllocation(index=arg.index, domid=domid, writable=writable, refs=tuple(arg.gref_ids[:count]))

    def dealloc_gref(self, index: int, count: int) -> None:
        operation = "gntalloc dealloc gref"
        with self._lock:
            fd = self._live(operation)
            detail = f"no {count} allocated pages at index {index:#x}"
            check(fits(index, U64_MAX) and 0 < count <= U32_MAX, errno.EINVAL, operation, detail)
            arg = uapi.ioctl_gntalloc_dealloc_gref(index=index, count=count)
            ioctl(fd, uapi.IOCTL_GNTALLOC_DEALLOC_GREF, arg, operation, detail)

    def set_unmap_notify(self, offset: int, action: int, port: int) -> None:
        operation = "gntalloc set unmap notify"
        with self._lock:
            fd = self._live(operation)
            # gntalloc_ioctl_unmap_notify's order: the page, the action bits, the port.
            check(fits(offset, U64_MAX), errno.ENOENT, operation, f"offset {offset:#x} is in no allocated page of this instance")
            check(fits(action, U32_MAX), errno.EINVAL, operation, f"unknown action bits in {action:#x}")
            if action & uapi.UNMAP_NOTIFY_SEND_EVENT:
                check(fits(port, U32_MAX), errno.EINVAL, operation, f"event channel port {port} is out of range")
            elif not fits(port, U32_MAX):
                port = 0  # unused without SEND_EVENT
            arg = uapi.ioctl_gntalloc_unmap_notify(index=offset, action=action, event_channel_port=port)
            ioctl(fd, uapi.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, arg, operation,
                  f"offset {offset:#x}, action {action:#x}" + (f", port {port}" if action & uapi.UNMAP_NOTIFY_SEND_EVENT else ""))

    def memory_spans(self, index: int, count: int) -> list[MemorySpan]:
        operation = "gntalloc map memory"
        with self._lock:
            fd = self._live(operation)
            detail = f"no {count} allocated pages at index {index:#x}"
            check(fits(index, U64_MAX) and not index & (PAGE_SIZE - 1) and 0 < count <= U32_MAX,
                  errno.ENOENT, operation, detail)
            length = count * PAGE_SIZE
            try:
                mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=index).close()
                span = OwnedFd.dup_of(fd)
            except OSError as exc:
                raise BrokerError.from_oserror(exc, operation, detail) from None
            return [MemorySpan(span, index, length, True)]

    def __repr__(self) -> str:
        return f"<XenGntalloc {'closed' if self._fd.closed else f'fd={self._fd.fileno()}'}>"
