"""Device backends behind one contract (:mod:`grant_broker.backend.contract`).

* :mod:`grant_broker.backend.emulated` — an in-process hypervisor with several
  domains, for development, tests and hosts without Xen;
* the real Linux devices (``/dev/xen/*``, ``/dev/membuf``).

The conformance suite (``tests/conformance/``) proves every backend against
the contract.
"""
