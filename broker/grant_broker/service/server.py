"""The broker daemon: gRPC on a Unix socket, the fd channel beside it, one event loop.

``BrokerServer`` wires the pieces: the backend provider (emulated hypervisor
or real devices), the session registry, the servicers, health checking and
reflection.  It refuses to start over a live broker's socket, removes a stale
one, and on shutdown turns health to NOT_SERVING, lets in-flight calls finish
within the grace period, releases every session and removes its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from grant_broker.backend.contract import Backend, Capabilities
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.endpoints import fd_channel_path
from grant_broker_protocol.fdchannel import FdChannel
from grant_broker_protocol.v1.fdchannel_pb2 import FdFrame, ProtocolError as ProtocolErrorFrame
from grant_broker.service.broker import AdminCheck, BrokerService
from grant_broker.service.session import BackendProvider, Limits, Policy, SessionRegistry
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "emulated", "xen")

MAX_QUEUED_CALLS = 65536
"""Calls the server accepts before the event loop has picked them up.

grpc core keeps calls that arrived but that the application has not asked
for yet (grpc.aio asks for one at a time) in a backlog, and sheds it by
"random early detection" between ``grpc.server.max_pending_requests``
(default 1000) and ``..._hard_limit`` (default 3000): a burst of a few
thousand calls on one connection — 3000 unary calls in flight from one
grpc.aio channel — saw part of them end CANCELLED (about 1 in 6 at 3000,
1 in 3 at 5000, measured).  Lowering ``grpc.max_concurrent_streams`` instead
does not help: the client opens streams beyond it anyway and the server
refuses them (RST_STREAM REFUSED_STREAM, UNAVAILABLE).  So the backlog is
made deterministic and large; the SDK additionally bounds the calls one
session has in flight (``connect(max_in_flight=...)``).  See
tests/reliability/test_load.py.
"""

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.server.max_pending_requests", MAX_QUEUED_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_QUEUED_CALLS),
]


@dataclass
class ServerConfig:
    socket_path: str
    backend: str = "auto"
    socket_mode: int = 0o660
    grace_seconds: float = 5.0
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)
    # Status shows every session; by default anyone who can open the socket may ask.
    status_requires_admin: bool = False


@dataclass
class _BackendChoice:
    provider: BackendProvider
    capabilities: Capabilities
    close: Callable[[], None]


def choose_backend(kind: str) -> _BackendChoice:
    """The real devices when present (``auto``), else the emulated hypervisor."""
    if kind not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(BACKEND_CHOICES)}")
    if kind == "xen" or (kind == "auto" and os.path.exists("/dev/xen/gntdev")):
        try:
            from grant_broker.backend.xen import XenBackend  # type: ignore[import-not-found]
        except ImportError:
            if kind == "xen":
                raise BrokerError(errno.ENODEV, "choose backend", "this build has no Xen backend yet") from None
            log.warning("/dev/xen exists but this build has no Xen backend; using the emulated hypervisor")
        else:
            probe = XenBackend.open()
            capabilities = probe.capabilities
            probe.close()

            def xen_backend(domid: int | None, vmid: int | None) -> Backend:
                backend = XenBackend.open()
                if domid is not None and domid != backend.domid:
                    backend.close()
                    raise BrokerError(errno.EPERM, "open session", f"this host's broker runs in domain {backend.domid}; a session cannot act as domain {domid}")
                return backend

            return _BackendChoice(BackendProvider(xen_backend, any_domain=False), capabilities, lambda: None)
    from grant_broker.backend.emulated import EmulatedHypervisor
    from grant_broker.uapi.mem_buf import MEM_BUF_VMID_PRIMARY_VM

    hypervisor = EmulatedHypervisor()

    def emulated_backend(domid: int | None, vmid: int | None) -> Backend:
        return hypervisor.backend(0 if domid is None else domid, vmid=MEM_BUF_VMID_PRIMARY_VM if vmid is None else vmid)

    probe = hypervisor.backend(0)
    capabilities = probe.capabilities
    probe.close()
    return _BackendChoice(BackendProvider(emulated_backend, any_domain=True), capabilities, hypervisor.close)


def _prepare_socket_path(path: str) -> None:
    """Refuse a live broker's socket; remove a stale one; create the directory."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    for candidate, kind in ((path, socket.SOCK_STREAM), (fd_channel_path(path), socket.SOCK_SEQPACKET)):
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(mode):
            raise BrokerError(errno.EEXIST, "listen", f"{candidate} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.settimeout(1.0)
            probe.connect(candidate)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", candidate)
            os.unlink(candidate)
        except OSError as exc:
            raise BrokerError(exc.errno or errno.EIO, "listen", f"cannot probe {candidate}: {exc.strerror}") from None
        else:
            raise BrokerError(errno.EADDRINUSE, "listen", f"another broker is serving on {candidate}")
        finally:
            probe.close()


class _GenericHandlersOnly:
    """The gRPC server as the generated ``add_*Servicer_to_server`` functions see
    it, without ``add_registered_method_handlers``.

    Those functions register every method twice: in a generic handler and as
    a "registered method".  grpc.aio (1.85) keeps one pending call request per
    registered method, and its accept loop ``asyncio.wait``s on all of them —
    for every incoming call, twice; with the broker's methods that is some
    20 futures each time, about 40 µs of event-loop time per call.  The
    generic handlers alone serve every method through one pending request
    (a dict look-up per handler to find the method).
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        pass  # served by the generic handler added with them


class BrokerServer:
    """One broker: start(), then wait_closed(); stop() from anywhere in the loop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._backend: _BackendChoice | None = None
        self._server: grpc.aio.Server | None = None
        self._fd_listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()
        self.registry: SessionRegistry | None = None
        self._evtchn_service: Any = None
        self._stopped = asyncio.Event()

    @property
    def capabilities(self) -> Capabilities:
        assert self._backend is not None
        return self._backend.capabilities

    async def start(self) -> None:
        config = self.config
        _prepare_socket_path(config.socket_path)
        self._backend = choose_backend(config.backend)
        self.registry = SessionRegistry(self._backend.provider, config.policy, config.limits)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        self._add_servicers(server)
        try:
            server.add_insecure_port(f"unix:{config.socket_path}")
            await server.start()
            self._server = server
            os.chmod(config.socket_path, config.socket_mode)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            self._fd_listener = listener
            listener.bind(fd_channel_path(config.socket_path))
            os.chmod(fd_channel_path(config.socket_path), config.socket_mode)
            # Room for every session to reconnect at once (after a restart); the kernel caps it at somaxconn.
            listener.listen(max(256, config.limits.max_sessions))
            listener.setblocking(False)
        except BaseException:
            await self._shutdown(grace=0)
            raise
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_fd_channels())
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in self._service_names():
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _service_names(self) -> list[str]:
        from grant_broker_protocol.v1 import evtchn_pb2, gntalloc_pb2, gntdev_pb2, membuf_pb2

        return [
            broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name,
            gntdev_pb2.DESCRIPTOR.services_by_name["Gntdev"].full_name,
            gntalloc_pb2.DESCRIPTOR.services_by_name["Gntalloc"].full_name,
            evtchn_pb2.DESCRIPTOR.services_by_name["Evtchn"].full_name,
            membuf_pb2.DESCRIPTOR.services_by_name["MemBuf"].full_name,
        ]

    def _add_servicers(self, grpc_server: grpc.aio.Server) -> None:
        from grant_broker.service.evtchn import EvtchnService
        from grant_broker.service.gntalloc import GntallocService
        from grant_broker.service.gntdev import GntdevService
        from grant_broker.service.membuf import MemBufService
        from grant_broker_protocol.v1 import evtchn_pb2_grpc, gntalloc_pb2_grpc, gntdev_pb2_grpc, membuf_pb2_grpc

        registry = self.registry
        assert registry is not None and self._backend is not None
        server = _GenericHandlersOnly(grpc_server)
        admin = AdminCheck(registry, self.config.status_requires_admin)
        broker_pb2_grpc.add_BrokerServicer_to_server(BrokerService(registry, self._backend.capabilities, admin), server)
        gntdev_pb2_grpc.add_GntdevServicer_to_server(GntdevService(registry), server)
        gntalloc_pb2_grpc.add_GntallocServicer_to_server(GntallocService(registry), server)
        self._evtchn_service = EvtchnService(registry)
        evtchn_pb2_grpc.add_EvtchnServicer_to_server(self._evtchn_service, server)
        membuf_pb2_grpc.add_MemBufServicer_to_server(MemBufService(registry), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        # reflection.enable_server_reflection, without its isinstance check
        # of the server (which would pick the sync servicer for the wrapper).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer([*self._service_names(), health.SERVICE_NAME, reflection.SERVICE_NAME]),
            server,
        )

    async def _accept_fd_channels(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._fd_listener is not None and self.registry is not None
        # A descriptor kept in reserve: when the broker is out of them, it is
        # given up for a moment to accept the waiting client and tell it so
        # (instead of leaving it in the backlog with no answer).
        spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(self._fd_listener)
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    log.error("cannot accept an fd channel: %s", exc.strerror)
                    if spare is not None:
                        os.close(spare)
                        spare = None
                        self._refuse_waiting_client(exc.errno)
                        with contextlib.suppress(OSError):
                            spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    # Back off instead of spinning while descriptors are short.
                    await asyncio.sleep(0.1)
                    continue
                self.registry.accept(FdChannel(conn))
        finally:
            if spare is not None:
                os.close(spare)

    def _refuse_waiting_client(self, code: int) -> None:
        """Accept one waiting fd channel with the spare descriptor and refuse it
        with *code* (EMFILE/ENFILE): the client gets a precise error now."""
        assert self._fd_listener is not None
        try:
            conn, _ = self._fd_listener.accept()
        except OSError:
            return
        with conn:
            with contextlib.suppress(OSError):
                frame = FdFrame(error=ProtocolErrorFrame(
                    message="the broker is out of file descriptors and cannot open a session now; try again later",
                    errno=code,
                ))
                conn.send(frame.SerializeToString(), socket.MSG_DONTWAIT)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, drain calls within *grace*, release sessions."""
        await self._shutdown(self.config.grace_seconds if grace is None else grace)

    async def _shutdown(self, grace: float) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._fd_listener is not None:
            self._fd_listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fd_channel_path(self.config.socket_path))
        if self._evtchn_service is not None:
            # Event streams never end by themselves: end them now so that
            # they do not hold the grace period up to its last second.
            self._evtchn_service.end_streams()
        if self._server is not None:
            await self._server.stop(grace)
        if self.registry is not None:
            await self.registry.close()
        if self._backend is not None:
            self._backend.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket_path)

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> "BrokerServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(grace=0)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return (soft, hard).

    Each session holds a few descriptors in the broker (its fd channel, its
    device instances, pending and exported descriptors): about 4.6 per
    session under mixed load (tests/reliability/test_load.py), so the usual
    soft limit of 1024 would end at ~200 sessions with EMFILE.  The broker
    never uses select(), so a high limit costs nothing (Go does the same at
    start).  The hard limit stays whatever the service manager set."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


async def serve(config: ServerConfig, ready: Callable[[BrokerServer], None] | None = None) -> None:
    """Run a broker until SIGTERM/SIGINT: the first drains gracefully, a second exits at once."""
    soft, _ = raise_nofile_limit()
    log.info("descriptor limit: %d", soft)
    server = BrokerServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping is None:
            log.info("%s: shutting down (grace %.1fs); send it again to exit at once", signal.Signals(signum).name, config.grace_seconds)
            stopping = loop.create_task(server.stop())
        else:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            stopping.cancel()
            loop.create_task(server._shutdown(grace=0))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        if ready is not None:
            ready(server)
        await server.wait_closed()
        if stopping is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server._shutdown(grace=0)
