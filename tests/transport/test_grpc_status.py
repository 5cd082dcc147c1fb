"""The gRPC transport's mapping of failures, without a server: a BrokerError
becomes the status code the protocol's errno table gives and an ErrorDetail
in the status details; anything else becomes INTERNAL, except the broker
running out of a resource (RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import errno
import logging
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from grant_broker.transport.grpc.status import abort, is_abort, to_grpc_status
from grant_broker_protocol.abi import GNTST_bad_gntref
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.status import ERRNO_TO_STATUS
from grant_broker_protocol.v1.common_pb2 import ErrorDetail

DETAILS_KEY = "grpc-status-details-bin"


def rich_status(status: grpc.Status) -> status_pb2.Status:
    """The google.rpc.Status a client reads from the trailing metadata."""
    (value,) = [value for key, value in status.trailing_metadata if key == DETAILS_KEY]
    return status_pb2.Status.FromString(value)


def error_detail_of(status: grpc.Status) -> ErrorDetail:
    (packed,) = rich_status(status).details
    detail = ErrorDetail()
    assert packed.Unpack(detail), packed.type_url
    return detail


class AbortError(Exception):
    """What grpc.aio's abort_with_status raises to unwind the handler (by name, as is_abort knows it)."""


class RecordingContext:
    """The one part of a ServicerContext that abort() uses."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise AbortError()


async def aborted_with(exc: BaseException) -> grpc.Status:
    """The status abort() ends a call with for *exc*."""
    context = RecordingContext()
    with pytest.raises(AbortError):
        await abort(context, exc)  # type: ignore[arg-type]
    assert context.status is not None
    return context.status


# --------------------------------------------------------------------------- BrokerError


@pytest.mark.parametrize(
    ("code", "status"), list(ERRNO_TO_STATUS.items()), ids=[errno.errorcode[c] for c in ERRNO_TO_STATUS]
)
def test_a_broker_error_gets_the_status_code_its_errno_maps_to(code: int, status: grpc.StatusCode) -> None:
    mapped = to_grpc_status(BrokerError(code, "gntdev map", "refs 8, 9 of domain 2"))
    assert mapped.code == status
    assert rich_status(mapped).code == status.value[0]


@pytest.mark.parametrize("code", [errno.EIO, errno.EXDEV, max(errno.errorcode) + 100], ids=["EIO", "EXDEV", "unnamed"])
def test_an_errno_outside_the_table_is_internal(code: int) -> None:
    assert to_grpc_status(BrokerError(code, "gntdev map")).code == grpc.StatusCode.INTERNAL


def test_the_status_message_is_the_errors_sentence() -> None:
    error = BrokerError(errno.EINVAL, "gntdev map memory", "no mapping starts at index 4 in this session")
    mapped = to_grpc_status(error)
    assert mapped.details == str(error) == rich_status(mapped).message


def test_the_error_detail_carries_errno_operation_message_and_detail() -> None:
    error = BrokerError(errno.EINVAL, "gntdev map memory", "no mapping starts at index 4 in this session")
    detail = error_detail_of(to_grpc_status(error))
    assert (detail.errno, detail.errno_name, detail.operation) == (errno.EINVAL, "EINVAL", "gntdev map memory")
    assert detail.message == str(error)
    assert detail.detail == "no mapping starts at index 4 in this session"


def test_the_error_detail_has_no_gntst_when_the_hypervisor_gave_none() -> None:
    detail = error_detail_of(to_grpc_status(BrokerError(errno.EINVAL, "gntdev map")))
    assert not detail.HasField("gntst")
    assert detail.gntst_name == ""


def test_the_error_detail_carries_the_gntst_status_when_set() -> None:
    error = BrokerError(errno.EINVAL, "gntdev grant copy", "segment 0", gntst=GNTST_bad_gntref)
    detail = error_detail_of(to_grpc_status(error))
    assert detail.HasField("gntst")
    assert (detail.gntst, detail.gntst_name) == (GNTST_bad_gntref, "GNTST_bad_gntref")
    assert detail.message == str(error) and "GNTST_bad_gntref" in detail.message


UNNAMED_ERRNO = max(errno.errorcode) + 100  # no platform names it


def test_an_errno_without_a_name_is_named_by_its_number() -> None:
    detail = error_detail_of(to_grpc_status(BrokerError(UNNAMED_ERRNO, "broker")))
    assert (detail.errno, detail.errno_name) == (UNNAMED_ERRNO, f"errno {UNNAMED_ERRNO}")


def test_the_detail_field_is_field_7_of_error_detail() -> None:
    assert ErrorDetail.DESCRIPTOR.fields_by_name["detail"].number == 7


# --------------------------------------------------------------------------- abort(): any exception


async def test_abort_with_a_broker_error_sends_its_status() -> None:
    error = BrokerError(errno.ENOTCONN, "evtchn notify", "port 5 is not bound by this session")
    status = await aborted_with(error)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error_detail_of(status) == error_detail_of(to_grpc_status(error))


async def test_abort_with_an_unexpected_exception_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        status = await aborted_with(RuntimeError("boom"))
    assert status.code == grpc.StatusCode.INTERNAL
    detail = error_detail_of(status)
    assert detail.errno == errno.EIO
    assert "internal error: RuntimeError: boom" in detail.detail
    assert any(record.exc_info and record.exc_info[1].args == ("boom",) for record in caplog.records)


async def test_abort_with_a_plain_oserror_of_a_request_errno_is_internal() -> None:
    # Only BrokerError says "your request": an OSError from elsewhere is a bug.
    assert (await aborted_with(OSError(errno.EINVAL, "Invalid argument"))).code == grpc.StatusCode.INTERNAL


RESOURCE_ERRNOS = [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC]


@pytest.mark.parametrize("code", RESOURCE_ERRNOS, ids=[errno.errorcode[c] for c in RESOURCE_ERRNOS])
async def test_abort_with_the_broker_short_of_a_resource_is_resource_exhausted(code: int) -> None:
    status = await aborted_with(OSError(code, "no more"))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    detail = error_detail_of(status)
    assert detail.errno == code
    assert "short of resources" in detail.detail


async def test_abort_raises_even_if_the_context_does_not() -> None:
    class Returning:
        async def abort_with_status(self, status: grpc.Status) -> None:
            return None

    with pytest.raises(AssertionError):
        await abort(Returning(), BrokerError(errno.EINVAL, "x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [(AbortError(), True), (BrokerError(errno.EINVAL, "x"), False), (RuntimeError("x"), False)],
    ids=["grpc-abort", "broker-error", "bug"],
)
def test_is_abort_tells_grpcs_own_unwinding_from_failures(exc: Any, expected: bool) -> None:
    assert is_abort(exc) is expected
