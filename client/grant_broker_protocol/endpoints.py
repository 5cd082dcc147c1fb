"""Where a broker listens, and how a call names its session.

Both the broker (which binds the sockets) and the SDK (which connects to
them) read the defaults from here.
"""

from __future__ import annotations

import os

SESSION_METADATA_KEY = "x-grant-broker-session"
"""gRPC metadata key that carries a session's token on every call."""

SOCKET_ENVIRONMENT = "GRANT_BROKER_SOCKET"
"""Environment variable naming the broker's gRPC socket."""

SYSTEM_SOCKET_PATH = "/run/grant-broker/broker.sock"


def default_socket_path() -> str:
    """The broker's gRPC socket: ``$GRANT_BROKER_SOCKET``, else
    ``$XDG_RUNTIME_DIR/grant-broker/broker.sock`` for a user, else (root)
    ``/run/grant-broker/broker.sock``."""
    if path := os.environ.get(SOCKET_ENVIRONMENT):
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.geteuid() != 0:
        return os.path.join(runtime, "grant-broker", "broker.sock")
    return SYSTEM_SOCKET_PATH


def fd_channel_path(socket_path: str) -> str:
    """The fd channel's socket lives beside the gRPC socket."""
    return socket_path + ".fds"
