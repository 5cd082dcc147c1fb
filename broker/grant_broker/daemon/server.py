"""One broker: its sockets, the gRPC server and the fd channel listener, wired to the core.

``BrokerServer`` makes the core (the session registry, the route table) and
the transports (gRPC handlers built from the routes, the fd channel server)
and binds them to the two Unix sockets (and, with ``metrics``, serves the
metrics: :mod:`.metrics`).  It refuses to start over a live
broker's socket, removes a stale one, and on shutdown turns health to
NOT_SERVING, ends event streams, lets in-flight calls finish within the grace
period, releases every session and removes its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from grant_broker.backend.contract import Capabilities
from grant_broker.core.operations.broker import BrokerStatus, StatusView
from grant_broker.core.observe import NO_OBSERVER, CallObserver
from grant_broker.core.operations.evtchn import end_subscriptions
from grant_broker.core.policy import Limits, Policy
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.routes import Route, build_routes
from grant_broker_protocol.methods import SERVICES
from grant_broker.daemon.backends import BackendChoice, choose_backend
from grant_broker_protocol.unix_paths import claim_unix_path
from grant_broker.transport.fdchannel import FdChannelServer
from grant_broker.transport.grpc.handlers import generic_handlers
from grant_broker_protocol.endpoints import fd_channel_path
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import FdChannel

if TYPE_CHECKING:  # imported when the metrics are on (prometheus_client is not loaded otherwise)
    from grant_broker.daemon.metrics import BrokerMetrics
if TYPE_CHECKING:  # imported when the admin listener is configured
    from grant_broker.core.admin import DrainOutcome
    from grant_broker.daemon.admin import AdminAddress, AdminListener

log = logging.getLogger(__name__)

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
    # The largest legitimate request (a GrantCopy with a page of inline bytes
    # per segment).  grpc-python has no per-method receive limit: each call's
    # own limit is checked before decoding, and a call without a valid session
    # is refused before its request is read (transport/grpc/handlers.py).
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
    # The group of the sockets (and of a unix: metrics socket), so that clients in it connect
    # (``serve --socket-group``); None: the broker's own group.
    socket_group: int | None = None
    grace_seconds: float = 5.0
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)
    # Who sees which sessions in Status: "own" (default) — administrators
    # (policy.admin_uids) see all, others their own uid's, callers without a
    # session none; "all" — whoever can open the socket sees every session.
    status_view: StatusView = "own"
    # Calls as frames on the session's fd channel, for clients that ask (see fdchannel.proto).
    fast_path: bool = True
    # Where to serve the metrics (``serve --metrics``): "HOST:PORT", "[IPV6]:PORT",
    # ":PORT" (every interface) or "unix:PATH"; None: not served (daemon/metrics.py).
    metrics: str | None = None
    # The remote admin listener (``serve --admin-listen``, daemon/admin.py): "HOST:PORT" or
    # "[IPV6]:PORT", TLS only: the server's certificate and key and the CA of the clients'
    # certificates (PEM files) are required with it.  Who may do what: policy.admin_identities.
    admin_listen: str | None = None
    admin_cert: str | None = None
    admin_key: str | None = None
    admin_client_ca: str | None = None


RESTART_FIELDS = (
    "socket_path", "backend", "socket_mode", "socket_group", "fast_path", "metrics",
    "admin_listen", "admin_cert", "admin_key", "admin_client_ca",
)
"""What of a :class:`ServerConfig` a running broker cannot change (reload keeps these)."""


def _admin_address(config: ServerConfig) -> AdminAddress | None:
    """The admin listener's address, or None when there is none.

    Raises:
        BrokerError: EINVAL for an address that is not HOST:PORT, or a missing
            certificate, key or client CA (the listener is TLS only).
    """
    if config.admin_listen is None:
        return None
    from grant_broker.daemon.admin import AdminAddress

    try:
        address = AdminAddress.parse(config.admin_listen)
    except ValueError as exc:
        raise BrokerError(errno.EINVAL, "admin listener", str(exc)) from None
    missing = [option for option, value in (
        ("--admin-cert", config.admin_cert), ("--admin-key", config.admin_key), ("--admin-client-ca", config.admin_client_ca),
    ) if not value]
    if missing:
        raise BrokerError(
            errno.EINVAL, "admin listener",
            f"--admin-listen needs {', '.join(missing)}: the admin listener is TLS only, with client certificates",
        )
    return address


def _prepare_socket_path(path: str) -> None:
    """Create the directory and refuse one others could write; refuse a live
    broker's socket; remove a stale one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    check_socket_directory(directory)
    for candidate, kind in ((path, socket.SOCK_STREAM), (fd_channel_path(path), socket.SOCK_SEQPACKET)):
        claim_unix_path(candidate, kind, "listen", "another broker")


def socket_group_id(value: object) -> int:
    """``serve --socket-group`` / the ``socket_group`` key: a group name, or a numeric gid (an
    integer or a string of digits; a gid the host does not name is taken as it is: in a container
    the clients' group often has no name in the image).

    Raises:
        ValueError: neither a known group name nor a gid (the message says which).
    """
    import grp

    if isinstance(value, int) and not isinstance(value, bool):
        gid = value
    elif isinstance(value, str) and value.isdigit():
        gid = int(value)
    elif isinstance(value, str) and value:
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ValueError(f"no group is named {value!r} on this host (give its numeric gid instead)") from None
    else:
        raise ValueError(f"expected a group name or a numeric gid, got {value!r}")
    if not 0 <= gid < 2**32 - 1:
        raise ValueError(f"{value!r} is not a gid")
    return gid


def _warn_of_replaced_limits(configured: Limits, in_force: Limits, reloaded: Limits) -> None:
    """Log each limit changed at run time (the admin API's SetLimits: *in_force*
    differs from the *configured* one) that a reload replaces with the file's:
    the operator who set it should not learn of it from a refusal."""
    for spec in dataclasses.fields(Limits):
        name = spec.name
        set_at_run_time = getattr(in_force, name)
        if set_at_run_time != getattr(configured, name) and set_at_run_time != getattr(reloaded, name):
            log.warning(
                "reload: %s=%s, set at run time (set-limit), is replaced by the configuration's %s",
                name, set_at_run_time, getattr(reloaded, name),
            )


def _set_socket_access(path: str, mode: int, group: int | None) -> None:
    """Give a socket its group (when one is set) and then its mode: connecting
    takes write permission on the socket, so a client reaches it as its owner
    (the broker's user), a member of its group, or anyone, as *mode* says."""
    if group is not None:
        try:
            os.chown(path, -1, group)
        except OSError as exc:
            raise BrokerError(
                exc.errno or errno.EPERM, "listen",
                f"cannot give {path} to group {group}: {exc.strerror} (a broker not run as root can only "
                f"give its sockets to a group it is a member of)",
            ) from None
    os.chmod(path, mode)


def check_socket_directory(directory: str) -> None:
    """Refuse a socket directory that anyone but the broker's user (or root)
    could write: whoever can write there can replace the sockets with their
    own and capture the clients' hellos (their credentials and names, and the
    descriptors they send).  Group-writable counts (the group is typically the
    clients'), and so does a sticky directory such as /tmp itself (the names
    can be taken before the broker binds them).

    Raises:
        BrokerError: EPERM saying what is wrong and how to fix it.
    """
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise BrokerError(errno.ENOTDIR, "listen", f"the socket directory {directory} is not a directory")
    euid = os.geteuid()
    if info.st_uid not in (euid, 0):
        raise BrokerError(
            errno.EPERM,
            "listen",
            f"the socket directory {directory} belongs to uid {info.st_uid}, neither the broker's user (uid {euid}) "
            f"nor root: its owner could replace the broker's sockets and capture its clients' hellos; "
            f"chown it to uid {euid} or give --socket a path in a directory of the broker's own",
        )
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable:
        who = {stat.S_IWGRP: "its group", stat.S_IWOTH: "every user"}.get(writable, "its group and every user")
        raise BrokerError(
            errno.EPERM,
            "listen",
            f"the socket directory {directory} is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"they could replace the broker's sockets and capture its clients' hellos; make it writable by its "
            f"owner only (chmod go-w {directory}) or give --socket a path in a directory of the broker's own",
        )


class BrokerServer:
    """One broker: start(), then wait_closed(); stop() from anywhere in the loop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._backend: BackendChoice | None = None
        self._server: grpc.aio.Server | None = None
        self._fd_listener: socket.socket | None = None
        self._fd_channels: FdChannelServer | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()
        self.registry: SessionRegistry | None = None
        self.metrics: BrokerMetrics | None = None
        # The remote admin listener, when configured (its ``address`` is where it listens).
        self.admin_listener: AdminListener | None = None
        self._ending = False
        self._stopped = asyncio.Event()
        self._status: BrokerStatus | None = None

    @property
    def capabilities(self) -> Capabilities:
        assert self._backend is not None
        return self._backend.capabilities

    async def start(self) -> None:
        config = self.config
        metrics_address = None
        if config.metrics is not None:
            from grant_broker.daemon.metrics import BrokerMetrics, MetricsAddress

            try:
                metrics_address = MetricsAddress.parse(config.metrics)
            except ValueError as exc:
                raise BrokerError(errno.EINVAL, "metrics", str(exc)) from None
        admin_address = _admin_address(config)
        _prepare_socket_path(config.socket_path)
        self._backend = choose_backend(config.backend)
        self.registry = SessionRegistry(self._backend.provider, config.policy, config.limits)
        status = BrokerStatus(self.registry, self._backend.capabilities, view=config.status_view)
        self._status = status
        routes = build_routes(status, streams_ended=lambda: self._ending)
        observer: CallObserver = NO_OBSERVER
        if metrics_address is not None or admin_address is not None:  # (the admin listener gives a metrics snapshot)
            from grant_broker.daemon.metrics import BrokerMetrics

            self.metrics = BrokerMetrics(
                self.registry, backend=self._backend.capabilities.backend, gntalloc_pool=self._backend.gntalloc_pool
            )
            observer = self.metrics.calls
        self._fd_channels = FdChannelServer(self.registry, routes if config.fast_path else (), observer)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        self._add_services(server, routes, observer)
        try:
            server.add_insecure_port(f"unix:{config.socket_path}")
            await server.start()
            self._server = server
            _set_socket_access(config.socket_path, config.socket_mode, config.socket_group)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            self._fd_listener = listener
            listener.bind(fd_channel_path(config.socket_path))
            _set_socket_access(fd_channel_path(config.socket_path), config.socket_mode, config.socket_group)
            # Room for every session to reconnect at once (after a restart); the kernel caps it at somaxconn.
            listener.listen(max(256, config.limits.max_sessions))
            listener.setblocking(False)
            if admin_address is not None:
                await self._start_admin_listener(admin_address, status)
            if self.metrics is not None and metrics_address is not None:
                await self.metrics.serve(metrics_address, socket_mode=config.socket_mode)
                if metrics_address.path is not None:
                    _set_socket_access(metrics_address.path, config.socket_mode, config.socket_group)
        except BaseException:
            await self._shutdown(grace=0)
            raise
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_fd_channels())
        # One turn for the accept loop to take its spare descriptor: from the
        # moment the broker says it serves (READY=1), it holds what it holds
        # until a client comes — a baseline to count leaks against.
        await asyncio.sleep(0)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in self._service_names():
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @staticmethod
    def _service_names() -> list[str]:
        return [service.full_name for service in SERVICES.values()]

    def _add_services(self, server: grpc.aio.Server, routes: tuple[Route, ...], observer: CallObserver = NO_OBSERVER) -> None:
        registry = self.registry
        assert registry is not None
        server.add_generic_rpc_handlers(generic_handlers(registry, routes, observer))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]  # unannotated in its stubs
            reflection.aio.ReflectionServicer([*self._service_names(), health.SERVICE_NAME, reflection.SERVICE_NAME]),
            server,
        )

    async def _accept_fd_channels(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._fd_listener is not None and self._fd_channels is not None
        # A descriptor kept in reserve: when the broker is out of them, it is
        # given up for a moment to accept the waiting client and tell it so
        # (instead of leaving it in the backlog with no answer).
        spare: int | None = None
        retry: asyncio.TimerHandle | None = None

        def keep_spare() -> None:
            # Taken again as soon as a descriptor is free, whether or not a
            # client comes meanwhile: a spare lost for good would leave the
            # next clients unanswered in the backlog at the next shortage.
            nonlocal spare, retry
            retry = None
            try:
                spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                retry = loop.call_later(0.1, keep_spare)

        keep_spare()
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
                        keep_spare()
                    # Back off instead of spinning while descriptors are short.
                    await asyncio.sleep(0.1)
                    continue
                self._fd_channels.accept(FdChannel(conn))
        finally:
            if retry is not None:
                retry.cancel()
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
        channel = FdChannel(conn)
        channel.send_error_nowait(
            "the broker is out of file descriptors and cannot open a session now; try again later", code
        )
        channel.close()

    def reconfigure(self, new: ServerConfig) -> list[str]:
        """Apply what of *new* a running broker can change — the policy, the
        limits, the status view, the grace period — without touching a session.

        Returns the names of the :data:`RESTART_FIELDS` that differ: those keep
        their running values until the broker restarts."""
        assert self.registry is not None and self._status is not None
        old = self.config
        needs_restart = [name for name in RESTART_FIELDS if getattr(new, name) != getattr(old, name)]
        _warn_of_replaced_limits(old.limits, self.registry.limits, new.limits)
        self.registry.reconfigure(policy=new.policy, limits=new.limits)
        self._status.view = new.status_view
        self.config = dataclasses.replace(new, **{name: getattr(old, name) for name in RESTART_FIELDS})
        return needs_restart

    async def _start_admin_listener(self, address: AdminAddress, status: BrokerStatus) -> None:
        from grant_broker.core.admin import Administration
        from grant_broker.daemon.admin import AdminListener, AdminTls

        config = self.config
        assert self.registry is not None and config.admin_cert and config.admin_key and config.admin_client_ca
        metrics = self.metrics
        snapshot = None
        if metrics is not None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            def snapshot() -> tuple[str, bytes]:
                return CONTENT_TYPE_LATEST, generate_latest(metrics.registry)

        async def drain(deadline: float, release_at_deadline: bool) -> DrainOutcome:
            return await self.drain(deadline, release_at_deadline=release_at_deadline)

        admin = Administration(self.registry, status, metrics=snapshot, drain=drain)
        tls = AdminTls(config.admin_cert, config.admin_key, config.admin_client_ca)
        listener = AdminListener(admin, address, tls, self._health)
        self.admin_listener = listener
        await listener.start()

    async def drain(self, deadline: float, *, release_at_deadline: bool = False) -> DrainOutcome:
        """Stop taking sessions and wait for the live ones to end: health
        NOT_SERVING (every service, and the overall status), new sessions
        refused (EAGAIN, UNAVAILABLE), then up to *deadline* seconds for the
        sessions to end; with *release_at_deadline*, those still there are
        then released as if their clients had crashed.  The broker keeps
        serving the sessions meanwhile, and stays up (NOT_SERVING) afterwards:
        :meth:`stop` ends it.  Called by the admin API's Drain."""
        from grant_broker.core.admin import drain_sessions

        assert self.registry is not None
        for name in ("", *self._service_names()):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        return await drain_sessions(self.registry, deadline, release_at_deadline=release_at_deadline)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, drain calls within *grace*, release sessions."""
        await self._shutdown(self.config.grace_seconds if grace is None else grace)

    async def _shutdown(self, grace: float) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        if self.admin_listener is not None:
            await self.admin_listener.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._fd_listener is not None:
            self._fd_listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fd_channel_path(self.config.socket_path))
        if self.registry is not None:
            # Event streams never end by themselves: end them now (and refuse
            # new ones) so that they do not hold the grace period up to its last second.
            self._ending = True
            end_subscriptions(self.registry)
        if self._server is not None:
            await self._server.stop(grace)
        if self._fd_channels is not None:
            await self._fd_channels.close()
        if self.registry is not None:
            self.registry.close()
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
