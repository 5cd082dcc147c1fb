"""grant-broker: one per-host daemon owning the Xen grant/event-channel and mem-buf devices."""

__version__ = "0.1.0"
