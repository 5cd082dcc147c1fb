"""Sharing this domain's pages with another domain: ``session.gntalloc``.

>>> async def offer_page(session, peer: int) -> None:              # doctest: +SKIP
...     async with await session.gntalloc.share(peer, 1) as pages:
...         pages.view[:5] = b"hello"
...         tell_peer(pages.refs)          # e.g. through xenstore
...         await peer_done()
...     # leaving the block ends the grants

The pages are zeroed when allocated and always writable here; *writable*
says whether the other domain may write.  When the session ends — also when
this process dies — the grants end and the unmap notifications fire.
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

import grpc

from grant_broker_protocol.memory import SharedMemory
from grant_broker_protocol.abi import GNTALLOC_FLAG_WRITABLE, UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from grant_broker_protocol.v1 import gntalloc_pb2, gntalloc_pb2_grpc
from grant_broker_client.errors import BrokerClientError
from grant_broker_client.memory import MappedPages, map_received, receive_spans

if TYPE_CHECKING:
    from grant_broker_client.session import Session

__all__ = ["UNMAP_NOTIFY_CLEAR_BYTE", "UNMAP_NOTIFY_SEND_EVENT", "GntallocClient", "SharedPages"]


class SharedPages(MappedPages):
    """Pages of this domain granted to :attr:`domid`; ``refs[i]`` grants page ``i`` of :attr:`view`.

    ``await pages.aclose()`` (or ``async with``) unmaps here and ends the
    grants.  Slices of :attr:`view` must be released first.
    """

    _device = "gntalloc"

    def __init__(
        self, client: "GntallocClient", index: int, domid: int, refs: tuple[int, ...], writable: bool, memory: SharedMemory
    ) -> None:
        # Always writable here; *writable* says whether *domid* may write.
        super().__init__(index, refs, memory, writable)
        self._client = client
        self.domid = domid

    async def set_unmap_notify(self, offset: int, action: int, port: int = 0) -> None:
        """Arm what happens when these pages go away on this side (also when this
        process dies): ``UNMAP_NOTIFY_CLEAR_BYTE`` zeroes byte *offset*,
        ``UNMAP_NOTIFY_SEND_EVENT`` signals *port* (bound by this session)."""
        await self._client.set_unmap_notify(self._notify_offset(offset), action, port)

    async def _release(self) -> None:
        if not (self._client._session.closed or self._client._session.broker_lost):
            await self._client.dealloc_gref(self.index, self.count)

    def __repr__(self) -> str:
        return f"<SharedPages index={self.index} to domain {self.domid} refs={list(self.refs)}{' closed' if self._closed else ''}>"


class GntallocClient:
    """``/dev/xen/gntalloc`` through the broker.  Use ``session.gntalloc``."""

    def __init__(self, session: "Session") -> None:
        self._session = session
        self._stub_instance: gntalloc_pb2_grpc.GntallocStub | None = None

    @property
    def _stub(self) -> gntalloc_pb2_grpc.GntallocStub:
        # Made on first use, and never on a closed session: grpcio (1.85)
        # hangs or crashes when a stub is built on a closed aio channel.
        if self._stub_instance is None:
            if self._session.closed:
                raise BrokerClientError(errno.EPIPE, "gntalloc", "the session is closed", code=grpc.StatusCode.UNAVAILABLE)
            self._stub_instance = gntalloc_pb2_grpc.GntallocStub(self._session.grpc_channel)
        return self._stub_instance

    async def share(self, domid: int, count: int, *, writable: bool = True) -> SharedPages:
        """Allocate *count* zeroed pages, grant each to *domid*, and map them here.

        >>> pages = await session.gntalloc.share(2, 4)       # doctest: +SKIP
        >>> pages.refs                                      # doctest: +SKIP
        (8, 9, 10, 11)
        """
        response = await self._session.call(
            self._stub.AllocGref,
            gntalloc_pb2.AllocGrefRequest(domid=domid, flags=GNTALLOC_FLAG_WRITABLE if writable else 0, count=count),
        )
        try:
            spans = await receive_spans(self._session, "gntalloc alloc gref", response.fd_transfer, response.spans)
            memory = map_received(spans, writable=True)
        except BaseException:
            with contextlib.suppress(BrokerClientError):
                await self.dealloc_gref(response.index, len(response.gref_ids))
            raise
        return SharedPages(self, response.index, domid, tuple(response.gref_ids), writable, memory)

    async def dealloc_gref(self, index: int, count: int) -> None:
        """``IOCTL_GNTALLOC_DEALLOC_GREF`` (prefer :meth:`SharedPages.aclose`)."""
        await self._session.call(self._stub.DeallocGref, gntalloc_pb2.DeallocGrefRequest(index=index, count=count))

    async def set_unmap_notify(self, index: int, action: int, port: int = 0) -> None:
        """``IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`` at byte *index* of the session's gntalloc space."""
        await self._session.call(
            self._stub.SetUnmapNotify,
            gntalloc_pb2.GntallocUnmapNotifyRequest(index=index, action=action, event_channel_port=port),
        )
