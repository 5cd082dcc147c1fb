"""The backend conformance suite's fixtures.

The tests in this folder use only ``grant_broker.backend.contract``; which
implementation they run against is chosen here, by the environment variable
``GRANT_BROKER_TEST_BACKEND`` (``emulated``, the default, or ``xen``).

Two domains take part: ``domains.local`` (the domain under test: it maps,
binds, copies) and ``domains.peer`` (the other side: it grants, binds unbound
ports).  On a real Xen host both are the broker's own domain (dom0 granting to
itself works), so tests must not assume the two domids differ.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from grant_broker.backend.contract import Backend

BACKEND_KIND = os.environ.get("GRANT_BROKER_TEST_BACKEND", "emulated")

# No Xen host has a domain this high (DOMID_FIRST_RESERVED is 0x7FF0).
UNKNOWN_DOMID = 0x7FEF


@dataclass
class Domains:
    local: Backend
    peer: Backend
    unknown_domid: int = UNKNOWN_DOMID


@pytest.fixture
async def domains(fd_baseline: None) -> AsyncIterator[Domains]:
    """The two domains of a test; everything they hold is released afterwards,
    and the test fails if any descriptor stays open."""
    if BACKEND_KIND == "emulated":
        from grant_broker.backend.emulated import EmulatedHypervisor
        from grant_broker.uapi.mem_buf import MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM

        with EmulatedHypervisor() as hypervisor:
            local = hypervisor.backend(1, vmid=MEM_BUF_VMID_PRIMARY_VM)
            peer = hypervisor.backend(2, vmid=MEM_BUF_VMID_TRUSTED_VM)
            with local, peer:
                yield Domains(local, peer)
    elif BACKEND_KIND == "xen":
        if not os.path.exists("/dev/xen/gntdev"):
            pytest.skip("GRANT_BROKER_TEST_BACKEND=xen but this host has no /dev/xen/gntdev")
        from grant_broker.backend.xen import XenBackend

        with XenBackend.open() as local, XenBackend.open() as peer:
            yield Domains(local, peer)
    else:
        raise pytest.UsageError(f"GRANT_BROKER_TEST_BACKEND={BACKEND_KIND!r}: expected 'emulated' or 'xen'")
