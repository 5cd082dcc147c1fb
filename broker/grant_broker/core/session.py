"""Client sessions: who is connected, what each holds, and its release.

A session is born when a client's fd channel says hello and its peer
credentials pass the policy (:mod:`grant_broker.core.registry`); it dies when
that connection closes, whatever the reason.  It owns its own device
instances — opened lazily — and every descriptor, mapping, grant and port it
created; :meth:`Session.release` gives all of them back, which fires the
unmap notifications of its mappings.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from grant_broker.backend.contract import Backend, EvtchnHandle, GntallocInstance, GntdevInstance, MemBufDevice
from grant_broker.core.events import EventHub
from grant_broker.core.policy import Limits
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import FdChannel, PeerCredentials
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.transfers import TransferTable, select_fds

log = logging.getLogger(__name__)

_State = TypeVar("_State")


@dataclass
class Usage:
    """What a session holds, as counts (shown by Status and DescribeSession)."""

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
        event_hub: EventHub,
    ) -> None:
        self.id = session_id
        self.token = secrets.token_urlsafe(32)
        self.channel = channel
        self.creds = creds
        self.backend = backend
        self.client_name = client_name
        self.limits = limits
        self.event_hub = event_hub  # the broker's, shared by every session's event reader
        self.created = time.monotonic()
        self.usage = Usage()
        self.closed = asyncio.Event()
        # Per-area state (gntdev ledger, event channels, ...), made by the
        # operations on first use; see service_state().
        self.resources: dict[str, Any] = {}
        self.incoming = TransferTable(max_pending=limits.max_pending_fd_frames)
        self._gntdev: GntdevInstance | None = None
        self._gntalloc: GntallocInstance | None = None
        self._evtchn: EvtchnHandle | None = None
        self._membuf: MemBufDevice | None = None
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
            self.check_live("session")
            self._gntdev = self.backend.open_gntdev()
        return self._gntdev

    @property
    def gntalloc(self) -> GntallocInstance:
        if self._gntalloc is None:
            self.check_live("session")
            self._gntalloc = self.backend.open_gntalloc()
        return self._gntalloc

    @property
    def evtchn(self) -> EvtchnHandle:
        if self._evtchn is None:
            self.check_live("session")
            self._evtchn = self.backend.open_evtchn()
        return self._evtchn

    @property
    def membuf(self) -> MemBufDevice:
        if self._membuf is None:
            self.check_live("session")
            self._membuf = self.backend.open_membuf()
        return self._membuf

    def check_live(self, operation: str) -> None:
        """ECANCELED once the session has been released: after an await, an
        operation must not open devices (lazily) that nobody would close."""
        if self.closed.is_set():
            raise BrokerError(errno.ECANCELED, operation, f"session {self.id} has ended")

    def connected(self) -> bool:
        """Whether the client's fd channel is still there (asked of the kernel
        now: a token is good only while its fd channel is connected)."""
        return not self.closed.is_set() and not self.channel.hung_up()

    def service_state(self, key: str, factory: Callable[[], _State]) -> _State:
        """The state of one area of operations for this session under *key*,
        made by *factory* on first use; its ``close()``, if it has one, runs
        when the session is released."""
        state = self.resources.get(key)
        if state is None:
            state = self.resources[key] = factory()
            close = getattr(state, "close", None)
            if close is not None:
                self.on_release(close)
        return state

    def on_release(self, cleanup: Callable[[], object]) -> None:
        """Run *cleanup* when the session is released (last registered runs first)."""
        self._cleanups.append(cleanup)

    def check_quota(self, operation: str, what: str, used: int, adding: int, limit: int) -> None:
        """EDQUOT when *adding* to *used* of *what* would pass *limit*."""
        if used + adding > limit:
            raise BrokerError(
                errno.EDQUOT,
                operation,
                f"this session holds {used} {what} and asked for {adding} more; the limit is {limit}",
            )

    # ---------------------------------------------------------------- descriptors from the client

    async def take_fds(self, operation: str, transfer_id: int, indexes: Sequence[int]) -> list[OwnedFd]:
        """The client's descriptors of *transfer_id* at *indexes*, whichever way
        they came; the caller owns them.  Descriptors of the transfer that no
        index names are closed."""
        fds = await self.incoming.take(operation, transfer_id, timeout=self.limits.fd_frame_wait_seconds)
        return select_fds(operation, transfer_id, fds, indexes)

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
        self.incoming.close(BrokerError(errno.ECANCELED, "session", f"session {self.id} ended"))
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


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # noqa: BLE001 - release must go on with the rest
        log.exception("%s failed", what)
