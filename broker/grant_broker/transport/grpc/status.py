"""The one place where errors become gRPC statuses.

Operations raise :class:`BrokerError` (an errno, maybe a GNTST status); the
handlers turn it into the status code the protocol's table
(:mod:`grant_broker_protocol.status`) gives its errno, with an
:class:`ErrorDetail` in the status details so clients get the errno, the
GNTST status and the sentence.  Nothing reaches a client as UNKNOWN: an
unexpected exception becomes INTERNAL and is logged.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from grant_broker_protocol.abi import gntst_name
from grant_broker_protocol.errors import BrokerError, errno_name
from grant_broker_protocol.status import status_code_for
from grant_broker_protocol.v1.common_pb2 import ErrorDetail

log = logging.getLogger(__name__)

# Errors any system call may give when the broker runs short of a resource:
# the caller is told RESOURCE_EXHAUSTED (with the errno), not INTERNAL,
# wherever in the broker the call ran into it.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})


def error_detail(error: BrokerError) -> ErrorDetail:
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


def to_grpc_status(error: BrokerError, code: grpc.StatusCode | None = None) -> grpc.Status:
    """*error* as a status: its errno's code (or *code*), the sentence, and the ErrorDetail."""
    packed = any_pb2.Any()
    packed.Pack(error_detail(error))
    code = code or status_code_for(error.errno)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=str(error), details=[packed]))


def as_broker_error(exc: BaseException) -> tuple[BrokerError, grpc.StatusCode | None]:
    """What a client is told of *exc*: the error, and a status code when the
    errno's own would be wrong (INTERNAL for a bug)."""
    if isinstance(exc, BrokerError):
        return exc, None
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        log.warning("a call ran out of resources: %s", exc)
        return BrokerError(exc.errno, "broker", f"the broker is short of resources: {exc.strerror}"), None
    log.error("unexpected error in a call", exc_info=exc)
    return BrokerError(errno.EIO, "broker", f"internal error: {type(exc).__name__}: {exc}"), grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status *exc* maps to."""
    error, code = as_broker_error(exc)
    await context.abort_with_status(to_grpc_status(error, code))
    raise AssertionError("abort_with_status returned")  # it raises to unwind the handler


def is_abort(exc: BaseException) -> bool:
    """Whether *exc* is grpc's own unwinding of an aborted call (to be re-raised)."""
    return type(exc).__name__ in {"AbortError", "UsageError"} or isinstance(exc, grpc.RpcError)
