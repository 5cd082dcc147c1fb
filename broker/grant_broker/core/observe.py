"""Observing calls: the hook each transport tells how its calls ended.

The core says *what* is observed; the daemon decides how it is kept and shown
(``daemon/metrics.py``: Prometheus), so nothing here imports a metrics
library.  A transport asks its :class:`CallObserver` once, when it is built,
for one :class:`CallRecorder` per method it serves, and reports every call it
served to that recorder from one place (``transport/grpc/handlers.py``: the
handlers; ``transport/fastpath.py``: ``FastPath._serve``;
``transport/fdchannel.py``: the hello): the call's errno (0 when it
succeeded) and how long it took.  A recorder is called on the event loop's
thread only, so it may count without a lock; the default (:data:`NO_OBSERVER`)
counts nothing.

What is state rather than an event — sessions, grants, ports, budgets — is
not reported here at all: whoever shows it reads it from the
:class:`~grant_broker.core.registry.SessionRegistry` when asked
(:mod:`grant_broker.core.census`), so the hot path pays nothing for it.
"""

from __future__ import annotations

from typing import Final, Protocol

TRANSPORT_GRPC: Final = "grpc"
"""Calls over gRPC (``transport/grpc``)."""
TRANSPORT_FAST_PATH: Final = "fast_path"
"""Calls as frames on the session's fd channel (``transport/fastpath.py``)."""
TRANSPORT_FD_CHANNEL: Final = "fd_channel"
"""The fd channel's hello, which opens a session (service ``FdChannel``, method ``Hello``)."""

HELLO: Final = ("FdChannel", "Hello")
"""The (service, method) the hello is recorded as."""

UNKNOWN_METHOD: Final = ("", "unknown")
"""The (service, method) of a fast-path call naming no method the broker serves
(the name the client sent is not used: it could be anything)."""


class CallRecorder(Protocol):
    """Counts the calls of one method over one transport."""

    def record(self, error: int, seconds: float) -> None:
        """One call ended: *error* is its errno (0: it succeeded; ECANCELED: the
        client or the broker's shutdown cancelled it), *seconds* how long it
        was served (for a stream: how long it lived)."""


class CallObserver(Protocol):
    """Gives the transports their recorders (the daemon's metrics, or nothing)."""

    def recorder(self, service: str, method: str, transport: str) -> CallRecorder:
        """The recorder of *method* of *service* over *transport* (asked once per
        method when the transport is built, never per call)."""


class _NoRecorder:
    __slots__ = ()

    def record(self, error: int, seconds: float) -> None:
        pass


class _NoObserver:
    __slots__ = ()

    def recorder(self, service: str, method: str, transport: str) -> CallRecorder:
        return NO_RECORDER


NO_RECORDER: Final[CallRecorder] = _NoRecorder()
NO_OBSERVER: Final[CallObserver] = _NoObserver()
"""The default observer: calls are not counted (metrics off)."""
