"""The one table between errnos and gRPC status codes.

The broker answers a failed call with the status its errno maps to here; the
SDK uses the same table for refusals that reach it outside gRPC (a
``ProtocolError`` frame on the fd channel), so an error has the same code
whichever way it travelled.
"""

from __future__ import annotations

import errno

import grpc

ERRNO_TO_STATUS: dict[int, grpc.StatusCode] = {
    errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EBADF: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EFAULT: grpc.StatusCode.INVALID_ARGUMENT,
    errno.E2BIG: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ERANGE: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.ESRCH: grpc.StatusCode.NOT_FOUND,
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMSGSIZE: grpc.StatusCode.RESOURCE_EXHAUSTED,  # a request larger than its call accepts
    errno.ENOTCONN: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EBUSY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ETIMEDOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    errno.ENOTTY: grpc.StatusCode.UNIMPLEMENTED,
    errno.ENOSYS: grpc.StatusCode.UNIMPLEMENTED,
    errno.EOPNOTSUPP: grpc.StatusCode.UNIMPLEMENTED,
    errno.ENODEV: grpc.StatusCode.UNIMPLEMENTED,
    errno.EAGAIN: grpc.StatusCode.UNAVAILABLE,
    errno.EPIPE: grpc.StatusCode.UNAVAILABLE,
    errno.ECANCELED: grpc.StatusCode.CANCELLED,
    errno.EPROTO: grpc.StatusCode.INVALID_ARGUMENT,  # the client broke the fd channel protocol
}


def status_code_for(code: int) -> grpc.StatusCode:
    """The gRPC status of a failure with errno *code* (INTERNAL for errnos no client can act on)."""
    return ERRNO_TO_STATUS.get(code, grpc.StatusCode.INTERNAL)
