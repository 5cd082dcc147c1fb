"""Errors as the SDK raises them: the broker's errno, GNTST status and gRPC code."""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable

import grpc
from google.rpc import status_pb2

from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.status import status_code_for
from grant_broker_protocol.v1.common_pb2 import ErrorDetail

_DETAILS_KEY = "grpc-status-details-bin"


class BrokerClientError(BrokerError):
    """A call to the broker failed.

    Attributes (besides :class:`grant_broker_protocol.errors.BrokerError`'s errno,
    operation, detail and gntst):
        code: the gRPC status code.
    """

    def __init__(
        self, code_errno: int, operation: str, detail: str = "", *, gntst: int | None = None, code: grpc.StatusCode
    ) -> None:
        super().__init__(code_errno, operation, detail, gntst=gntst)
        self.code = code

    @classmethod
    def from_error(cls, error: BrokerError) -> "BrokerClientError":
        """*error* with the gRPC code its errno maps to (for failures that did not come as a status)."""
        return cls(error.errno, error.operation, error.detail, gntst=error.gntst, code=status_code_for(error.errno))

    def __str__(self) -> str:
        return f"{super().__str__()} (gRPC {self.code.name})"

    def __reduce__(self) -> tuple[Callable[..., BrokerClientError], tuple[object, ...]]:
        return (_rebuild, (self.errno, self.operation, self.detail, self.gntst, self.code.name))


def _rebuild(code_errno: int, operation: str, detail: str, gntst: int | None, code: str) -> BrokerClientError:
    return BrokerClientError(code_errno, operation, detail, gntst=gntst, code=grpc.StatusCode[code])


_STATUS_TO_ERRNO = {
    grpc.StatusCode.UNAVAILABLE: _errno.ECONNREFUSED,
    grpc.StatusCode.DEADLINE_EXCEEDED: _errno.ETIMEDOUT,
    grpc.StatusCode.CANCELLED: _errno.ECANCELED,
    grpc.StatusCode.UNAUTHENTICATED: _errno.EPERM,
    grpc.StatusCode.PERMISSION_DENIED: _errno.EPERM,
    grpc.StatusCode.RESOURCE_EXHAUSTED: _errno.ENOMEM,
    grpc.StatusCode.UNIMPLEMENTED: _errno.ENOSYS,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> BrokerClientError:
    """Rebuild the broker's error from a failed call's status details."""
    for key, value in error.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for packed in status.details:
                detail = ErrorDetail()
                if packed.Unpack(detail):
                    return BrokerClientError(
                        detail.errno,
                        detail.operation,
                        detail.detail,
                        gntst=detail.gntst if detail.HasField("gntst") else None,
                        code=error.code(),
                    )
    code = error.code()
    return BrokerClientError(_STATUS_TO_ERRNO.get(code, _errno.EIO), "call", error.details() or code.name, code=code)
