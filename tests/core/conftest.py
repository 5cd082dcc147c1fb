"""Sessions for the core's unit tests: no server, no gRPC.

A :class:`~grant_broker.core.session.Session` is made directly, on the
emulated hypervisor, acting as domain ``SELF``; its connection object is one
end of a ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` wrapped in an ``FdChannel``
(the other end stands for the client and is closed at the end of the test).
Domain ``PEER`` is the other side: it grants pages to ``SELF`` with its own
gntalloc instance (:meth:`Core.grant`).  Every test using ``core`` fails if it
leaves a descriptor open (``fd_baseline``).
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from grant_broker.backend.contract import Backend, GntallocInstance, GrantAllocation, MemorySpan
from grant_broker.backend.emulated import EmulatedHypervisor
from grant_broker.core.events import EventHub
from grant_broker.core.policy import Limits, Policy
from grant_broker.core.registry import BackendProvider, SessionRegistry
from grant_broker.core.session import Session
from grant_broker_protocol.abi import MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM
from grant_broker_protocol.fdchannel import FdChannel, PeerCredentials

SELF = 1  # the session's domain
PEER = 2  # the domain that grants to it


@dataclass
class Granted:
    """Pages of PEER granted to SELF: the allocation and PEER's own view of them."""

    allocation: GrantAllocation
    spans: list[MemorySpan]

    @property
    def refs(self) -> list[int]:
        return list(self.allocation.refs)


@dataclass
class Core:
    hypervisor: EmulatedHypervisor
    peer: Backend
    peer_gntalloc: GntallocInstance
    event_hub: EventHub = field(default_factory=EventHub)  # of the sessions made directly
    _registries: list[SessionRegistry] = field(default_factory=list)
    _client_ends: list[socket.socket] = field(default_factory=list)
    _sessions: list[Session] = field(default_factory=list)
    _client_of: dict[Session, socket.socket] = field(default_factory=dict)
    _granted: list[Granted] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def registry(self) -> SessionRegistry:
        """The default registry (default policy and limits), made on first use."""
        if not self._registries:
            self.new_registry()
        return self._registries[0]

    def channel(self) -> tuple[FdChannel, socket.socket]:
        """An fd channel for a session, and the client's end of it (closed by the fixture)."""
        broker_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._client_ends.append(client_end)
        return FdChannel(broker_end), client_end

    def session(
        self,
        limits: Limits | None = None,
        *,
        uid: int | None = None,
        domid: int = SELF,
        vmid: int = MEM_BUF_VMID_PRIMARY_VM,
        name: str = "core test",
    ) -> Session:
        """A session acting as *domid*, made directly (not through the registry)."""
        channel, client_end = self.channel()
        creds = PeerCredentials(os.getpid(), os.getuid() if uid is None else uid, os.getgid())
        backend = self.hypervisor.backend(domid, vmid=vmid)
        session = Session(next(self._ids), channel, creds, backend, name, limits or Limits(), self.event_hub)
        self._sessions.append(session)
        self._client_of[session] = client_end
        return session

    def new_registry(self, policy: Policy | None = None, limits: Limits | None = None) -> SessionRegistry:
        """A registry of sessions on this hypervisor (closed by the fixture)."""
        hypervisor = self.hypervisor

        def backend_for(domid: int | None, vmid: int | None) -> Backend:
            return hypervisor.backend(
                SELF if domid is None else domid, vmid=MEM_BUF_VMID_PRIMARY_VM if vmid is None else vmid
            )

        registry = SessionRegistry(BackendProvider(backend_for, any_domain=True), policy or Policy(), limits or Limits())
        self._registries.append(registry)
        return registry

    def registered(
        self,
        registry: SessionRegistry | None = None,
        *,
        uid: int | None = None,
        domid: int | None = SELF,
        name: str = "core test",
    ) -> Session:
        """A session opened through *registry* (default: ``self.registry``), as the fd channel server does."""
        channel, client_end = self.channel()
        creds = PeerCredentials(os.getpid(), os.getuid() if uid is None else uid, os.getgid())
        try:
            session = (registry or self.registry).open(channel, creds, name, domid, None)
        except BaseException:
            channel.close()
            raise
        self._sessions.append(session)
        self._client_of[session] = client_end
        return session

    def hang_up(self, session: Session) -> None:
        """The client of *session* goes away (closes its end of the fd channel)."""
        self._client_of[session].close()

    def grant(self, count: int = 1, *, writable: bool = True, to: int = SELF) -> Granted:
        """*count* pages of PEER, granted to *to* in one allocation."""
        allocation = self.peer_gntalloc.alloc_gref(to, count, writable=writable)
        granted = Granted(allocation, self.peer_gntalloc.memory_spans(allocation.index, allocation.count))
        self._granted.append(granted)
        return granted

    def close(self) -> None:
        for registry in self._registries:
            registry.close()
        for session in self._sessions:
            session.release()
        for client_end in self._client_ends:
            client_end.close()
        for granted in self._granted:
            for span in granted.spans:
                span.close()
        self.peer_gntalloc.close()
        self.peer.close()
        self.hypervisor.close()


@pytest.fixture
def core(fd_baseline: None) -> Iterator[Core]:
    hypervisor = EmulatedHypervisor()
    peer = hypervisor.backend(PEER, vmid=MEM_BUF_VMID_TRUSTED_VM)
    state = Core(hypervisor, peer, peer.open_gntalloc())
    try:
        yield state
    finally:
        state.close()
