"""Shared memory as it arrives from the broker: spans of descriptors, mapped once.

The broker answers a request for memory with ``MemorySpan`` messages naming
descriptors of one fd-channel transfer.  :func:`receive_spans` collects those
descriptors; :func:`map_received` maps the spans as one contiguous region with
:func:`grant_broker.memory.map_spans` and closes the descriptors, which the
mapping does not need.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from grant_broker.fds import OwnedFd
from grant_broker.memory import SharedMemory, map_spans
from grant_broker.v1 import common_pb2
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
