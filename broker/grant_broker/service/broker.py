"""The Broker service: the calling session, and the operator's status view."""

from __future__ import annotations

import errno
import time

import grpc

from grant_broker import __version__
from grant_broker.backend.contract import Capabilities
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import open_fd_count
from grant_broker.service.session import Session, SessionRegistry
from grant_broker.service.status import rpc
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc


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


class BrokerService(broker_pb2_grpc.BrokerServicer):
    def __init__(self, registry: SessionRegistry, capabilities: Capabilities, may_administer: "AdminCheck") -> None:
        self.registry = registry
        self.capabilities = capabilities
        self.may_administer = may_administer
        self.started = time.monotonic()

    @rpc
    async def DescribeSession(
        self, request: broker_pb2.DescribeSessionRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.SessionInfo:
        return session_message(self.registry.session_for(context))

    @rpc
    async def Status(self, request: broker_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> broker_pb2.StatusResponse:
        if not self.may_administer(context):
            raise BrokerError(errno.EPERM, "status", "only an administrator's session may see every session")
        return broker_pb2.StatusResponse(
            version=__version__,
            capabilities=capabilities_message(self.capabilities),
            sessions=[session_message(s) for s in sorted(self.registry.sessions, key=lambda s: s.id)],
            open_fds=open_fd_count(),
            uptime_seconds=time.monotonic() - self.started,
        )


class AdminCheck:
    """Status is for administrators: a call made within a session whose peer uid
    the policy names as admin — or any local caller when the socket itself
    is the boundary (the default: mode 0660, so only root and the group)."""

    def __init__(self, registry: SessionRegistry, require_admin_session: bool) -> None:
        self.registry = registry
        self.require_admin_session = require_admin_session

    def __call__(self, context: grpc.aio.ServicerContext) -> bool:
        if not self.require_admin_session:
            return True
        try:
            session = self.registry.session_for(context)
        except BrokerError:
            return False
        return session.creds.uid in self.registry.policy.admin_uids
