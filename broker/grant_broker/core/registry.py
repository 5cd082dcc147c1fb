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
from grant_broker.core import audit
from grant_broker.core.budgets import SESSIONS, UserBudget
from grant_broker.core.events import EventHub
from grant_broker.core.policy import DomainOwners, Limits, Policy
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
        # The budgets of each uid with a live session (core/budgets.py).
        self._users: dict[int, UserBudget] = {}
        # Who first acted as which domain and VMID (issue 14 §5; core/policy.py).
        self.domain_owners = DomainOwners()
        # Set by a drain (core/admin.py): new sessions are refused, with this reason.
        self.draining: str | None = None

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
                A refusal by the policy or a limit is in the audit log.
        """
        try:
            session = self._admit(channel, creds, client_name, domid, vmid)
        except BrokerError as exc:
            audit.hello_refused(creds, client_name, domid, vmid, exc)
            raise
        audit.session_opened(session)
        return session

    def _admit(
        self, channel: FdChannel, creds: PeerCredentials, client_name: str, domid: int | None, vmid: int | None
    ) -> Session:
        operation = "open session"
        if self.draining is not None:
            # EAGAIN (UNAVAILABLE): not the client's fault; another broker, or this one later, will do.
            raise BrokerError(errno.EAGAIN, operation, f"the broker takes no new sessions: {self.draining}")
        if not self.policy.admits(creds):
            raise BrokerError(errno.EPERM, operation, f"uid {creds.uid} (pid {creds.pid}) is not allowed by the broker's policy")
        if len(self._sessions) >= self.limits.max_sessions:
            raise BrokerError(errno.EDQUOT, operation, f"the broker serves its maximum of {self.limits.max_sessions} sessions")
        user = self._users.get(creds.uid) or UserBudget(creds.uid, self.limits)
        user.check(operation, SESSIONS, 1)
        if self.provider.any_domain:
            # A backend where the session chooses its domain: one it may act as (issue 14 §5, core/policy.py).
            domid = self.policy.acting_domain(creds, domid)
            vmid = self.policy.acting_vmid(creds, vmid)
        try:
            backend = self.provider.backend(domid, vmid)
        except ValueError as exc:  # a domid the backend cannot be (emulated: above 0x7FEF)
            raise BrokerError(errno.EINVAL, operation, str(exc)) from None
        if self.provider.any_domain:
            try:
                self.policy.check_owner(creds, "domain", backend.domid, self.domain_owners)
            except BaseException:
                backend.close()
                raise
        session = Session(
            next(self._ids), channel, creds, backend, client_name or f"pid {creds.pid}", self.limits, self.event_hub, user
        )
        session.policy = self.policy
        session.owners = self.domain_owners
        user.charge(operation, SESSIONS, 1)
        self._users[creds.uid] = user
        self._sessions[session.id] = session
        self._by_token[session.token] = session
        log.info(
            "session %d opened: %r, pid %d uid %d, domain %d",
            session.id, session.client_name, creds.pid, creds.uid, session.domid, extra=session.log_fields,
        )
        return session

    def reconfigure(self, policy: Policy | None = None, limits: Limits | None = None) -> None:
        """Apply a new *policy* and/or *limits* to the live sessions and to those to come.

        Nothing held is taken back: a session over a lowered limit keeps what
        it has and is refused more until it is under it again.  The policy
        applies from each session's next call (its domain, checked at the
        hello, stays what it was), and so do the limits, but for the bounds
        of a session's pending descriptor transfers, which are set when the
        session opens.  Used by reload (SIGHUP) and by the admin API's budget
        changes."""
        if policy is not None:
            self.policy = policy
            for session in self._sessions.values():
                session.policy = policy
        if limits is not None:
            self.limits = limits
            for session in self._sessions.values():
                session.limits = limits
            for user in self._users.values():
                user.limits = limits

    def user_budget(self, uid: int) -> UserBudget | None:
        """What the live sessions of *uid* hold (``None``: it has none, and holds nothing)."""
        return self._users.get(uid)

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
        known = self._sessions.pop(session.id, None) is not None
        self._by_token.pop(session.token, None)
        if known:
            audit.session_closed(session)  # with what it holds now, which the release gives back
        session.release()
        if known:
            user = session.user
            user.credit(SESSIONS, 1)
            if user.empty and self._users.get(user.uid) is user:
                del self._users[user.uid]

    def close(self) -> None:
        """Release every session (broker shutdown)."""
        for session in list(self._sessions.values()):
            self.close_session(session)
