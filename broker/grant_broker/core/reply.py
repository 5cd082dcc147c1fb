"""What an operation answers: the response message and the descriptors that go with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import Message

from grant_broker.backend.contract import MemorySpan
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.v1 import common_pb2

_Response = TypeVar("_Response", bound=Message)


@dataclass(slots=True)
class Reply(Generic[_Response]):
    """An operation's answer.

    *fds* are owned by the reply: the transport delivers them to the client
    (the message names them by index, in this order, and the transport sets
    the message's ``fd_transfer``) and closes the broker's copies, whether or
    not the delivery succeeds.  What the session keeps is recorded by the
    operation before it returns, so a session that ends while the
    descriptors travel still gives everything back.
    """

    message: _Response
    fds: list[OwnedFd] = field(default_factory=list)

    def close(self) -> None:
        """Close the broker's copies of the descriptors (after delivery or instead of it)."""
        for fd in self.fds:
            fd.close()


def span_messages(spans: Sequence[MemorySpan]) -> list[common_pb2.MemorySpan]:
    """*spans* as messages whose descriptors are the reply's, index i for span i."""
    return [
        common_pb2.MemorySpan(fd=common_pb2.FdRef(index=i), offset=span.offset, length=span.length, writable=span.writable)
        for i, span in enumerate(spans)
    ]


def close_spans(spans: Sequence[MemorySpan]) -> None:
    for span in spans:
        span.close()
