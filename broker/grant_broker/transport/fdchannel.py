"""The fd channel server: the hello that opens a session, descriptors, and fast-path calls.

Each connected channel is served in a task of its own: the hello (within
``Limits.hello_timeout_seconds``, with no descriptors accepted before the
peer is authenticated by ``SO_PEERCRED``), then frames: transfers, whose
descriptors go to the session's transfer table until a call takes them, and
— when the hello agreed on the fast path — calls, served by
:class:`~grant_broker.transport.fastpath.FastPath`.  The channel's end —
whatever the reason — releases the session.  A client that breaks the
protocol is told why in a ``ProtocolError`` frame before the channel is
closed.  The hello's outcome (opened, or refused with its errno) is reported
to the observer as the call ``FdChannel.Hello``, and the fast-path calls as
their methods (:mod:`grant_broker.core.observe`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Iterable
from time import perf_counter

from grant_broker.core.observe import (
    HELLO,
    NO_OBSERVER,
    TRANSPORT_FAST_PATH,
    TRANSPORT_FD_CHANNEL,
    UNKNOWN_METHOD,
    CallObserver,
)
from grant_broker.core.registry import SessionRegistry
from grant_broker.core.routes import Route
from grant_broker.core.session import Session
from grant_broker.transport.fastpath import FastPath
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.fdchannel import (
    FAST_PATH_FRAME_BYTES,
    FAST_PATH_VERSION,
    MAX_FDS_PER_FRAME,
    PROTOCOL_VERSION,
    ChannelClosed,
    DescriptorsDropped,
    FdChannel,
    ProtocolError,
)
from grant_broker_protocol.transfers import TransferRefused
from grant_broker_protocol.v1.fdchannel_pb2 import FdFrame, ServerHello

log = logging.getLogger(__name__)


class FdChannelServer:
    """Serves the fd channels of one broker's sessions, and their fast-path
    calls from *routes* (none: the fast path is not offered)."""

    def __init__(self, registry: SessionRegistry, routes: Iterable[Route] = (), observer: CallObserver = NO_OBSERVER) -> None:
        self.registry = registry
        self._routes = {route.full_name: route for route in routes}
        self._tasks: set[asyncio.Task[None]] = set()
        self._hello = observer.recorder(*HELLO, TRANSPORT_FD_CHANNEL)
        self._recorders = {
            name: observer.recorder(route.service, route.method, TRANSPORT_FAST_PATH) for name, route in self._routes.items()
        }
        self._unknown = observer.recorder(*UNKNOWN_METHOD, TRANSPORT_FAST_PATH)

    def accept(self, channel: FdChannel) -> None:
        """Serve a newly connected fd channel in its own task."""
        task = asyncio.get_running_loop().create_task(self._serve(channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, channel: FdChannel) -> None:
        session: Session | None = None
        fast: FastPath | None = None
        try:
            started = perf_counter()
            try:
                session, fast = await self._handshake(channel)
            except ProtocolError as exc:  # refused (a client that just went away is not counted)
                self._hello.record(exc.errno, perf_counter() - started)
                raise
            self._hello.record(0, perf_counter() - started)
            await self._receive_frames(session, fast)
        except ChannelClosed:
            pass
        except ProtocolError as exc:
            log.warning(
                "fd channel protocol error (session %s): %s", session.id if session else "-", exc,
                extra=session.log_fields if session else None,
            )
            channel.send_error_nowait(str(exc), exc.errno)
        except OSError as exc:
            log.warning("fd channel failed: %s", exc)
        except Exception:  # noqa: BLE001 - a bug; it ends this channel only, and is logged
            log.exception(
                "fd channel of session %s failed unexpectedly", session.id if session else "-",
                extra=session.log_fields if session else None,
            )
        finally:
            if fast is not None:
                await fast.close()
            if session is not None:
                self.registry.close_session(session)
            else:
                channel.close()

    async def _handshake(self, channel: FdChannel) -> tuple[Session, FastPath | None]:
        creds = channel.peer_credentials()
        try:
            async with asyncio.timeout(self.registry.limits.hello_timeout_seconds):
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
        try:
            session = self.registry.open(
                channel,
                creds,
                hello.client_name,
                hello.domid if hello.HasField("domid") else None,
                hello.vmid if hello.HasField("vmid") else None,
            )
        except BrokerError as exc:
            raise ProtocolError(exc.detail or str(exc), errno=exc.errno) from None
        # The lower of the two ends' versions; 0: calls go over gRPC only.
        fast_path_version = min(hello.fast_path_version, FAST_PATH_VERSION) if self._routes else 0
        fast_path = fast_path_version > 0
        limits = self.registry.limits
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
                        fast_path_version=fast_path_version,
                        max_frame_bytes=FAST_PATH_FRAME_BYTES if fast_path else channel.max_frame_bytes,
                        max_calls_in_flight=limits.max_fast_calls_in_flight if fast_path else 0,
                    )
                )
            )
        except BaseException:
            self.registry.close_session(session)
            raise
        if not fast_path:
            return session, None
        channel.max_frame_bytes = FAST_PATH_FRAME_BYTES
        return session, FastPath(
            session, self._routes, limits.max_fast_calls_in_flight, self._recorders, self._unknown, version=fast_path_version
        )

    async def _receive_frames(self, session: Session, fast: FastPath | None) -> None:
        """Serve the session's frames, each straight from the channel's reader
        callback, until the channel ends; raise why it ended."""
        channel = session.channel
        ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        def on_end(reason: BaseException) -> None:
            if not ended.done():
                ended.set_result(reason)

        channel.start_reading(
            lambda frame, fds: self._on_frame(session, fast, frame, fds),
            on_end,
            on_dropped=lambda exc: self._on_dropped(session, exc),
        )
        try:
            reason = await ended
        finally:
            channel.stop_reading()
        raise reason

    def _on_frame(self, session: Session, fast: FastPath | None, frame: FdFrame, fds: list[OwnedFd]) -> None:
        body = frame.WhichOneof("body")
        if body == "transfer":
            transfer_id = frame.transfer.transfer_id
            self._refuse_on_error(lambda: session.incoming.deliver(transfer_id, fds))
        elif body == "call" and fast is not None:
            fast.submit(frame.call)
        elif body == "cancel" and fast is not None:
            fast.cancel(frame.cancel.call_id)
        else:
            for fd in fds:
                fd.close()
            raise ProtocolError(f"unexpected {body} frame after the hello")

    def _on_dropped(self, session: Session, exc: DescriptorsDropped) -> None:
        log.warning("session %d: %s: the broker is out of descriptors", session.id, exc, extra=session.log_fields)
        error = BrokerError(
            errno.EMFILE,
            "fd transfer",
            f"the broker could not receive the {exc.announced} descriptors of transfer "
            f"{exc.transfer_id}: it is out of descriptors; try again later",
        )
        # Not the client's fault: the call naming the transfer fails, the session goes on.
        self._refuse_on_error(lambda: session.incoming.fail(exc.transfer_id, error))

    @staticmethod
    def _refuse_on_error(record: Callable[[], None]) -> None:
        try:
            record()
        except TransferRefused as exc:
            raise ProtocolError(str(exc)) from None

    async def close(self) -> None:
        """Stop serving every channel (broker shutdown); the registry releases the sessions."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
