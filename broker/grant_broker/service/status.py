"""The one place where errors become gRPC statuses.

Backends raise :class:`BrokerError` (an errno, maybe a GNTST status); the
servicers are wrapped by :func:`rpc` which turns it into a status code chosen
from the errno, with an :class:`ErrorDetail` in the status details so clients
get the errno, the GNTST status and a sentence.  Nothing reaches a client as
UNKNOWN: an unexpected exception becomes INTERNAL and is logged.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from grant_broker_protocol.errors import BrokerError, errno_name
from grant_broker.uapi.grant_table import gntst_name
from grant_broker_protocol.status import status_code_for
from grant_broker_protocol.v1.common_pb2 import ErrorDetail

log = logging.getLogger(__name__)

def error_detail(error: BrokerError) -> ErrorDetail:
    detail = ErrorDetail(
        errno=error.errno,
        errno_name=errno_name(error.errno),
        operation=error.operation,
        message=str(error),
    )
    if error.gntst is not None:
        detail.gntst = error.gntst
        detail.gntst_name = gntst_name(error.gntst)
    return detail


def to_grpc_status(error: BrokerError) -> grpc.Status:
    packed = any_pb2.Any()
    packed.Pack(error_detail(error))
    code = status_code_for(error.errno)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=str(error), details=[packed]))


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


# Errors any system call may give when the broker runs short of a resource:
# the caller is told RESOURCE_EXHAUSTED (with the errno), not INTERNAL,
# wherever in the broker the call ran into it.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, BrokerError):
        await context.abort_with_status(to_grpc_status(exc))
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        log.warning("a call ran out of resources: %s", exc)
        await context.abort_with_status(to_grpc_status(BrokerError(exc.errno, "broker", f"the broker is short of resources: {exc.strerror}")))
    log.exception("unexpected error in %s", context, exc_info=exc)
    internal = BrokerError(errno.EIO, "broker", f"internal error: {type(exc).__name__}: {exc}")
    await context.abort_with_status(
        rpc_status.to_status(
            status_pb2.Status(
                code=grpc.StatusCode.INTERNAL.value[0],
                message=str(internal),
                details=[_packed(error_detail(internal))],
            )
        )
    )


def _packed(detail: ErrorDetail) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises an exception of grpc's own (AbortError) to unwind the handler.
    return type(exc).__name__ in {"AbortError", "UsageError"} or isinstance(exc, grpc.RpcError)


def rpc(handler: _Handler) -> _Handler:
    """Wrap a unary servicer method: BrokerError -> precise status; anything else -> INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def rpc_stream(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Like :func:`rpc`, for server-streaming methods."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in handler(self, request, context):
                yield item
        except Exception as exc:  # noqa: BLE001
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return wrapper


def invalid(operation: str, detail: str) -> BrokerError:
    """A request that is wrong before any device is touched (EINVAL)."""
    return BrokerError(errno.EINVAL, operation, detail)


