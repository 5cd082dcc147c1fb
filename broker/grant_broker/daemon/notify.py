"""Telling the service manager how the broker is doing: systemd's notify protocol.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a datagram socket
to which the service writes ``KEY=VALUE`` lines: ``READY=1`` once it serves,
``RELOADING=1`` while it reloads, ``STOPPING=1`` when it begins to stop,
``STATUS=...`` for ``systemctl status``.  The protocol is a single
``sendto`` per message (sd_notify(3)); there is nothing to gain from a
library for it.  Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class ServiceNotifier:
    """The service manager's notification socket, if it gave one."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: str | int) -> None:
        """Send one message (``READY=1``...) from *fields*; a failure is logged once, never raised:
        the broker serves whether or not its manager hears about it."""
        if not self._address:
            return
        message = "\n".join(f"{name.upper()}={value}" for name, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status)

    def reloading(self, status: str = "reloading the configuration") -> None:
        # systemd >= 253 wants the time the reload began with RELOADING=1 (Type=notify-reload).
        self.notify(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000, status=status)

    def stopping(self, status: str = "draining: finishing calls and releasing sessions") -> None:
        self.notify(stopping=1, status=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "ServiceNotifier":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
