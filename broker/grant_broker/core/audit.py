"""The audit log: who held what through the broker, and what it refused them.

One record per event, on the logger ``grant_broker.audit`` (:data:`audit_log`),
which is separate from the operational log: it does not propagate to the
root logger, so whatever configures the operational log (level, format,
destination) leaves it alone.  Where its records go — and whether they go
anywhere — the daemon decides (``grant_broker.daemon.logs``, ``serve
--audit``); nothing here opens anything.  Until it is routed its level is
:data:`OFF` (a broker embedded in a test or a program): no record is made.
Whoever routes it sets its level to INFO (``logging.getLogger("grant_broker.audit")``).

Each record is one logging call (``audit_log.info(event, extra=...)``, less
its look-up of the caller's source line), made only when the logger is
enabled for INFO (one cached level check otherwise), with its fields as plain
values: the formatting is the handler's business.  Its
message is the event, one of :data:`EVENTS`; its fields are the session's
identity (:func:`identity`: ``session_id``, ``uid``, ``pid``,
``client_name``, ``domain``) under the record attribute ``audit_identity``
and the event's own under ``audit`` — the operation, and what it names:

* ``session_opened`` — ``gid``, ``vmid``;
* ``session_closed`` — ``seconds`` it lived and ``held``: what it still held
  (``Usage`` fields that are not zero), all of which its end released —
  mappings unmapped, grants ended, ports unbound;
* ``policy_refused`` / ``budget_refused`` — a refusal by the broker's policy
  (EPERM: the hello's uid or domain, a domain or VMID a call names) or by a
  budget or quota (EDQUOT): ``operation``, ``errno``, ``reason``; a refused
  hello has no ``session_id`` and names the ``gid`` and the ``domain`` it
  asked for (``null`` when it named none);
* ``grants_mapped`` / ``grants_unmapped`` — other domains' grants mapped by
  the session (Map, MapGrantRef, a dma-buf export) and released by it:
  ``remote_domain`` (a list, one per ref, for a map of several domains'
  grants), ``refs``, and the ``index`` or ``dmabuf_id`` naming them;
* ``grants_shared`` / ``grants_unshared`` — the session's pages granted to
  another domain (gntalloc, a dma-buf import) and revoked: ``remote_domain``,
  ``refs``, ``index`` or ``dmabuf_id``;
* ``port_bound`` / ``port_unbound`` — ``port``, and ``remote_domain`` /
  ``remote_port`` or ``virq``;
* ``admin_action`` / ``admin_refused`` — a call on the remote admin listener
  (:mod:`grant_broker.core.admin`) made, or refused for want of rights (an
  identity the policy does not name, an operation its rights do not cover).
  Instead of a session's identity, the caller's: ``admin_identity`` (the
  certificate name the policy matched; ``null`` for none), ``certificate_names``
  and ``peer`` (its address); then ``operation`` (``Status``, ``ReleaseSession``,
  ...), what it named (``session_id``, ``deadline_seconds``, ``limits``) and
  its ``outcome`` (``ok`` or the errno's name, and ``reason``).  A session
  released by an administrator has its own ``session_closed`` record as well.

Grant copies, notifications and unmasks are not recorded: they hold nothing.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from grant_broker.backend.contract import GrantRefs
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import PeerCredentials

if TYPE_CHECKING:
    from grant_broker.backend.contract import GrantRef
    from grant_broker.core.session import Session

AUDIT_LOGGER = "grant_broker.audit"

OFF = logging.CRITICAL + 1
"""The audit logger's level while it goes nowhere: every audit call stops at its level check."""

audit_log = logging.getLogger(AUDIT_LOGGER)
audit_log.propagate = False
audit_log.setLevel(OFF)

IDENTITY_FIELDS = ("session_id", "uid", "pid", "client_name", "domain")
"""The fields naming a session, in records of both logs (``extra=`` of the
operational log's records that concern a session)."""

EVENTS = (
    "session_opened",
    "session_closed",
    "policy_refused",
    "budget_refused",
    "grants_mapped",
    "grants_unmapped",
    "grants_shared",
    "grants_unshared",
    "port_bound",
    "port_unbound",
    "admin_action",
    "admin_refused",
)

_INFO = logging.INFO


def identity(session: Session) -> dict[str, object]:
    """*session*'s identity fields (:data:`IDENTITY_FIELDS`); ``Session.log_fields``
    keeps them, made once."""
    creds = session.creds
    return {
        "session_id": session.id,
        "uid": creds.uid,
        "pid": creds.pid,
        "client_name": session.client_name,
        "domain": session.domid,
    }


def _emit(event: str, who: dict[str, object], fields: dict[str, object]) -> None:
    # Logger.info without its look-up of the caller's file and line (a stack
    # walk), which an audit record has no use for: the callers checked the level.
    audit_log.handle(
        audit_log.makeRecord(AUDIT_LOGGER, _INFO, __name__, 0, event, (), None, extra={"audit_identity": who, "audit": fields})
    )


# ---------------------------------------------------------------- sessions


def session_opened(session: Session) -> None:
    if audit_log.isEnabledFor(_INFO):
        _emit("session_opened", session.log_fields, {"gid": session.creds.gid, "vmid": session.vmid})


def session_closed(session: Session) -> None:
    if audit_log.isEnabledFor(_INFO):
        held = {name: count for name, count in vars(session.usage).items() if count}
        seconds = round(time.monotonic() - session.created, 3)
        _emit("session_closed", session.log_fields, {"seconds": seconds, "held": held})


# ---------------------------------------------------------------- refusals


def _refusal(exc: BrokerError) -> str | None:
    if exc.errno == errno.EPERM:
        return "policy_refused"
    if exc.errno == errno.EDQUOT:
        return "budget_refused"
    return None


def _reason(exc: BrokerError) -> dict[str, object]:
    return {"operation": exc.operation, "errno": exc.errno_name, "reason": exc.detail or exc.strerror}


def refused(session: Session, exc: BrokerError) -> BrokerError:
    """Record *exc*, a refusal of *session*'s call by the policy (EPERM) or a
    budget (EDQUOT); return it (``raise audit.refused(session, error)``)."""
    if audit_log.isEnabledFor(_INFO):
        event = _refusal(exc)
        if event is not None:
            _emit(event, session.log_fields, _reason(exc))
    return exc


def hello_refused(
    creds: PeerCredentials, client_name: str, domid: int | None, vmid: int | None, exc: BrokerError
) -> BrokerError:
    """Record the refusal of a hello (no session was opened) by the policy or a
    budget; other errors (a domain the backend cannot be) are not refusals."""
    if audit_log.isEnabledFor(_INFO):
        event = _refusal(exc)
        if event is not None:
            who: dict[str, object] = {
                "session_id": None, "uid": creds.uid, "pid": creds.pid, "client_name": client_name, "domain": domid,
            }
            _emit(event, who, {**_reason(exc), "gid": creds.gid, "vmid": vmid})
    return exc


# ---------------------------------------------------------------- grants and ports


def _grants(grants: Sequence[GrantRef]) -> dict[str, object]:
    if isinstance(grants, GrantRefs):
        # Packed (the map path's): read from the arrays, no object per grant.
        one = grants.domid
        return {"remote_domain": one if one is not None or not grants else grants.domids.tolist(), "refs": grants.refs.tolist()}
    first = grants[0].domid if grants else None
    domains: object = first
    if any(grant.domid != first for grant in grants):
        domains = [grant.domid for grant in grants]
    return {"remote_domain": domains, "refs": [grant.ref for grant in grants]}


def _named(
    fields: dict[str, object], index: int | None, dmabuf_id: int | None, writable: bool | None = None
) -> dict[str, object]:
    """*fields* with those of the optional ones that are given."""
    for name, value in (("index", index), ("dmabuf_id", dmabuf_id), ("writable", writable)):
        if value is not None:
            fields[name] = value
    return fields


def grants_mapped(
    session: Session,
    operation: str,
    grants: Sequence[GrantRef],
    *,
    index: int | None = None,
    dmabuf_id: int | None = None,
    writable: bool | None = None,
) -> None:
    if audit_log.isEnabledFor(_INFO):
        _emit("grants_mapped", session.log_fields, _named({"operation": operation, **_grants(grants)}, index, dmabuf_id, writable))


def grants_unmapped(
    session: Session, operation: str, grants: Sequence[GrantRef], *, index: int | None = None, dmabuf_id: int | None = None
) -> None:
    if audit_log.isEnabledFor(_INFO):
        _emit("grants_unmapped", session.log_fields, _named({"operation": operation, **_grants(grants)}, index, dmabuf_id))


def grants_shared(
    session: Session,
    operation: str,
    remote_domain: int,
    refs: Sequence[int],
    *,
    index: int | None = None,
    dmabuf_id: int | None = None,
    writable: bool | None = None,
) -> None:
    if audit_log.isEnabledFor(_INFO):
        fields = _named(
            {"operation": operation, "remote_domain": remote_domain, "refs": list(refs)}, index, dmabuf_id, writable
        )
        _emit("grants_shared", session.log_fields, fields)


def grants_unshared(
    session: Session,
    operation: str,
    remote_domain: int,
    refs: Sequence[int],
    *,
    index: int | None = None,
    dmabuf_id: int | None = None,
) -> None:
    if audit_log.isEnabledFor(_INFO):
        fields = _named({"operation": operation, "remote_domain": remote_domain, "refs": list(refs)}, index, dmabuf_id)
        _emit("grants_unshared", session.log_fields, fields)


def port_bound(
    session: Session,
    operation: str,
    port: int,
    *,
    remote_domain: int | None = None,
    remote_port: int | None = None,
    virq: int | None = None,
) -> None:
    if audit_log.isEnabledFor(_INFO):
        fields: dict[str, object] = {"operation": operation, "port": port}
        if remote_domain is not None:
            fields["remote_domain"] = remote_domain
        if remote_port is not None:
            fields["remote_port"] = remote_port
        if virq is not None:
            fields["virq"] = virq
        _emit("port_bound", session.log_fields, fields)


def port_unbound(session: Session, operation: str, port: int) -> None:
    if audit_log.isEnabledFor(_INFO):
        _emit("port_unbound", session.log_fields, {"operation": operation, "port": port})


# ---------------------------------------------------------------- the remote administrator


def admin_action(caller: dict[str, object], operation: str, fields: dict[str, object], error: BrokerError | None = None) -> None:
    """An administrator's call (*caller*: ``admin_identity``, ``certificate_names``,
    ``peer``) and its outcome: done, or failed with *error*."""
    if audit_log.isEnabledFor(_INFO):
        outcome: dict[str, object] = {"outcome": "ok"} if error is None else {
            "outcome": error.errno_name, "reason": error.detail or error.strerror
        }
        _emit("admin_action", caller, {"operation": operation, **fields, **outcome})


def admin_refused(caller: dict[str, object], operation: str, exc: BrokerError) -> BrokerError:
    """A call on the admin listener refused for want of rights; returns *exc*."""
    if audit_log.isEnabledFor(_INFO):
        _emit("admin_refused", caller, {"operation": operation, "errno": exc.errno_name, "reason": exc.detail or exc.strerror})
    return exc
