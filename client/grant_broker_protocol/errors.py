"""The one error type of grant-broker.

Every failure a backend reports is a :class:`BrokerError`: an :class:`OSError`
carrying the errno the kernel (or the emulated hypervisor) gave, the operation
that failed, a sentence for a person, and — when the hypervisor answered with
one — the Xen ``GNTST_*`` status.  Each transport maps it once — gRPC to a
status with an :class:`ErrorDetail`, the fast path to the ErrorDetail of its
reply (:func:`error_detail`) — and the SDK maps it back.
"""

from __future__ import annotations

import errno as _errno
import os

from grant_broker_protocol.v1.common_pb2 import ErrorDetail
from collections.abc import Callable


def errno_name(code: int) -> str:
    """``EINVAL`` for 22; ``errno 4242`` for codes the platform does not name."""
    return _errno.errorcode.get(code, f"errno {code}")


class BrokerError(OSError):
    """A failed device operation.

    Attributes:
        errno: the errno (``errno.EINVAL`` …).
        operation: what was being done, e.g. ``"gntdev map grant refs"``.
        detail: a sentence naming the objects involved (refs, domains, ports).
        gntst: the Xen ``GNTST_*`` status (negative int) when the hypervisor
            gave one, else ``None``.
    """

    errno: int  # always set: the constructor takes it (OSError's may be None)

    def __init__(self, code: int, operation: str, detail: str = "", *, gntst: int | None = None) -> None:
        super().__init__(code, os.strerror(code))
        self.operation = operation
        self.detail = detail
        self.gntst = gntst

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)

    @property
    def gntst_name(self) -> str | None:
        if self.gntst is None:
            return None
        from grant_broker_protocol.abi import gntst_name

        return gntst_name(self.gntst)

    def __str__(self) -> str:
        text = f"{self.operation}: {self.strerror} ({self.errno_name})"
        if self.detail:
            text += f": {self.detail}"
        if self.gntst is not None:
            from grant_broker_protocol.abi import gntst_message

            text += f" [{self.gntst_name}: {gntst_message(self.gntst)}]"
        return text

    def __reduce__(self) -> tuple[Callable[..., BrokerError], tuple[object, ...]]:  # picklable across multiprocessing
        return (_rebuild, (self.errno, self.operation, self.detail, self.gntst))

    @classmethod
    def from_oserror(cls, exc: OSError, operation: str, detail: str = "") -> "BrokerError":
        """Wrap an OSError raised by ioctl/mmap/os.* keeping its errno."""
        return cls(exc.errno or _errno.EIO, operation, detail)


def _rebuild(code: int, operation: str, detail: str, gntst: int | None) -> BrokerError:
    return BrokerError(code, operation, detail, gntst=gntst)


def error_detail(error: BrokerError) -> ErrorDetail:
    """*error* as the ErrorDetail message every transport sends a client."""
    from grant_broker_protocol.abi import gntst_name

    detail = ErrorDetail(
        errno=error.errno,
        errno_name=errno_name(error.errno),
        operation=error.operation,
        message=str(error),
        detail=error.detail,
    )
    if error.gntst is not None:
        detail.gntst = error.gntst
        detail.gntst_name = gntst_name(error.gntst)
    return detail
