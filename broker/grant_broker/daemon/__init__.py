"""The daemon's life: backend choice, sockets, the gRPC server, signals.

:mod:`.backends` picks the real devices or the emulated hypervisor;
:mod:`.server` binds the sockets and wires the core to the transports;
:mod:`.run` runs one broker until a signal ends it; :mod:`.metrics` serves its
metrics (``serve --metrics``); :mod:`.logs` says where its two logs go
(``--log-format``, ``serve --audit``).
"""
