"""Request checks shared by the operations: what the kernel would refuse, refused
before any device is touched, with a sentence saying which field is wrong."""

from __future__ import annotations

import errno
from collections.abc import Iterable

from grant_broker.core import audit
from grant_broker.core.session import Session
from grant_broker_protocol.abi import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from grant_broker_protocol.errors import BrokerError

DOMID_MAX = 0xFFFF  # domid_t is 16 bits; the ioctl structs carry wider fields and the kernel truncates
U16_MAX = 0xFFFF
UNMAP_NOTIFY_ACTIONS = UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT


def invalid(operation: str, detail: str) -> BrokerError:
    """A request that is wrong before any device is touched (EINVAL)."""
    return BrokerError(errno.EINVAL, operation, detail)


def check_domid(operation: str, domid: int, what: str = "domid") -> None:
    """EINVAL unless *domid* fits ``domid_t``."""
    if domid > DOMID_MAX:
        raise invalid(operation, f"{what} {domid} does not fit domid_t (at most {DOMID_MAX})")


def check_count(operation: str, count: int, what: str = "grants") -> None:
    """EINVAL for a count of 0, as the kernel refuses empty maps/allocations."""
    if count == 0:
        raise invalid(operation, f"count is 0: at least one of the {what} is needed")


def check_listed_count(operation: str, count: int, listed: int, what: str = "refs") -> None:
    """EINVAL when a request's ``count`` field disagrees with the list it counts."""
    if count != listed:
        raise invalid(operation, f"count is {count} but {listed} {what} are given")


def check_reserved_zero(operation: str, **fields: int) -> None:
    for name, value in fields.items():
        if value != 0:
            raise invalid(operation, f"{name} is {value}; reserved fields must be 0")


def check_notify_action(operation: str, action: int) -> None:
    if action & ~UNMAP_NOTIFY_ACTIONS:
        raise invalid(
            operation,
            f"action {action:#x} has bits other than UNMAP_NOTIFY_CLEAR_BYTE (0x1) and UNMAP_NOTIFY_SEND_EVENT (0x2)",
        )


def quota_grants(session: Session, operation: str, adding: int) -> None:
    """Grants per session: what it maps (incl. dma-buf exports) plus what it grants."""
    usage = session.usage
    session.check_quota(
        operation,
        "grants",
        usage.mapped_grants + usage.granted_pages,
        adding,
        session.limits.max_grants_per_session,
        "max_grants_per_session",
    )


def check_peers(
    session: Session, operation: str, action: str, *, domains: Iterable[int] = (), vmids: Iterable[int] | None = None
) -> None:
    """The one check of the broker's policy on the domains a call names (issue 14 §5).

    EPERM unless the policy lets the session's peer *action* ("map grants
    of", "grant to", "bind to", ...) every domain of *domains* — its
    session's own domain always — and, for a mem-buf call (*vmids*: the
    VMIDs of its ACL), name every VMID of *vmids* and act as its session's
    VMID (:meth:`~grant_broker.core.policy.Policy.check_owner`).  Called by every operation that names a remote domain or VMID, on
    every call; costs an attribute look-up when the policy narrows nothing.
    """
    policy = session.policy
    creds = session.creds
    if domains:
        allowed = policy.remote_domains_for(creds)
        if allowed is not None:
            own = session.domid
            for domid in domains:
                if domid != own and domid not in allowed:
                    raise _refused(session, operation, f"may not {action} domain {domid}", allowed, "domains")
    if vmids is None:
        return
    if session.owners is not None and session.backend.capabilities.any_domain:
        # The VMID it acts as (chosen at the hello) is its own: granted, or first used by its uid.
        try:
            policy.check_owner(creds, "vmid", session.vmid, session.owners, operation)
        except BrokerError as exc:
            audit.refused(session, exc)
            raise
    allowed = policy.remote_vmids_for(creds)
    if allowed is not None:
        own = session.vmid
        for vmid in vmids:
            if vmid != own and vmid not in allowed:
                raise _refused(session, operation, f"may not {action} VMID {vmid}", allowed, "VMIDs")


def _refused(session: Session, operation: str, what: str, allowed: frozenset[int], kind: str) -> BrokerError:
    names = ", ".join(str(i) for i in sorted(allowed)[:16]) + (", ..." if len(allowed) > 16 else "")
    return audit.refused(session, BrokerError(
        errno.EPERM,
        operation,
        f"uid {session.creds.uid} {what}: the broker's policy lets it name only its own and {kind} {names}",
    ))
