"""Broker operations: the calling session as the broker sees it, and the operator's status view."""

from __future__ import annotations

import time
from typing import Literal

from grant_broker import __version__
from grant_broker.backend.contract import Capabilities
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
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
        dmabuf_export=capabilities.dmabuf_export,
        dmabuf_import=capabilities.dmabuf_import,
        dmabuf_export_missing=capabilities.dmabuf_export_missing,
        dmabuf_import_missing=capabilities.dmabuf_import_missing,
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


StatusView = Literal["own", "all"]
"""Who sees what in Status (``ServerConfig.status_view``, ``serve --status-view``):

* ``"own"`` (the default): an administrator's session (``Policy.admin_uids``,
  root by default) sees every session and the broker's descriptor count; any
  other session sees only the sessions of its own uid; a call without a
  session sees no session at all (gRPC over a Unix socket carries no peer
  credentials, so such a caller is nobody in particular — possibly a uid the
  policy refuses).  Everyone sees the version, capabilities and uptime.
* ``"all"``: everyone who can open the socket sees everything.
"""

STATUS_VIEWS: tuple[StatusView, ...] = ("own", "all")


class BrokerStatus:
    """The operator's view of the whole broker, narrowed to the caller's own
    sessions unless the caller is an administrator (see :data:`StatusView`)."""

    def __init__(self, registry: SessionRegistry, capabilities: Capabilities, *, view: StatusView = "own") -> None:
        if view not in STATUS_VIEWS:
            raise ValueError(f"status view {view!r} is not one of {', '.join(STATUS_VIEWS)}")
        self.registry = registry
        self.capabilities = capabilities
        self.view = view
        self.started = time.monotonic()

    def sees_all(self, session: Session | None) -> bool:
        """Whether a call within *session* (``None``: without one) sees every session."""
        return self.view == "all" or (session is not None and self.registry.policy.is_admin(session.creds))

    async def status(self, session: Session | None, request: broker_pb2.StatusRequest) -> Reply[broker_pb2.StatusResponse]:
        full = self.sees_all(session)
        return Reply(self.snapshot(full=full, uid=None if full or session is None else session.creds.uid))

    def snapshot(self, *, full: bool, uid: int | None = None) -> broker_pb2.StatusResponse:
        """The status: every session and the broker's descriptor count (*full*),
        or only the sessions of *uid* (``None``: none)."""
        sessions = sorted(self.registry.sessions, key=lambda s: s.id)
        if not full:
            sessions = [s for s in sessions if s.creds.uid == uid]
        return (
            broker_pb2.StatusResponse(
                version=__version__,
                capabilities=capabilities_message(self.capabilities),
                sessions=[session_message(s) for s in sessions],
                # The broker's own descriptor count tells how busy everyone is: administrators only.
                open_fds=open_fd_count() if full else 0,
                uptime_seconds=time.monotonic() - self.started,
            )
        )
