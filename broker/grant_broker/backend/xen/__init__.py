"""The real Xen devices of the domain the broker runs in.

Like Xen's own libraries (a core plus one file per OS), one module per
device, each over its uapi mirror in :mod:`grant_broker.uapi`:

* :mod:`.gntdev` — ``/dev/xen/gntdev``: mapping grants, grant copy, unmap
  notifications, dma-buf; spans are fresh gntdev instances (read its
  docstring for the security consequence of handing one to a client);
* :mod:`.gntalloc` — ``/dev/xen/gntalloc``: granting this domain's pages;
* :mod:`.evtchn` — ``/dev/xen/evtchn``: event channels;
* :mod:`.backend` — :class:`XenBackend`: the domain id, the probed
  capabilities, and the ``open_*`` factories;
* :mod:`._core` — what the three share: device opening, ioctls failing as
  :class:`~grant_broker_protocol.errors.BrokerError`, range checks.

Proven against real Xen 4.17 (PV dom0, Linux 6.1) by the conformance suite:
``tests/xen/ci-suite``.
"""

from .backend import DomainId, XenBackend, XenDevices, discover_domid, forget_probes, probe_capabilities
from .evtchn import XenEvtchn
from .gntalloc import XenGntalloc
from .gntdev import XenGntdev

__all__ = [
    "DomainId",
    "XenBackend",
    "XenDevices",
    "XenEvtchn",
    "XenGntalloc",
    "XenGntdev",
    "discover_domid",
    "forget_probes",
    "probe_capabilities",
]
