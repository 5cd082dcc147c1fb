"""Who may open a session, and what one session may hold.

The kernel interfaces have almost no per-client limits (gntdev has no grant
quota, an evtchn handle binds as many ports as the domain has): the broker's
own quotas live here, and are checked once, in the operations.
"""

from __future__ import annotations

from dataclasses import dataclass

from grant_broker_protocol.fdchannel import PeerCredentials


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may hold; the broker's own quotas (the kernel has almost none)."""

    max_sessions: int = 4096
    max_sessions_per_uid: int = 1024
    max_grants_per_session: int = 65536
    max_ports_per_session: int = 4096
    max_pending_fd_frames: int = 16
    max_subscriptions_per_session: int = 64
    max_map_memory_per_mapping: int = 64
    fd_frame_wait_seconds: float = 5.0
    hello_timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may open a session.  ``allowed_uids``/``allowed_gids`` empty = anyone the
    socket permissions let in (the socket is mode 0660)."""

    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    admin_uids: frozenset[int] = frozenset({0})

    def admits(self, creds: PeerCredentials) -> bool:
        if not self.allowed_uids and not self.allowed_gids:
            return True
        return creds.uid in self.allowed_uids or creds.gid in self.allowed_gids or creds.uid == 0

    def is_admin(self, creds: PeerCredentials) -> bool:
        return creds.uid in self.admin_uids
