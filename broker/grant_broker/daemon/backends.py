"""Which backend serves the sessions: the real devices when present, else the emulated hypervisor."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from grant_broker.backend.contract import Backend, Capabilities
from grant_broker.core.registry import BackendProvider
from grant_broker_protocol.abi import MEM_BUF_VMID_PRIMARY_VM
from grant_broker_protocol.errors import BrokerError

BACKEND_CHOICES = ("auto", "emulated", "xen")
XEN_PROBE_DEVICE = "/dev/xen/gntdev"


@dataclass
class BackendChoice:
    """The chosen backend: a provider of per-session backends, what it can do, and its release."""

    provider: BackendProvider
    capabilities: Capabilities
    close: Callable[[], None]


def choose_backend(kind: str) -> BackendChoice:
    """``xen``: the real devices; ``emulated``: the emulated hypervisor;
    ``auto``: the real devices when ``/dev/xen/gntdev`` exists, else emulated."""
    if kind not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(BACKEND_CHOICES)}")
    if kind == "xen" or (kind == "auto" and os.path.exists(XEN_PROBE_DEVICE)):
        return _xen()
    return _emulated()


def _xen() -> BackendChoice:
    from grant_broker.backend.xen import XenBackend

    probe = XenBackend.open()
    capabilities = probe.capabilities
    probe.close()

    def xen_backend(domid: int | None, vmid: int | None) -> Backend:
        backend = XenBackend.open()
        if domid is not None and domid != backend.domid:
            backend.close()
            raise BrokerError(
                errno.EPERM,
                "open session",
                f"this host's broker runs in domain {backend.domid}; a session cannot act as domain {domid}",
            )
        return backend

    return BackendChoice(BackendProvider(xen_backend, any_domain=False), capabilities, lambda: None)


def _emulated() -> BackendChoice:
    from grant_broker.backend.emulated import EmulatedHypervisor

    hypervisor = EmulatedHypervisor()

    def emulated_backend(domid: int | None, vmid: int | None) -> Backend:
        return hypervisor.backend(0 if domid is None else domid, vmid=MEM_BUF_VMID_PRIMARY_VM if vmid is None else vmid)

    probe = hypervisor.backend(0)
    capabilities = probe.capabilities
    probe.close()
    return BackendChoice(BackendProvider(emulated_backend, any_domain=True), capabilities, hypervisor.close)
