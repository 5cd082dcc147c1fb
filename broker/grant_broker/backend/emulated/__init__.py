"""The emulated hypervisor: Xen + Linux devices for several domains in one process.

Use::

    with EmulatedHypervisor() as hypervisor:
        dom1 = hypervisor.backend(1)
        dom2 = hypervisor.backend(2)
        with dom2.open_gntalloc() as gntalloc, dom1.open_gntdev() as gntdev:
            ...

Everything it hands out is a real descriptor (socketpair instances, memfd
memory), so fds can be passed to other processes like the real devices' fds.
The emulation's limits are listed in ``Capabilities.notes``.
"""

from .hypervisor import EMULATION_NOTES, EmulatedBackend, EmulatedHypervisor

__all__ = ["EMULATION_NOTES", "EmulatedBackend", "EmulatedHypervisor"]
