"""The Xen backend: the broker's own domain, its devices and what they can do.

:meth:`XenBackend.open` finds the domain id and probes the capabilities (both
cached for the process: the kernel does not change under it) and opens no
device it keeps; each ``open_*`` then opens a fresh device file.

The domain id.  Linux publishes it nowhere outside xenstore: ``/sys/hypervisor``
has ``type``, ``uuid``, ``guest_type``, ``properties/*``, ``version/*`` and
``compilation/*`` but no domid (checked on Xen 4.17 + Linux 6.1), and
xenstore's ``domid`` needs a running xenstored.  So:

1. ``/proc/xen/capabilities`` saying ``control_d`` (the initial domain) gives
   the candidate 0;
2. each candidate is *verified* with the event-channel test of
   :func:`.evtchn.is_own_domid` (a port offered to the candidate can be bound
   from ``DOMID_SELF`` only if the candidate is us);
3. failing that (a guest, or a hardware domain that is not 0), candidates are
   tried upwards from 0 with the same test — three hypercalls each, so a
   guest's id is found in well under a second natively.

Capabilities are probed on a throw-away gntdev instance:

* ``dmabuf``: ``IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED`` for an fd never
  exported: ENOTTY means the kernel lacks ``CONFIG_XEN_GNTDEV_DMABUF``
  (Debian's does), anything else (ENOENT) that it has it;
* ``dmabuf_import``: the ioctls exist (import works in any kind of domain);
* ``dmabuf_export``: the ioctls exist and the domain is not PV
  (``/sys/hypervisor/guest_type``).  Linux's gntdev refuses export in a PV
  domain by design (``use_ptemode``: EINVAL, whatever the arguments), and an
  export probe would need a real grant to tell, so the guest type decides.
  Each direction that is unavailable carries its reason
  (``dmabuf_export_missing`` / ``dmabuf_import_missing``), also as a note;
* ``set_max_grants``: ``IOCTL_GNTDEV_SET_MAX_GRANTS`` (ENOTTY on current
  Linux; the broker's own limits apply either way);
* ``grant_copy``: ``IOCTL_GNTDEV_GRANT_COPY`` of no segments (Linux >= 4.8);
* ``gntalloc`` / ``evtchn``: the device node can be opened read-write;
* ``membuf_abi``: only when ``/dev/membuf`` exists, and then as
  :mod:`grant_broker.backend.membuf` identifies it (imported lazily: a build
  without it reports no mem-buf).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from grant_broker.backend.contract import Backend, Capabilities, MemBufAbi, MemBufDevice
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi import evtchn as evtchn_uapi
from grant_broker.uapi import gntalloc as gntalloc_uapi
from grant_broker.uapi import gntdev as gntdev_uapi
from grant_broker.uapi.mem_buf import DEVICE_PATH as MEMBUF_PATH
from grant_broker.uapi.mem_buf import MEM_BUF_VMID_PRIMARY_VM

from ._core import DOMID_FIRST_RESERVED, ioctl
from .evtchn import XenEvtchn, is_own_domid
from .gntalloc import XenGntalloc
from .gntdev import XenGntdev

log = logging.getLogger(__name__)

_Instance = TypeVar("_Instance", XenGntdev, XenGntalloc, XenEvtchn)

# What the SET_MAX_GRANTS probe asks for, should the ioctl exist: Linux's old
# default per-instance limit, harmless on the throw-away instance.
_PROBE_MAX_GRANTS = 1024


@dataclass(frozen=True)
class XenDevices:
    """Where the devices are (tests point these elsewhere)."""

    gntdev: str = gntdev_uapi.DEVICE_PATH
    gntalloc: str = gntalloc_uapi.DEVICE_PATH
    evtchn: str = evtchn_uapi.DEVICE_PATH
    membuf: str = MEMBUF_PATH
    xen_capabilities: str = "/proc/xen/capabilities"
    guest_type: str = "/sys/hypervisor/guest_type"


@dataclass(frozen=True)
class DomainId:
    """The broker's domain and how it was learnt."""

    domid: int
    how: str


# --------------------------------------------------------------------------- domain id


def _initial_domain(path: str) -> bool:
    try:
        with open(path, encoding="ascii", errors="replace") as caps:
            return "control_d" in caps.read().split()
    except OSError:
        return False


def discover_domid(devices: XenDevices = XenDevices(), *, scan_limit: int = DOMID_FIRST_RESERVED) -> DomainId:
    """The domain the devices act as (see the module docstring).

    Raises:
        BrokerError: the event-channel device cannot be used, or no candidate
            below *scan_limit* is this domain (ESRCH).
    """
    operation = "discover the domain id"
    with XenEvtchn(devices.evtchn) as handle:
        first = 0
        if _initial_domain(devices.xen_capabilities):
            if is_own_domid(handle, 0):
                return DomainId(0, f"{devices.xen_capabilities} says control_d; verified by an event-channel loopback")
            log.warning("%s says control_d but this domain is not 0; scanning", devices.xen_capabilities)
            first = 1
        for candidate in range(first, scan_limit):
            if is_own_domid(handle, candidate):
                return DomainId(candidate, "found by event-channel loopback tests of candidate domids")
    raise BrokerError(errno.ESRCH, operation, f"no domain id below {scan_limit:#x} passed the event-channel test")


@functools.lru_cache(maxsize=8)
def _cached_domid(devices: XenDevices) -> DomainId:
    return discover_domid(devices)


# --------------------------------------------------------------------------- capabilities


def _answers_enotty(call: Callable[[], Any]) -> bool:
    """Whether *call* fails with ENOTTY (the kernel lacks the ioctl); other
    errors mean the ioctl exists and judged the argument."""
    try:
        call()
    except BrokerError as exc:
        return exc.errno == errno.ENOTTY
    return False


def _usable(path: str) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


def _membuf_abi(path: str, notes: list[str]) -> MemBufAbi | None:
    if not os.path.exists(path):
        return None
    try:
        from grant_broker.backend import membuf
    except ImportError:
        notes.append(f"{path} exists but this build has no mem-buf backend")
        return None
    try:
        abi: MemBufAbi = membuf.probe_abi(path)
    except BrokerError as exc:
        notes.append(f"{path}: {exc}")
        return None
    return abi


# Why a dma-buf direction is unavailable, as Capabilities and the notes say it.
DMABUF_NO_KERNEL_SUPPORT = (
    "no kernel support: the gntdev dma-buf ioctls answer ENOTTY "
    "(kernel built without CONFIG_XEN_GNTDEV_DMABUF, as Debian's is)"
)
DMABUF_EXPORT_REFUSED_IN_PV = (
    "refused in a PV domain by design: Linux's gntdev maps grants through page tables there "
    "(use_ptemode) and cannot hand them out as a dma-buf; export needs a PVH or HVM domain"
)


def _guest_type(path: str) -> str | None:
    """``PV``, ``PVH`` or ``HVM`` as Linux reports it, or None when unknown."""
    try:
        with open(path, encoding="ascii", errors="replace") as source:
            return source.read().strip() or None
    except OSError:
        return None


def _dmabuf_support(has_ioctls: bool, guest_type: str | None) -> tuple[str, str]:
    """(export_missing, import_missing): why each direction is unavailable, "" when it is not."""
    if not has_ioctls:
        return DMABUF_NO_KERNEL_SUPPORT, DMABUF_NO_KERNEL_SUPPORT
    if guest_type == "PV":
        return DMABUF_EXPORT_REFUSED_IN_PV, ""
    return "", ""


def probe_capabilities(devices: XenDevices = XenDevices()) -> Capabilities:
    """Ask the kernel what it supports (see the module docstring)."""
    notes: list[str] = [
        "gntdev spans are fresh gntdev instances, one per map_memory (offset 0; O_RDONLY when read-only): "
        "their holder can map any grant offered to this domain",
        "gntalloc spans are the gntalloc instance itself: their holder can allocate, deallocate and arm notifications on it",
    ]
    with XenGntdev(devices.gntdev) as probe:
        fd = probe.fileno()
        no_dmabuf = _answers_enotty(lambda: ioctl(
            fd, gntdev_uapi.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED,
            gntdev_uapi.ioctl_gntdev_dmabuf_exp_wait_released(fd=0xFFFF_FFFF, wait_to_ms=0), "probe dma-buf"))
        no_max_grants = _answers_enotty(lambda: ioctl(
            fd, gntdev_uapi.IOCTL_GNTDEV_SET_MAX_GRANTS,
            gntdev_uapi.ioctl_gntdev_set_max_grants(count=_PROBE_MAX_GRANTS), "probe set max grants"))
        no_copy = _answers_enotty(lambda: ioctl(
            fd, gntdev_uapi.IOCTL_GNTDEV_GRANT_COPY, gntdev_uapi.ioctl_gntdev_grant_copy(count=0), "probe grant copy"))
    export_missing, import_missing = _dmabuf_support(not no_dmabuf, _guest_type(devices.guest_type))
    if export_missing and export_missing == import_missing:
        notes.append(f"dma-buf export and import unavailable: {export_missing}")
    else:
        if export_missing:
            notes.append(f"dma-buf export unavailable: {export_missing}")
        if import_missing:
            notes.append(f"dma-buf import unavailable: {import_missing}")
    if no_max_grants:
        notes.append("SET_MAX_GRANTS answers ENOTTY (current Linux); the broker's own limits apply")
    membuf_abi = _membuf_abi(devices.membuf, notes)
    return Capabilities(
        backend="xen",
        gntdev=True,
        gntalloc=_usable(devices.gntalloc),
        evtchn=_usable(devices.evtchn),
        grant_copy=not no_copy,
        dmabuf=not no_dmabuf,
        dmabuf_export=not export_missing,
        dmabuf_import=not import_missing,
        set_max_grants=not no_max_grants,
        membuf_abi=membuf_abi,
        any_domain=False,
        notes=tuple(notes),
        dmabuf_export_missing=export_missing,
        dmabuf_import_missing=import_missing,
    )


@functools.lru_cache(maxsize=8)
def _cached_capabilities(devices: XenDevices) -> Capabilities:
    return probe_capabilities(devices)


def forget_probes() -> None:
    """Drop the cached domain id and capabilities (tests, or after a module reload)."""
    _cached_domid.cache_clear()
    _cached_capabilities.cache_clear()


# --------------------------------------------------------------------------- backend


class XenBackend(Backend):
    """The Xen devices of the domain the broker runs in."""

    name = "xen"

    def __init__(self, *, domid: DomainId, capabilities: Capabilities, devices: XenDevices = XenDevices()) -> None:
        self.domid = domid.domid
        self.domid_source = domid.how
        self.vmid = MEM_BUF_VMID_PRIMARY_VM
        self.devices = devices
        self._capabilities = dataclasses.replace(
            capabilities, notes=(f"domain id {domid.domid}: {domid.how}", *capabilities.notes)
        )
        self._opened: list[Any] = []
        self._closed = False

    @classmethod
    def open(cls, devices: XenDevices = XenDevices()) -> XenBackend:
        """Discover the domain and probe the capabilities (once per process).

        Raises:
            BrokerError: ENOENT / ENODEV when there is no gntdev device, or the
                errno of the first probe that failed.
        """
        if not os.path.exists(devices.gntdev):
            raise BrokerError(errno.ENODEV, "open the Xen backend", f"no {devices.gntdev} on this host")
        return cls(domid=_cached_domid(devices), capabilities=_cached_capabilities(devices), devices=devices)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def closed(self) -> bool:
        return self._closed

    def _open(self, what: str, factory: Callable[[], _Instance]) -> _Instance:
        if self._closed:
            raise BrokerError(errno.EBADF, f"open {what}", f"the Xen backend of domain {self.domid} is closed")
        instance = factory()
        self._opened = [i for i in self._opened if not i.closed]
        self._opened.append(instance)
        return instance

    def open_gntdev(self) -> XenGntdev:
        return self._open("gntdev", lambda: XenGntdev(self.devices.gntdev))

    def open_gntalloc(self) -> XenGntalloc:
        return self._open("gntalloc", lambda: XenGntalloc(self.devices.gntalloc))

    def open_evtchn(self) -> XenEvtchn:
        return self._open("evtchn", lambda: XenEvtchn(self.devices.evtchn))

    def open_membuf(self) -> MemBufDevice:
        operation = "open membuf"
        if self._closed:
            raise BrokerError(errno.EBADF, operation, f"the Xen backend of domain {self.domid} is closed")
        if self._capabilities.membuf_abi is None:
            raise BrokerError(errno.ENODEV, operation, f"no usable mem-buf device at {self.devices.membuf}")
        from grant_broker.backend import membuf

        device: MemBufDevice = membuf.RealMemBufDevice.open(self.devices.membuf)
        self._opened = [i for i in self._opened if not getattr(i, "closed", False)]
        self._opened.append(device)
        return device

    def close(self) -> None:
        """Close every instance opened through this backend that is still open."""
        self._closed = True
        opened, self._opened = self._opened, []
        for instance in opened:
            instance.close()

    def __repr__(self) -> str:
        return f"<XenBackend domain {self.domid}{' closed' if self._closed else ''}>"

