"""Broker operations: the calling session as the broker sees it, and the operator's status view."""

from __future__ import annotations

import errno
import time

from grant_broker import __version__
from grant_broker.backend.contract import Capabilities
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import open_fd_count
from grant_broker_protocol.v1 import broker_pb2


def capabilities_message(capabilities: Capabilities) -> broker_pb2.Capabilities:
    return broker_pb2.Capabilities(
        backend=capabilities.backend,
        gntdev=capabilities.gntdev,
        gntalloc=capabilities.gntalloc,
        evtchn=capabilities.evtchn,
        grant_copy=capabilities.grant_copy,
        dmabuf=capabilities.dmabuf,
        set_max_grants=capabilities.set_max_grants,
        membuf_abi=capabilities.membuf_abi.value if capabilities.membuf_abi else "",
        any_domain=capabilities.any_domain,
        notes=list(capabilities.notes),
    )


def session_message(session: Session) -> broker_pb2.SessionInfo:
    usage = session.usage
    return broker_pb2.SessionInfo(
        session_id=session.id,
        domid=session.domid,
        vmid=session.vmid,
        pid=session.creds.pid,
        uid=session.creds.uid,
        gid=session.creds.gid,
        client_name=session.client_name,
        usage=broker_pb2.Usage(
            mappings=usage.mappings,
            mapped_grants=usage.mapped_grants,
            allocations=usage.allocations,
            granted_pages=usage.granted_pages,
            event_channels=usage.event_channels,
            dmabufs=usage.dmabufs,
            membufs=usage.membufs,
            subscriptions=usage.subscriptions,
        ),
        capabilities=capabilities_message(session.backend.capabilities),
    )


async def describe_session(session: Session, request: broker_pb2.DescribeSessionRequest) -> Reply[broker_pb2.SessionInfo]:
    return Reply(session_message(session))


class BrokerStatus:
    """The operator's view of the whole broker.

    Status lists every session.  With *requires_admin* only a call made within
    a session whose peer uid the policy names as admin may see it; otherwise
    any local caller may — the socket itself is the boundary (the default:
    mode 0660, so only root and the socket's group).
    """

    def __init__(self, registry: SessionRegistry, capabilities: Capabilities, *, requires_admin: bool) -> None:
        self.registry = registry
        self.capabilities = capabilities
        self.requires_admin = requires_admin
        self.started = time.monotonic()

    async def status(self, session: Session | None, request: broker_pb2.StatusRequest) -> Reply[broker_pb2.StatusResponse]:
        if self.requires_admin and (session is None or not self.registry.policy.is_admin(session.creds)):
            raise BrokerError(errno.EPERM, "status", "only an administrator's session may see every session")
        return Reply(
            broker_pb2.StatusResponse(
                version=__version__,
                capabilities=capabilities_message(self.capabilities),
                sessions=[session_message(s) for s in sorted(self.registry.sessions, key=lambda s: s.id)],
                open_fds=open_fd_count(),
                uptime_seconds=time.monotonic() - self.started,
            )
        )
