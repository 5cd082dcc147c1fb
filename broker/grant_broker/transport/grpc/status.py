"""The one place where errors become gRPC statuses.

Operations raise :class:`BrokerError` (an errno, maybe a GNTST status); the
handlers turn it into the status code the protocol's table
(:mod:`grant_broker_protocol.status`) gives its errno, with an
:class:`ErrorDetail` in the status details so clients get the errno, the
GNTST status and the sentence.  Nothing reaches a client as UNKNOWN: an
unexpected exception becomes EIO, hence INTERNAL, and is logged
(:func:`~grant_broker.core.failures.as_broker_error`).
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from grant_broker.core.failures import as_broker_error
from grant_broker_protocol.errors import BrokerError, error_detail
from grant_broker_protocol.status import status_code_for

def to_grpc_status(error: BrokerError) -> grpc.Status:
    """*error* as a status: its errno's code, the sentence, and the ErrorDetail."""
    packed = any_pb2.Any()
    packed.Pack(error_detail(error))
    code = status_code_for(error.errno)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=str(error), details=[packed]))


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status *exc* maps to."""
    await context.abort_with_status(to_grpc_status(as_broker_error(exc)))
    raise AssertionError("abort_with_status returned")  # it raises to unwind the handler


def is_abort(exc: BaseException) -> bool:
    """Whether *exc* is grpc's own unwinding of an aborted call (to be re-raised)."""
    return type(exc).__name__ in {"AbortError", "UsageError"} or isinstance(exc, grpc.RpcError)
