"""The remote administrator's operations: status, a session, the metrics, force-release, drain, limits.

Served by the admin listener (``transport/grpc/admin.py``: TCP, mutual TLS)
and by nothing else; free of any transport, as the rest of the core.  The
transport says who calls (:class:`AdminCaller`: the names of the client's
certificate, which the policy's ``admin_identities`` give rights,
:data:`~grant_broker.core.policy.ADMIN_RIGHTS`); :meth:`Administration.call`
checks the right the operation needs, runs it and writes the audit record
(``admin_action``, or ``admin_refused``) with the caller's identity.

What the core cannot do itself comes in as callables from the daemon: the
metrics snapshot (the daemon keeps the metrics) and the drain (it turns the
health service to NOT_SERVING before :func:`drain_sessions` runs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.message import Message

from grant_broker.core import audit
from grant_broker.core.operations.broker import BrokerStatus, session_message
from grant_broker.core.policy import Limits
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.session import Session
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.v1 import admin_pb2

log = logging.getLogger(__name__)

RELEASE_WAIT_SECONDS: Final = 5.0
"""How long a force-release waits for the transport serving the session to
end it (it normally takes one turn of the event loop) before the registry
releases the session directly."""

RIGHT_OF: Final[Mapping[str, str]] = {
    "WhoAmI": "view",
    "Status": "view",
    "DescribeSession": "view",
    "Metrics": "view",
    "ReleaseSession": "release",
    "Drain": "drain",
    "SetLimits": "limits",
}
"""The right (:data:`~grant_broker.core.policy.ADMIN_RIGHTS`) each method of
the ``Admin`` service needs."""


@dataclass(frozen=True, slots=True)
class AdminCaller:
    """Who calls on the admin listener, as its transport authenticated it.

    *names*: every name of the client's certificate (subject CN, the whole
    subject, subject alternative names); *peer*: its address, for the audit log."""

    names: tuple[str, ...]
    peer: str

    def audit_fields(self, identity: str | None) -> dict[str, object]:
        return {"admin_identity": identity, "certificate_names": list(self.names), "peer": self.peer}


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    """How a drain ended: sessions still live, sessions released at the deadline, time waited."""

    sessions_left: int
    released: int
    waited_seconds: float


MetricsSnapshot = Callable[[], tuple[str, bytes]]
"""The metrics as a scrape gives them: (content type, text)."""
Drain = Callable[[float, bool], Awaitable[DrainOutcome]]
"""Drain the broker: (deadline in seconds, release the sessions left at the deadline)."""


# --------------------------------------------------------------------------- the building blocks


async def release_session(registry: SessionRegistry, session: Session, reason: str) -> None:
    """End *session* as its client's crash would: its fd channel is shut down,
    so the transport serving it sees the channel end and releases it through
    the registry by the very path of a crash — its mappings unmapped (their
    unmap notifications fire), its grants ended, its ports unbound — and its
    client sees the channel close.  Returns once the session is released.
    Should the transport not end it within :data:`RELEASE_WAIT_SECONDS`, the
    registry releases it directly."""
    log.warning("session %d (%r, pid %d) is being released: %s", session.id, session.client_name, session.creds.pid,
                reason, extra=session.log_fields)
    session.channel.shutdown()
    try:
        async with asyncio.timeout(RELEASE_WAIT_SECONDS):
            await session.closed.wait()
    except TimeoutError:
        registry.close_session(session)


async def drain_sessions(registry: SessionRegistry, deadline: float, *, release_at_deadline: bool = False) -> DrainOutcome:
    """Refuse new sessions from now on (EAGAIN, UNAVAILABLE), then wait for
    the live ones to end, for at most *deadline* seconds; with
    *release_at_deadline*, release those still there then
    (:func:`release_session`).  Calling it again while draining waits again."""
    if registry.draining is None:
        registry.draining = "it is draining"
        log.info("draining: new sessions are refused; waiting up to %.1fs for %d session(s) to end",
                 deadline, len(registry.sessions))
    started = time.monotonic()
    live = registry.sessions
    if live and deadline > 0:
        waiters = [asyncio.ensure_future(session.closed.wait()) for session in live]
        try:
            await asyncio.wait(waiters, timeout=deadline)
        finally:
            for waiter in waiters:
                waiter.cancel()
    released = 0
    if release_at_deadline:
        left = registry.sessions
        await asyncio.gather(*(release_session(registry, s, "the broker is draining and its deadline passed") for s in left))
        released = len(left)
    return DrainOutcome(len(registry.sessions), released, time.monotonic() - started)


def limit_settings(limits: Limits) -> list[admin_pb2.LimitSetting]:
    """Every limit of *limits*, by its name."""
    return [
        admin_pb2.LimitSetting(name=spec.name, value=float(getattr(limits, spec.name)))
        for spec in dataclasses.fields(Limits)
    ]


def changed_limits(limits: Limits, settings: list[admin_pb2.LimitSetting]) -> Limits:
    """*limits* with *settings* applied.

    Raises:
        BrokerError: EINVAL for a name that is no limit, a value that is not
            positive, or a fraction where the limit counts things.
    """
    operation = "set limits"
    fields = {spec.name: spec for spec in dataclasses.fields(Limits)}
    changes: dict[str, Any] = {}  # each of its field's own type, checked below
    for setting in settings:
        if setting.name not in fields:
            raise BrokerError(errno.EINVAL, operation, f"{setting.name!r} is no limit; the limits: {', '.join(sorted(fields))}")
        if not setting.value > 0:
            raise BrokerError(errno.EINVAL, operation, f"{setting.name}: {setting.value:g} is not positive")
        if isinstance(getattr(limits, setting.name), float):
            changes[setting.name] = float(setting.value)
        elif setting.value == int(setting.value):
            changes[setting.name] = int(setting.value)
        else:
            raise BrokerError(errno.EINVAL, operation, f"{setting.name}: {setting.value:g} is not a whole number")
    return dataclasses.replace(limits, **changes)


# --------------------------------------------------------------------------- the service


class Administration:
    """The ``Admin`` service of one broker, for its admin listener."""

    def __init__(
        self,
        registry: SessionRegistry,
        status: BrokerStatus,
        *,
        metrics: MetricsSnapshot | None,
        drain: Drain,
    ) -> None:
        self.registry = registry
        self.status = status
        self._metrics = metrics
        self._drain = drain
        self._operations: dict[str, Callable[[Any], Awaitable[tuple[Message, dict[str, object]]]]] = {
            "Status": self._status,
            "DescribeSession": self._describe_session,
            "Metrics": self._metrics_snapshot,
            "ReleaseSession": self._release_session,
            "Drain": self._drain_broker,
            "SetLimits": self._set_limits,
        }

    def rights(self, caller: AdminCaller) -> tuple[str, frozenset[str]]:
        """The identity the policy matched among *caller*'s names, and its rights.

        Raises:
            BrokerError: EPERM (audited as ``admin_refused``) when the policy names none of them.
        """
        matched = self.registry.policy.admin_rights(caller.names)
        if matched is None:
            names = ", ".join(caller.names) or "none"
            raise audit.admin_refused(caller.audit_fields(None), "authenticate", BrokerError(
                errno.EPERM, "authenticate",
                f"the certificate (names: {names}) is no administrator of this broker (serve --admin-identity)",
            ))
        return matched

    async def call(self, caller: AdminCaller, method: str, request: Message) -> Message:
        """Serve the ``Admin`` method *method* for *caller*: check its right,
        run it, and record it in the audit log.

        Raises:
            BrokerError: EPERM (audited as ``admin_refused``) for an identity
                the policy does not name or a method its rights do not cover;
                ENOSYS for a method the service does not have; the method's
                own failure (audited as ``admin_action``, with its outcome).
        """
        right = RIGHT_OF.get(method)
        if right is None:
            raise BrokerError(errno.ENOSYS, method, "the Admin service has no such method")
        identity, rights = self.rights(caller)
        who = caller.audit_fields(identity)
        if right not in rights:
            raise audit.admin_refused(who, method, BrokerError(
                errno.EPERM, method,
                f"{identity} has the rights {', '.join(sorted(rights))}; {method} needs {right}",
            ))
        if method == "WhoAmI":  # answered from what was just checked
            audit.admin_action(who, method, {})
            return admin_pb2.WhoAmIResponse(identity=identity, names=list(caller.names), rights=sorted(rights))
        try:
            response, named = await self._operations[method](request)
        except BrokerError as exc:
            audit.admin_action(who, method, _named(request), exc)
            raise
        audit.admin_action(who, method, named)
        return response

    # ------------------------------------------------------------ the operations

    async def _status(self, request: admin_pb2.AdminStatusRequest) -> tuple[Message, dict[str, object]]:
        return admin_pb2.AdminStatusResponse(
            status=self.status.snapshot(full=True),
            draining=self.registry.draining is not None,
            limits=limit_settings(self.registry.limits),
        ), {}

    def _session(self, operation: str, session_id: int) -> Session:
        for session in self.registry.sessions:
            if session.id == session_id:
                return session
        raise BrokerError(errno.ENOENT, operation, f"there is no session {session_id}")

    async def _describe_session(self, request: admin_pb2.AdminDescribeSessionRequest) -> tuple[Message, dict[str, object]]:
        session = self._session("describe session", request.session_id)
        return session_message(session), {"session_id": session.id}

    async def _metrics_snapshot(self, request: admin_pb2.MetricsRequest) -> tuple[Message, dict[str, object]]:
        if self._metrics is None:
            raise BrokerError(errno.ENOSYS, "metrics", "this broker keeps no metrics")
        content_type, text = self._metrics()
        return admin_pb2.MetricsResponse(content_type=content_type, text=text), {}

    async def _release_session(self, request: admin_pb2.ReleaseSessionRequest) -> tuple[Message, dict[str, object]]:
        session = self._session("release session", request.session_id)
        before = session_message(session)
        reason = request.reason or "released by an administrator"
        await release_session(self.registry, session, reason)
        return admin_pb2.ReleaseSessionResponse(released=before), {
            "session_id": session.id, "reason": reason, "uid": session.creds.uid, "client_name": session.client_name,
        }

    async def _drain_broker(self, request: admin_pb2.DrainRequest) -> tuple[Message, dict[str, object]]:
        if request.deadline_seconds < 0:
            raise BrokerError(errno.EINVAL, "drain", f"the deadline {request.deadline_seconds:g}s is negative")
        outcome = await self._drain(request.deadline_seconds, request.release_at_deadline)
        response = admin_pb2.DrainResponse(
            sessions_left=outcome.sessions_left, released=outcome.released, waited_seconds=outcome.waited_seconds
        )
        return response, {
            "deadline_seconds": request.deadline_seconds,
            "release_at_deadline": request.release_at_deadline,
            "sessions_left": outcome.sessions_left,
            "released": outcome.released,
        }

    async def _set_limits(self, request: admin_pb2.SetLimitsRequest) -> tuple[Message, dict[str, object]]:
        limits = changed_limits(self.registry.limits, list(request.limits))
        self.registry.reconfigure(limits=limits)
        named = {setting.name: getattr(limits, setting.name) for setting in request.limits}
        log.info("limits changed by an administrator: %s", ", ".join(f"{k}={v}" for k, v in named.items()))
        return admin_pb2.SetLimitsResponse(limits=limit_settings(limits)), {"limits": named}


def _named(request: Message) -> dict[str, object]:
    """What a failed request named, for its audit record."""
    if isinstance(request, admin_pb2.ReleaseSessionRequest | admin_pb2.AdminDescribeSessionRequest):
        return {"session_id": request.session_id}
    if isinstance(request, admin_pb2.SetLimitsRequest):
        return {"limits": {setting.name: setting.value for setting in request.limits}}
    if isinstance(request, admin_pb2.DrainRequest):
        return {"deadline_seconds": request.deadline_seconds, "release_at_deadline": request.release_at_deadline}
    return {}

