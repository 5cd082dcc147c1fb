"""Shared memory as it arrives from the broker: spans of descriptors, mapped once.

The broker answers a request for memory with ``MemorySpan`` messages naming
descriptors of one fd-channel transfer.  :func:`receive_spans` collects those
descriptors; :func:`map_received` maps the spans as one contiguous region with
:func:`grant_broker_protocol.memory.map_spans` and closes the descriptors, which the
mapping does not need.
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc

from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.memory import SharedMemory, map_spans
from grant_broker_protocol.v1 import common_pb2
from grant_broker_client.errors import BrokerClientError

if TYPE_CHECKING:
    from grant_broker_client.session import Session


@dataclass(slots=True)
class ReceivedSpan:
    """One piece of shared memory: ``mmap(fd, length, MAP_SHARED, offset)``.  Owns *fd*."""

    fd: OwnedFd
    offset: int
    length: int
    writable: bool

    def close(self) -> None:
        self.fd.close()


def fd_count(refs: Sequence[common_pb2.FdRef]) -> int:
    """How many descriptors a transfer carries, from the indexes that name them."""
    return max((ref.index for ref in refs), default=-1) + 1


async def receive_spans(
    session: "Session", operation: str, transfer_id: int, spans: Sequence[common_pb2.MemorySpan]
) -> list[ReceivedSpan]:
    """The descriptors of *transfer_id* attached to *spans*.  The caller owns them."""
    fds = await session.receive_fds(transfer_id, fd_count([span.fd for span in spans]))
    if len({span.fd.index for span in spans}) != len(fds):
        # One descriptor per span is what the broker sends; anything else would
        # leave a descriptor without an owner or give one two.
        for fd in fds:
            fd.close()
        raise BrokerClientError(
            errno.EPROTO,
            operation,
            f"the broker sent {len(fds)} descriptors for {len(spans)} spans",
            code=grpc.StatusCode.INTERNAL,
        )
    return [ReceivedSpan(fds[span.fd.index], span.offset, span.length, span.writable) for span in spans]


def map_received(spans: Sequence[ReceivedSpan], *, writable: bool) -> SharedMemory:
    """Map *spans* contiguously and close their descriptors (the mapping keeps the pages)."""
    try:
        return map_spans(spans, writable=writable)
    finally:
        for span in spans:
            span.close()


def close_spans(spans: Sequence[ReceivedSpan]) -> None:
    for span in spans:
        span.close()


__all__ = ["ReceivedSpan", "SharedMemory", "close_spans", "fd_count", "map_received", "receive_spans"]


class MappedPages(abc.ABC):
    """Pages a session holds, mapped in this process: what a gntdev
    :class:`~grant_broker_client.gntdev.Mapping` and a gntalloc
    :class:`~grant_broker_client.gntalloc.SharedPages` have in common.

    ``await pages.aclose()`` (or ``async with``) unmaps here, then lets the
    broker drop them.  Slices of :attr:`view` must be released first.
    """

    #: Names the operation in errors ("gntdev set unmap notify").
    _device: str = ""

    def __init__(self, index: int, refs: tuple[Any, ...], memory: SharedMemory, writable: bool) -> None:
        self.index = index
        """The pages' index (byte offset) in the session's device space."""
        self.refs = refs
        self.writable = writable
        self._memory = memory
        self._closed = False

    @property
    def view(self) -> memoryview:
        """The pages, in the order of :attr:`refs` (read-only unless writable here)."""
        return self._memory.view

    @property
    def count(self) -> int:
        """Number of pages."""
        return len(self.refs)

    @property
    def length(self) -> int:
        return self._memory.length

    @property
    def address(self) -> int:
        """Virtual address of the first byte in this process."""
        return self._memory.address

    @property
    def closed(self) -> bool:
        return self._closed

    def _notify_offset(self, offset: int) -> int:
        """The device-space offset of byte *offset* of these pages, checked."""
        if not 0 <= offset < self.length:
            raise BrokerClientError(
                errno.EINVAL, f"{self._device} set unmap notify", f"offset {offset} is outside the {self.length} bytes mapped",
                code=grpc.StatusCode.INVALID_ARGUMENT,
            )
        return self.index + offset

    @abc.abstractmethod
    async def _release(self) -> None:
        """Let the broker drop the pages (called once, after the local unmap)."""

    async def aclose(self) -> None:
        """Unmap here, then let the broker drop the pages.  Idempotent.

        Raises:
            BufferError: slices of :attr:`view` are still alive; nothing is done.
        """
        if self._closed:
            return
        self._memory.close()
        self._closed = True
        await self._release()

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
