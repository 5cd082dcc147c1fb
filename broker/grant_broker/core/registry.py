"""All live sessions: admission by the policy and the limits, and look-up by token.

Transports ask the registry, never the sessions themselves: the fd channel
server opens a session with :meth:`SessionRegistry.open` once a client said
hello, and every call finds its session with :meth:`SessionRegistry.lookup`.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Callable

from grant_broker.backend.contract import Backend
from grant_broker.core.events import EventHub
from grant_broker.core.policy import Limits, Policy
from grant_broker.core.session import Session
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import FdChannel, PeerCredentials

log = logging.getLogger(__name__)


class BackendProvider:
    """Gives each session the backend of the domain it acts as."""

    def __init__(self, backend_for: Callable[[int | None, int | None], Backend], any_domain: bool) -> None:
        self._backend_for = backend_for
        self.any_domain = any_domain

    def backend(self, domid: int | None, vmid: int | None) -> Backend:
        return self._backend_for(domid, vmid)


class SessionRegistry:
    """The broker's sessions, by id and by token."""

    def __init__(self, provider: BackendProvider, policy: Policy, limits: Limits) -> None:
        self.provider = provider
        self.policy = policy
        self.limits = limits
        self._sessions: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self.event_hub = EventHub()

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def open(
        self, channel: FdChannel, creds: PeerCredentials, client_name: str, domid: int | None, vmid: int | None
    ) -> Session:
        """Admit a client that said hello on *channel* as a new session.

        Raises:
            BrokerError: EPERM when the policy refuses the peer, EDQUOT past the
                session limits, or the backend's refusal of the domain asked for.
        """
        operation = "open session"
        if not self.policy.admits(creds):
            raise BrokerError(errno.EPERM, operation, f"uid {creds.uid} (pid {creds.pid}) is not allowed by the broker's policy")
        if len(self._sessions) >= self.limits.max_sessions:
            raise BrokerError(errno.EDQUOT, operation, f"the broker serves its maximum of {self.limits.max_sessions} sessions")
        same_uid = sum(1 for s in self._sessions.values() if s.creds.uid == creds.uid)
        if same_uid >= self.limits.max_sessions_per_uid:
            raise BrokerError(
                errno.EDQUOT,
                operation,
                f"uid {creds.uid} already has {same_uid} sessions (limit {self.limits.max_sessions_per_uid})",
            )
        try:
            backend = self.provider.backend(domid, vmid)
        except ValueError as exc:  # a domid the backend cannot be (emulated: above 0x7FEF)
            raise BrokerError(errno.EINVAL, operation, str(exc)) from None
        session = Session(next(self._ids), channel, creds, backend, client_name or f"pid {creds.pid}", self.limits, self.event_hub)
        self._sessions[session.id] = session
        self._by_token[session.token] = session
        log.info(
            "session %d opened: %s, pid %d uid %d, domain %d",
            session.id, session.client_name, creds.pid, creds.uid, session.domid,
        )
        return session

    def lookup(self, token: str | None) -> Session:
        """The live session whose token is *token*.

        Raises:
            BrokerError: EPERM for no token, an unknown one, or a session whose
                fd channel is gone.
        """
        if token is None:
            raise BrokerError(errno.EPERM, "authenticate", "no session: the call carries no session token")
        session = self._by_token.get(token)
        if session is None or not session.connected():
            raise BrokerError(errno.EPERM, "authenticate", "unknown or ended session token")
        return session

    def close_session(self, session: Session) -> None:
        """Forget *session* and release everything it holds."""
        self._sessions.pop(session.id, None)
        self._by_token.pop(session.token, None)
        session.release()

    def close(self) -> None:
        """Release every session (broker shutdown)."""
        for session in list(self._sessions.values()):
            self.close_session(session)
