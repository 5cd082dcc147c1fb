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
XEN_GNTALLOC_LIMIT = "/sys/module/xen_gntalloc/parameters/limit"
"""Linux gntalloc's ``limit`` module parameter: the pages of every gntalloc user of this domain."""


@dataclass
class BackendChoice:
    """The chosen backend: a provider of per-session backends, what it can do, and its release."""

    provider: BackendProvider
    capabilities: Capabilities
    close: Callable[[], None]
    # A domain's gntalloc pool, as far as the backend can tell: (pages in use
    # by every user of the pool, its limit), each None if unknown (the metrics).
    gntalloc_pool: Callable[[int], tuple[int | None, int | None]] | None = None


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

    def xen_pool(domid: int) -> tuple[int | None, int | None]:
        # The kernel tells the limit, not how much of it its users hold.
        try:
            with open(XEN_GNTALLOC_LIMIT) as parameter:
                return None, int(parameter.read())
        except (OSError, ValueError):
            return None, None

    return BackendChoice(BackendProvider(xen_backend, any_domain=False), capabilities, lambda: None, xen_pool)


def _emulated() -> BackendChoice:
    from grant_broker.backend.emulated import EmulatedHypervisor

    hypervisor = EmulatedHypervisor()

    def emulated_backend(domid: int | None, vmid: int | None) -> Backend:
        return hypervisor.backend(0 if domid is None else domid, vmid=MEM_BUF_VMID_PRIMARY_VM if vmid is None else vmid)

    probe = hypervisor.backend(0)
    capabilities = probe.capabilities
    probe.close()
    def emulated_pool(domid: int) -> tuple[int | None, int | None]:
        return hypervisor.gntalloc_pages(domid), hypervisor.gntalloc_limit

    return BackendChoice(BackendProvider(emulated_backend, any_domain=True), capabilities, hypervisor.close, emulated_pool)
