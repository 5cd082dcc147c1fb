"""``/dev/xen/evtchn``: event channels of this domain (Linux ``drivers/xen/evtchn.c``).

The descriptor is opened ``O_NONBLOCK``: :meth:`XenEvtchn.read_pending` reads
what fired without ever blocking (``EAGAIN`` means nothing did), and the
event loop watches :meth:`XenEvtchn.fileno` for readability.  ``read(2)``
gives fired ports as native ``uint32`` values (at most a page per call, the
count rounded down to whole ports); a fired port stays masked until its
number is written back (:meth:`XenEvtchn.unmask`), so notifications
coalesce.  One handle must not be shared between processes or threads
(``xenevtchn.h``): fan-out to many clients is the broker's job.

The ioctls carry domains as ``unsigned int`` that Xen narrows to a 16-bit
``domid_t``; values that do not fit are refused here (EINVAL) instead of
being bound to the wrong domain.

The domain id trick (:func:`is_own_domid`): a port offered to domain *d*
(``BIND_UNBOUND_PORT``) can be bound from ``DOMID_SELF`` only if *d* is the
calling domain (Xen's ``evtchn_bind_interdomain`` checks
``remote_domid == ld->domain_id``) — an exact test of a candidate domid that
needs neither xenstore nor a toolstack.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading

from grant_broker.backend.contract import PAGE_SIZE, EvtchnHandle
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi import evtchn as uapi

from ._core import DOMID_FIRST_RESERVED, DOMID_SELF, U16_MAX, U32_MAX, check, fits, ioctl, live, open_device

_PORT = struct.Struct("=I")  # evtchn_port_t in native byte order, as read(2)/write(2) carry it


class XenEvtchn(EvtchnHandle):
    """One open ``/dev/xen/evtchn``.

    Args:
        path: the device node.
        fd: an already open, non-blocking descriptor to adopt (tests); else
            *path* is opened ``O_RDWR | O_NONBLOCK | O_CLOEXEC``.
    """

    def __init__(self, path: str = uapi.DEVICE_PATH, *, fd: OwnedFd | None = None) -> None:
        self.path = path
        self._fd = fd if fd is not None else open_device(path, os.O_RDWR | os.O_NONBLOCK, "evtchn open")
        self._restricted = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd.fileno()

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def close(self) -> None:
        """Close this descriptor; the kernel unbinds the ports when the last copy goes."""
        self._fd.close()

    def _live(self, operation: str) -> int:
        return live(self._fd, f"evtchn {operation}", "event channel handle")

    def _call(self, operation: str, request: int, arg: ctypes.Structure | int, detail: str) -> int:
        return ioctl(self._live(operation), request, arg, f"evtchn {operation}", detail)

    # ------------------------------------------------------------------ binding

    def bind_unbound_port(self, remote_domain: int) -> int:
        op = "bind unbound port"
        check(fits(remote_domain, U16_MAX), errno.EINVAL, f"evtchn {op}", f"domain {remote_domain} is not a domid_t (0..{U16_MAX})")
        arg = uapi.ioctl_evtchn_bind_unbound_port(remote_domain=remote_domain)
        return self._call(op, uapi.IOCTL_EVTCHN_BIND_UNBOUND_PORT, arg, f"a port for domain {remote_domain}")

    def bind_interdomain(self, remote_domain: int, remote_port: int) -> int:
        op = "bind interdomain"
        check(fits(remote_domain, U16_MAX), errno.EINVAL, f"evtchn {op}", f"domain {remote_domain} is not a domid_t (0..{U16_MAX})")
        check(fits(remote_port, U32_MAX), errno.EINVAL, f"evtchn {op}", f"port {remote_port} does not fit in an unsigned int")
        arg = uapi.ioctl_evtchn_bind_interdomain(remote_domain=remote_domain, remote_port=remote_port)
        return self._call(op, uapi.IOCTL_EVTCHN_BIND_INTERDOMAIN, arg, f"port {remote_port} of domain {remote_domain}")

    def bind_virq(self, virq: int) -> int:
        op = "bind virq"
        check(fits(virq, U32_MAX), errno.EINVAL, f"evtchn {op}", f"VIRQ {virq} does not fit in an unsigned int")
        arg = uapi.ioctl_evtchn_bind_virq(virq=virq)
        return self._call(op, uapi.IOCTL_EVTCHN_BIND_VIRQ, arg, f"VIRQ {virq}")

    def unbind(self, port: int) -> None:
        op = "unbind"
        check(fits(port, U32_MAX), errno.EINVAL, f"evtchn {op}", f"port {port} does not fit in an unsigned int")
        self._call(op, uapi.IOCTL_EVTCHN_UNBIND, uapi.ioctl_evtchn_unbind(port=port), f"port {port}")

    def notify(self, port: int) -> None:
        op = "notify"
        check(fits(port, U32_MAX), errno.EINVAL, f"evtchn {op}", f"port {port} does not fit in an unsigned int")
        self._call(op, uapi.IOCTL_EVTCHN_NOTIFY, uapi.ioctl_evtchn_notify(port=port), f"port {port}")

    # ------------------------------------------------------------------ delivery

    def read_pending(self, max_ports: int = 256) -> list[int]:
        fd = self._live("read")
        if max_ports <= 0:
            return []
        want = min(max_ports * _PORT.size, PAGE_SIZE)
        try:
            data = os.read(fd, want)
        except BlockingIOError:
            return []
        except OSError as exc:
            # EFBIG: the ring overflowed (evtchn_read), until reset.
            raise BrokerError.from_oserror(exc, "evtchn read", "the event ring overflowed; reset the handle"
                                           if exc.errno == errno.EFBIG else "") from None
        return [port for (port,) in _PORT.iter_unpack(data[: len(data) - len(data) % _PORT.size])]

    def unmask(self, port: int) -> None:
        fd = self._live("unmask")
        check(fits(port, U32_MAX), errno.EINVAL, "evtchn unmask", f"port {port} does not fit in an unsigned int")
        try:
            os.write(fd, _PORT.pack(port))  # evtchn_write skips ports not ours or not masked
        except OSError as exc:
            raise BrokerError.from_oserror(exc, "evtchn unmask", f"port {port}") from None

    def restrict_domid(self, domid: int) -> None:
        op = "restrict domid"
        with self._lock:
            if self._restricted:
                # The kernel's first check; kept here for values that cannot reach it.
                raise BrokerError(errno.EACCES, f"evtchn {op}", "the handle is already restricted")
            check(0 < domid < DOMID_FIRST_RESERVED, errno.EINVAL, f"evtchn {op}",
                  f"domain {domid} cannot be a restriction (0 and >= DOMID_FIRST_RESERVED refused)")
            arg = uapi.ioctl_evtchn_restrict_domid(domid=domid)
            self._call(op, uapi.IOCTL_EVTCHN_RESTRICT_DOMID, arg, f"domain {domid}")
            self._restricted = True

    def reset(self) -> None:
        self._call("reset", uapi.IOCTL_EVTCHN_RESET, 0, "")

    def __repr__(self) -> str:
        return f"<XenEvtchn {'closed' if self._fd.closed else f'fd={self._fd.fileno()}'}>"


def is_own_domid(handle: XenEvtchn, candidate: int) -> bool:
    """Whether *candidate* is the domain *handle* belongs to (see the module docstring).

    Leaves nothing bound.  The loopback channel a match creates fires once on
    *handle*; use a handle of its own and close it afterwards.
    """
    offered = handle.bind_unbound_port(candidate)
    try:
        bound = handle.bind_interdomain(DOMID_SELF, offered)
    except BrokerError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        handle.unbind(offered)
    handle.unbind(bound)
    return True
