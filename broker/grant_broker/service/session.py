"""Client sessions: who is connected, what each holds, and its release.

A session is born when a client's fd channel (SOCK_SEQPACKET) says hello and
its peer credentials pass the policy; it dies when that connection closes,
whatever the reason.  It owns its own device instances — opened lazily — and
every descriptor, mapping, grant and port it created; :meth:`Session.release`
gives all of them back, which fires the unmap notifications of its mappings.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import secrets
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from grant_broker.backend.contract import (
    Backend,
    EvtchnHandle,
    GntallocInstance,
    GntdevInstance,
    MemBufDevice,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import (
    MAX_FDS_PER_FRAME,
    PROTOCOL_VERSION,
    ChannelClosed,
    DescriptorsDropped,
    FdChannel,
    PeerCredentials,
    ProtocolError,
)
from grant_broker_protocol.endpoints import SESSION_METADATA_KEY
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.v1.fdchannel_pb2 import FdFrame, FdTransfer, ProtocolError as ProtocolErrorFrame, ServerHello

log = logging.getLogger(__name__)

_State = TypeVar("_State")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may hold; the broker's own quotas (the kernel has almost none)."""

    max_sessions: int = 4096
    max_sessions_per_uid: int = 1024
    max_grants_per_session: int = 65536
    max_ports_per_session: int = 4096
    max_pending_fd_frames: int = 16
    max_subscriptions_per_session: int = 64
    max_map_memory_per_mapping: int = 64
    fd_frame_wait_seconds: float = 5.0
    hello_timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may open a session.  ``allowed_uids``/``allowed_gids`` empty = anyone the
    socket permissions let in (the socket is mode 0660)."""

    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    admin_uids: frozenset[int] = frozenset({0})

    def admits(self, creds: PeerCredentials) -> bool:
        if not self.allowed_uids and not self.allowed_gids:
            return True
        return creds.uid in self.allowed_uids or creds.gid in self.allowed_gids or creds.uid == 0


class BackendProvider:
    """Gives each session the backend of the domain it acts as."""

    def __init__(self, backend_for: Callable[[int | None, int | None], Backend], any_domain: bool) -> None:
        self._backend_for = backend_for
        self.any_domain = any_domain

    def backend(self, domid: int | None, vmid: int | None) -> Backend:
        return self._backend_for(domid, vmid)


@dataclass
class Usage:
    mappings: int = 0
    mapped_grants: int = 0
    allocations: int = 0
    granted_pages: int = 0
    event_channels: int = 0
    dmabufs: int = 0
    membufs: int = 0
    subscriptions: int = 0


class Session:
    """One authenticated client connection and everything it holds."""

    def __init__(
        self,
        session_id: int,
        channel: FdChannel,
        creds: PeerCredentials,
        backend: Backend,
        client_name: str,
        limits: Limits,
    ) -> None:
        self.id = session_id
        self.token = secrets.token_urlsafe(32)
        self.channel = channel
        self.creds = creds
        self.backend = backend
        self.client_name = client_name
        self.limits = limits
        self.created = time.monotonic()
        self.usage = Usage()
        self.closed = asyncio.Event()
        # Per-service state, owned by the servicer that created it; the
        # servicer registers its release with on_release().
        self.resources: dict[str, Any] = {}
        self._gntdev: GntdevInstance | None = None
        self._gntalloc: GntallocInstance | None = None
        self._evtchn: EvtchnHandle | None = None
        self._membuf: MemBufDevice | None = None
        self._next_transfer = itertools.count(1)
        self._incoming: dict[int, list[OwnedFd]] = {}
        self._failed_incoming: dict[int, BrokerError] = {}
        self._incoming_waiters: dict[int, asyncio.Future[list[OwnedFd]]] = {}
        self._send_lock = asyncio.Lock()
        self._cleanups: list[Callable[[], object]] = []

    # ---------------------------------------------------------------- devices

    @property
    def domid(self) -> int:
        return self.backend.domid

    @property
    def vmid(self) -> int:
        return self.backend.vmid

    @property
    def gntdev(self) -> GntdevInstance:
        if self._gntdev is None:
            self._check_live()
            self._gntdev = self.backend.open_gntdev()
        return self._gntdev

    @property
    def gntalloc(self) -> GntallocInstance:
        if self._gntalloc is None:
            self._check_live()
            self._gntalloc = self.backend.open_gntalloc()
        return self._gntalloc

    @property
    def evtchn(self) -> EvtchnHandle:
        if self._evtchn is None:
            self._check_live()
            self._evtchn = self.backend.open_evtchn()
        return self._evtchn

    @property
    def membuf(self) -> MemBufDevice:
        if self._membuf is None:
            self._check_live()
            self._membuf = self.backend.open_membuf()
        return self._membuf

    def _check_live(self) -> None:
        # A released session must not open devices that nobody would close.
        if self.closed.is_set():
            raise BrokerError(errno.EPIPE, "session", f"session {self.id} has ended")

    def service_state(self, key: str, factory: Callable[[], _State]) -> _State:
        """A servicer's state for this session under *key*, made by *factory* on
        first use; its ``close()``, if it has one, runs when the session is released."""
        state = self.resources.get(key)
        if state is None:
            state = self.resources[key] = factory()
            close = getattr(state, "close", None)
            if close is not None:
                self.on_release(close)
        return state  # type: ignore[no-any-return]

    def on_release(self, cleanup: Callable[[], object]) -> None:
        """Run *cleanup* when the session is released (last registered runs first)."""
        self._cleanups.append(cleanup)

    def check_quota(self, operation: str, what: str, used: int, adding: int, limit: int) -> None:
        if used + adding > limit:
            raise BrokerError(
                errno.EDQUOT,
                operation,
                f"this session holds {used} {what} and asked for {adding} more; the limit is {limit}",
            )

    # ---------------------------------------------------------------- descriptors

    async def send_fds(self, fds: Sequence[int]) -> int:
        """Send *fds* (borrowed) in frames on the fd channel; return the transfer id
        the response names.  More than MAX_FDS_PER_FRAME go as several frames
        under the same id, in order."""
        transfer_id = next(self._next_transfer)
        chunks = [fds[i : i + MAX_FDS_PER_FRAME] for i in range(0, len(fds), MAX_FDS_PER_FRAME)] or [[]]
        async with self._send_lock:
            for chunk in chunks:
                frame = FdFrame(transfer=FdTransfer(transfer_id=transfer_id, fd_count=len(chunk)))
                await self.channel.send(frame, chunk)
        return transfer_id

    def accept_incoming(self, transfer_id: int, fds: list[OwnedFd]) -> None:
        """A client's FdTransfer frame arrived (called by the channel reader)."""
        if transfer_id == 0:
            raise ProtocolError("transfer id 0 is reserved")
        waiter = self._incoming_waiters.pop(transfer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(fds)
            return
        self._check_new_transfer(transfer_id)
        self._incoming[transfer_id] = fds

    def refuse_incoming(self, transfer_id: int, error: BrokerError) -> None:
        """A client's FdTransfer frame arrived but the broker could not receive
        its descriptors (it is out of them): the call naming the transfer
        fails with *error*, and the session goes on — the client did nothing
        wrong."""
        if transfer_id == 0:
            raise ProtocolError("transfer id 0 is reserved")
        waiter = self._incoming_waiters.pop(transfer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
            return
        self._check_new_transfer(transfer_id)
        self._failed_incoming[transfer_id] = error

    def _check_new_transfer(self, transfer_id: int) -> None:
        if transfer_id in self._incoming or transfer_id in self._failed_incoming:
            raise ProtocolError(f"transfer id {transfer_id} used twice")
        if len(self._incoming) + len(self._failed_incoming) >= self.limits.max_pending_fd_frames:
            raise ProtocolError(
                f"more than {self.limits.max_pending_fd_frames} descriptor frames sent without a call using them"
            )

    async def take_fds(self, operation: str, transfer_id: int, indexes: Sequence[int]) -> list[OwnedFd]:
        """The client's descriptors of *transfer_id*, at *indexes*; the caller owns
        them.  Descriptors of the frame that no index names are closed."""
        if transfer_id == 0:
            raise BrokerError(errno.EBADF, operation, "the request names no fd transfer (fd_transfer is 0)")
        failed = self._failed_incoming.pop(transfer_id, None)
        if failed is not None:
            raise BrokerError(failed.errno, operation, failed.detail)
        fds = self._incoming.pop(transfer_id, None)
        if fds is None:
            if transfer_id in self._incoming_waiters:
                raise BrokerError(errno.EBADF, operation, f"another call is already waiting for transfer id {transfer_id}")
            if self.closed.is_set():
                raise BrokerError(errno.ECANCELED, operation, "the session has ended")
            waiter: asyncio.Future[list[OwnedFd]] = asyncio.get_running_loop().create_future()
            self._incoming_waiters[transfer_id] = waiter
            try:
                async with asyncio.timeout(self.limits.fd_frame_wait_seconds):
                    fds = await waiter
            except TimeoutError:
                raise BrokerError(
                    errno.EBADF,
                    operation,
                    f"no descriptors arrived on the fd channel under transfer id {transfer_id}",
                ) from None
            except BrokerError as exc:  # refuse_incoming()
                raise BrokerError(exc.errno, operation, exc.detail) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if waiter.cancelled() and self.closed.is_set() and not (task and task.cancelling()):
                    # release() cancelled the wait, not the call's own cancellation.
                    raise BrokerError(
                        errno.ECANCELED, operation, f"the session ended while waiting for transfer id {transfer_id}"
                    ) from None
                raise
            finally:
                if self._incoming_waiters.get(transfer_id) is waiter:
                    del self._incoming_waiters[transfer_id]
        try:
            for index in indexes:
                if not 0 <= index < len(fds):
                    raise BrokerError(
                        errno.EBADF, operation, f"fd index {index} not in transfer {transfer_id} of {len(fds)} fds"
                    )
            if len(set(indexes)) != len(indexes):
                raise BrokerError(errno.EBADF, operation, "the same fd index is named twice")
            taken = [fds[index] for index in indexes]
        except BaseException:
            for fd in fds:
                fd.close()
            raise
        for index, fd in enumerate(fds):
            if index not in indexes:
                fd.close()
        return taken

    # ---------------------------------------------------------------- life

    def release(self) -> None:
        """Give back everything the session holds.  Idempotent."""
        if self.closed.is_set():
            return
        self.closed.set()
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in reversed(cleanups):
            with _logged(f"session {self.id}: cleanup"):
                cleanup()
        for fds in self._incoming.values():
            for fd in fds:
                fd.close()
        self._incoming.clear()
        self._failed_incoming.clear()
        for waiter in self._incoming_waiters.values():
            waiter.cancel()
        for name in ("_gntdev", "_gntalloc", "_evtchn", "_membuf"):
            device = getattr(self, name)
            setattr(self, name, None)
            if device is not None:
                with _logged(f"session {self.id}: closing {name[1:]}"):
                    device.close()
        with _logged(f"session {self.id}: closing backend"):
            self.backend.close()
        self.channel.close()
        log.info("session %d (%s, pid %d) released", self.id, self.client_name, self.creds.pid)


_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


def _hung_up(channel: FdChannel) -> bool:
    """Whether the peer of *channel* is gone (one non-blocking ``poll``)."""
    fd = channel.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, _HUNG_UP)
    return bool(poller.poll(0))


@contextlib.contextmanager
def _logged(what: str):  # type: ignore[no-untyped-def]
    try:
        yield
    except Exception:  # noqa: BLE001 - release must go on with the rest
        log.exception("%s failed", what)


class SessionRegistry:
    """All live sessions, their fd channels, and the lookup from a gRPC call to its session."""

    def __init__(self, provider: BackendProvider, policy: Policy, limits: Limits) -> None:
        self.provider = provider
        self.policy = policy
        self.limits = limits
        self._sessions: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def session_for(self, context: grpc.aio.ServicerContext) -> Session:
        """The session a call belongs to, from its metadata token."""
        token = next((value for key, value in context.invocation_metadata() or () if key == SESSION_METADATA_KEY), None)
        if token is None:
            raise BrokerError(errno.EPERM, "authenticate", f"no session: the call carries no {SESSION_METADATA_KEY} metadata")
        session = self._by_token.get(str(token))
        if session is None or session.closed.is_set() or _hung_up(session.channel):
            # The fd channel is checked now, not when its reader gets to the
            # hang-up: a token is good only while its fd channel is connected.
            raise BrokerError(errno.EPERM, "authenticate", "unknown or ended session token")
        return session

    def uses_fd(self, fd: int) -> bool:
        return any(session.channel.fileno() == fd for session in self._sessions.values())

    # ---------------------------------------------------------------- fd channel server

    def accept(self, channel: FdChannel) -> None:
        """Serve a newly connected fd channel in its own task."""
        task = asyncio.get_running_loop().create_task(self._serve_channel(channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_channel(self, channel: FdChannel) -> None:
        session: Session | None = None
        try:
            session = await self._handshake(channel)
            if session is None:
                return
            while True:
                try:
                    frame, fds = await channel.receive()
                except DescriptorsDropped as exc:
                    log.warning("session %d: %s: the broker is out of descriptors", session.id, exc)
                    session.refuse_incoming(
                        exc.transfer_id,
                        BrokerError(
                            errno.EMFILE,
                            "fd transfer",
                            f"the broker could not receive the {exc.announced} descriptors of transfer "
                            f"{exc.transfer_id}: it is out of descriptors; try again later",
                        ),
                    )
                    continue
                if frame.WhichOneof("body") != "transfer":
                    for fd in fds:
                        fd.close()
                    raise ProtocolError(f"unexpected {frame.WhichOneof('body')} frame after the hello")
                session.accept_incoming(frame.transfer.transfer_id, fds)
        except ChannelClosed:
            pass
        except ProtocolError as exc:
            log.warning("fd channel protocol error (session %s): %s", session.id if session else "-", exc)
            with contextlib.suppress(OSError, ValueError):
                channel._sock.send(FdFrame(error=ProtocolErrorFrame(message=str(exc), errno=exc.errno)).SerializeToString())
        except (OSError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("fd channel failed: %s", exc)
        except Exception:  # noqa: BLE001 - a bug; it ends this channel only, and is logged
            log.exception("fd channel of session %s failed unexpectedly", session.id if session else "-")
        finally:
            if session is not None:
                self._forget(session)
                session.release()
            else:
                channel.close()

    async def _handshake(self, channel: FdChannel) -> Session | None:
        creds = channel.peer_credentials()
        try:
            async with asyncio.timeout(self.limits.hello_timeout_seconds):
                # No control buffer: descriptors of an unauthenticated peer are
                # dropped by the kernel, never installed in the broker (where
                # closing one could block, or count against its fd limit).
                frame, fds = await channel.receive(accept_fds=False)
        except TimeoutError:
            raise ProtocolError("no hello within the time limit") from None
        except ProtocolError as exc:
            raise ProtocolError(f"refused before the session was authenticated: {exc}") from None
        if fds:
            for fd in fds:
                fd.close()
            raise ProtocolError("descriptors sent before the session was authenticated")
        if frame.WhichOneof("body") != "client_hello":
            raise ProtocolError("the first frame must be a ClientHello")
        hello = frame.client_hello
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {hello.protocol_version} unsupported (broker speaks {PROTOCOL_VERSION})")
        if not self.policy.admits(creds):
            raise ProtocolError(f"uid {creds.uid} (pid {creds.pid}) is not allowed by the broker's policy", errno=errno.EPERM)
        if len(self._sessions) >= self.limits.max_sessions:
            raise ProtocolError(f"the broker serves its maximum of {self.limits.max_sessions} sessions", errno=errno.EDQUOT)
        same_uid = sum(1 for s in self._sessions.values() if s.creds.uid == creds.uid)
        if same_uid >= self.limits.max_sessions_per_uid:
            raise ProtocolError(
                f"uid {creds.uid} already has {same_uid} sessions (limit {self.limits.max_sessions_per_uid})", errno=errno.EDQUOT
            )
        domid = hello.domid if hello.HasField("domid") else None
        vmid = hello.vmid if hello.HasField("vmid") else None
        try:
            backend = self.provider.backend(domid, vmid)
        except BrokerError as exc:
            raise ProtocolError(str(exc), errno=exc.errno) from None
        except ValueError as exc:  # a domid the backend cannot be (emulated: above 0x7FEF)
            raise ProtocolError(str(exc), errno=errno.EINVAL) from None
        session = Session(next(self._ids), channel, creds, backend, hello.client_name or f"pid {creds.pid}", self.limits)
        self._sessions[session.id] = session
        self._by_token[session.token] = session
        try:
            await channel.send(
                FdFrame(
                    server_hello=ServerHello(
                        protocol_version=PROTOCOL_VERSION,
                        session_id=session.id,
                        token=session.token,
                        domid=session.domid,
                        vmid=session.vmid,
                        max_fds_per_frame=MAX_FDS_PER_FRAME,
                    )
                )
            )
        except BaseException:
            self._forget(session)
            session.release()
            raise
        log.info(
            "session %d opened: %s, pid %d uid %d, domain %d", session.id, session.client_name, creds.pid, creds.uid, session.domid
        )
        return session

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        self._by_token.pop(session.token, None)

    async def close(self) -> None:
        """End every session (broker shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in list(self._sessions.values()):
            self._forget(session)
            session.release()
