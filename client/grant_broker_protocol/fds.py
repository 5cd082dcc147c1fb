"""File descriptors as owned resources.

An :class:`OwnedFd` closes its descriptor exactly once.  The number is
forgotten *before* ``close()`` so a recycled fd number can never be closed by
a stale owner, ownership can be handed on explicitly with :meth:`detach`, and
a descriptor dropped without being closed raises a ``ResourceWarning`` (an
error under the test suite's ``filterwarnings = error``).
"""

from __future__ import annotations

import os
import warnings
from types import TracebackType


class OwnedFd:
    """Owns one file descriptor until :meth:`close` or :meth:`detach`."""

    __slots__ = ("_fd", "__weakref__")

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd = fd

    @classmethod
    def dup_of(cls, fd: int) -> "OwnedFd":
        """A new owned descriptor referring to the same open file as *fd* (close-on-exec)."""
        return cls(os.dup(fd))

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed file descriptor")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership: return the fd number, which the caller now closes."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def dup(self) -> "OwnedFd":
        return OwnedFd(os.dup(self.fileno()))

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "OwnedFd":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            finally:
                warnings.warn(f"OwnedFd({fd}) was never closed", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd if self._fd >= 0 else 'closed'})"


def open_fd_count() -> int:
    """How many descriptors this process has open (for leak checks)."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the listdir's own fd
