"""Shared memory handed out as spans, mapped as one contiguous memoryview.

A mapping of several grants may arrive as several descriptors (the emulated
hypervisor backs each grant allocation by its own memfd).  ``map_spans``
reserves one anonymous region with Python's :mod:`mmap` — so the usual
buffer-export bookkeeping applies and ``close()`` refuses while a view is
still exported — then lays each span over its part of the region with
``MAP_FIXED``.  A single span is mapped directly.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self

from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol._mman import MAP_FIXED, libc_mmap


class Span(Protocol):
    """Anything with a descriptor, an offset and a length (``MemorySpan``, SDK spans)."""

    offset: int
    length: int

    @property
    def fd(self) -> object: ...


def _fileno(span: Span) -> int:
    fd = span.fd
    return fd if isinstance(fd, int) else fd.fileno()  # type: ignore[attr-defined]


class SharedMemory:
    """Spans mapped contiguously; :attr:`view` is the memory (read-only unless *writable*).

    The descriptors are not kept: the mapping stays valid after the spans are
    closed, as with any mmap.
    """

    def __init__(self, spans: Sequence[Span], *, writable: bool) -> None:
        if not spans:
            raise BrokerError(errno.EINVAL, "map shared memory", "no spans to map")
        self.writable = writable
        self.length = sum(span.length for span in spans)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            if len(spans) == 1:
                (span,) = spans
                self._mmap = mmap.mmap(_fileno(span), span.length, mmap.MAP_SHARED, prot, offset=span.offset)
            else:
                # The reservation is writable so that ctypes can take its
                # address; the spans laid over it carry the real protection.
                self._mmap = mmap.mmap(-1, self.length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                base = self.address
                position = 0
                for span in spans:
                    libc_mmap(base + position, span.length, prot, mmap.MAP_SHARED | MAP_FIXED, _fileno(span), span.offset)
                    position += span.length
        except OSError as exc:
            if hasattr(self, "_mmap"):
                self._mmap.close()
            raise BrokerError.from_oserror(exc, "map shared memory") from exc
        view = memoryview(self._mmap)
        self.view: memoryview = view if writable else view.toreadonly()
        if not writable:
            view.release()

    @property
    def address(self) -> int:
        """The virtual address of the first byte (for offset-for-vaddr)."""
        anchor = ctypes.c_char.from_buffer(self._mmap)
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor

    @property
    def closed(self) -> bool:
        return self._mmap.closed

    def close(self) -> None:
        """Unmap.  Raises BufferError while slices of :attr:`view` are still alive."""
        if self._mmap.closed:
            return
        self.view.release()
        self._mmap.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def map_spans(spans: Sequence[Span], *, writable: bool) -> SharedMemory:
    """Map *spans* as one contiguous region (see :class:`SharedMemory`)."""
    return SharedMemory(spans, writable=writable)
