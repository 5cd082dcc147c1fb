"""Mirror of the Linux uapi header include/uapi/xen/evtchn.h (/dev/xen/evtchn).

Each bound port is delivered by read() of the device as a 32-bit port number;
a fired port stays masked until its number is written back.  The ioctls bind,
unbind and notify ports; all use magic ``'E'`` and ``_IOC_NONE``.
"""

from __future__ import annotations

import ctypes

from .grant_table import domid_t
from .ioctl import _IOC, _IOC_NONE

DEVICE_PATH = "/dev/xen/evtchn"

_EVTCHN_MAGIC = "E"

evtchn_port_t = ctypes.c_uint32
"""The unit read() returns and write() accepts: one port number."""


class ioctl_evtchn_bind_virq(ctypes.Structure):
    """include/uapi/xen/evtchn.h: struct ioctl_evtchn_bind_virq.

    Binds a virtual IRQ; the ioctl's return value is the local port.
    """

    _fields_ = [
        ("virq", ctypes.c_uint),
    ]


IOCTL_EVTCHN_BIND_VIRQ = _IOC(_IOC_NONE, _EVTCHN_MAGIC, 0, ioctl_evtchn_bind_virq)


class ioctl_evtchn_bind_interdomain(ctypes.Structure):
    """include/uapi/xen/evtchn.h: struct ioctl_evtchn_bind_interdomain.

    Connects to a port another domain left unbound for us; returns our port.
    """

    _fields_ = [
        ("remote_domain", ctypes.c_uint),
        ("remote_port", ctypes.c_uint),
    ]


IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(_IOC_NONE, _EVTCHN_MAGIC, 1, ioctl_evtchn_bind_interdomain)


class ioctl_evtchn_bind_unbound_port(ctypes.Structure):
    """include/uapi/xen/evtchn.h: struct ioctl_evtchn_bind_unbound_port.

    Allocates a port that ``remote_domain`` may later bind to; returns it.
    """

    _fields_ = [
        ("remote_domain", ctypes.c_uint),
    ]


IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(_IOC_NONE, _EVTCHN_MAGIC, 2, ioctl_evtchn_bind_unbound_port)


class ioctl_evtchn_unbind(ctypes.Structure):
    """include/uapi/xen/evtchn.h: struct ioctl_evtchn_unbind.

    Closes a port bound through this fd.
    """

    _fields_ = [
        ("port", ctypes.c_uint),
    ]


IOCTL_EVTCHN_UNBIND = _IOC(_IOC_NONE, _EVTCHN_MAGIC, 3, ioctl_evtchn_unbind)


class ioctl_evtchn_notify(ctypes.Structure):
    """include/uapi/xen/evtchn.h: struct ioctl_evtchn_notify.

    Signals the remote end of a port bound through this fd.
    """

    _fields_ = [
        ("port", ctypes.c_uint),
    ]


IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, _EVTCHN_MAGIC, 4, ioctl_evtchn_notify)

# Clears the fd's pending-event ring; the header encodes a size of 0.
IOCTL_EVTCHN_RESET = _IOC(_IOC_NONE, _EVTCHN_MAGIC, 5, 0)


class ioctl_evtchn_restrict_domid(ctypes.Structure):
    """include/uapi/xen/evtchn.h: struct ioctl_evtchn_restrict_domid.

    Confines this fd to interdomain bindings with one domain; irreversible.
    """

    _fields_ = [
        ("domid", domid_t),
    ]


IOCTL_EVTCHN_RESTRICT_DOMID = _IOC(_IOC_NONE, _EVTCHN_MAGIC, 6, ioctl_evtchn_restrict_domid)
