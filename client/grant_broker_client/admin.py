"""The remote admin API of a broker: TCP, mutual TLS (``grant-broker --admin HOST:PORT``).

A broker started with ``serve --admin-listen HOST:PORT`` serves the
``grant_broker.v1.Admin`` service there (see ``admin.proto``) to clients
whose certificate its client CA signed and its policy names::

    async with await connect_admin("broker1.example.org:7443", cert="ops.pem", key="ops.key",
                                   ca="broker-ca.pem") as admin:
        status = await admin.status()
        await admin.release_session(12, reason="stuck compositor")

Every method raises :class:`~grant_broker_client.errors.BrokerClientError`
whose message names the broker's address: PERMISSION_DENIED for an identity
without the right, NOT_FOUND for a session that is not there, UNAVAILABLE when
nothing answers or the TLS handshake fails (a certificate the broker's CA did
not sign, a broker certificate this side's CA did not sign),
DEADLINE_EXCEEDED after *timeout* seconds.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from grant_broker_client.errors import BrokerClientError, from_rpc_error
from grant_broker_protocol.v1 import admin_pb2, admin_pb2_grpc, broker_pb2

DEFAULT_TIMEOUT = 10.0
"""Seconds a call may take (a drain: its deadline on top)."""

_Response = TypeVar("_Response", bound=Message)


def _read(what: str, path: str, address: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise BrokerClientError(
            exc.errno or errno.EIO, f"admin {address}", f"cannot read the {what} {path}: {exc.strerror}",
            code=grpc.StatusCode.INVALID_ARGUMENT,
        ) from None


class AdminClient:
    """A connection to one broker's admin listener; an async context manager."""

    def __init__(self, address: str, channel: grpc.aio.Channel, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = channel
        self._stub = admin_pb2_grpc.AdminStub(channel)

    async def __aenter__(self) -> "AdminClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, name: str, request: Message, response_type: type[_Response], *, extra_time: float = 0) -> _Response:
        method: Any = getattr(self._stub, name)
        try:
            response = await method(request, timeout=self.timeout + extra_time)
        except grpc.aio.AioRpcError as exc:
            raise self._error(name, exc) from None
        assert isinstance(response, response_type)
        return response

    def _error(self, name: str, exc: grpc.aio.AioRpcError) -> BrokerClientError:
        """The broker's error, or what kept the call from reaching it, naming the address."""
        error = from_rpc_error(exc)
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE and error.operation == "call":
            detail = (f"no broker admin listener answers at {self.address}, or the TLS handshake failed "
                      f"(check --cert/--key/--ca and the broker's --admin-client-ca): {exc.details()}")
            return BrokerClientError(errno.ECONNREFUSED, f"admin {self.address} {name}", detail, code=code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and error.operation == "call":
            return BrokerClientError(errno.ETIMEDOUT, f"admin {self.address} {name}",
                                     f"no answer within {self.timeout:g}s", code=code)
        return BrokerClientError(error.errno, f"admin {self.address}: {error.operation}", error.detail,
                                 gntst=error.gntst, code=code)

    # ------------------------------------------------------------ the operations

    async def whoami(self) -> admin_pb2.WhoAmIResponse:
        """The identity the broker matched in this client's certificate, and its rights."""
        return await self._call("WhoAmI", admin_pb2.WhoAmIRequest(), admin_pb2.WhoAmIResponse)

    async def status(self) -> admin_pb2.AdminStatusResponse:
        """Every session and what it holds, the broker's state and limits."""
        return await self._call("Status", admin_pb2.AdminStatusRequest(), admin_pb2.AdminStatusResponse)

    async def describe_session(self, session_id: int) -> broker_pb2.SessionInfo:
        return await self._call(
            "DescribeSession", admin_pb2.AdminDescribeSessionRequest(session_id=session_id), broker_pb2.SessionInfo
        )

    async def metrics(self) -> admin_pb2.MetricsResponse:
        """The metrics in the Prometheus text format, as a scrape would give them."""
        return await self._call("Metrics", admin_pb2.MetricsRequest(), admin_pb2.MetricsResponse)

    async def release_session(self, session_id: int, reason: str = "") -> admin_pb2.ReleaseSessionResponse:
        """End the session as if its client had crashed (its unmap notifications fire)."""
        request = admin_pb2.ReleaseSessionRequest(session_id=session_id, reason=reason)
        return await self._call("ReleaseSession", request, admin_pb2.ReleaseSessionResponse, extra_time=5.0)

    async def drain(self, deadline_seconds: float, *, release_at_deadline: bool = False) -> admin_pb2.DrainResponse:
        """NOT_SERVING, refuse new sessions, wait up to *deadline_seconds* for the live ones to end."""
        request = admin_pb2.DrainRequest(deadline_seconds=deadline_seconds, release_at_deadline=release_at_deadline)
        return await self._call("Drain", request, admin_pb2.DrainResponse, extra_time=deadline_seconds + 5.0)

    async def set_limits(self, limits: Mapping[str, float]) -> admin_pb2.SetLimitsResponse:
        """Change limits and budgets (``serve --limit`` names); answers every limit now in force."""
        request = admin_pb2.SetLimitsRequest(
            limits=[admin_pb2.LimitSetting(name=name, value=float(value)) for name, value in limits.items()]
        )
        return await self._call("SetLimits", request, admin_pb2.SetLimitsResponse)


async def connect_admin(
    address: str,
    *,
    cert: str,
    key: str,
    ca: str,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
) -> AdminClient:
    """A client of the admin listener at *address* (``HOST:PORT``), presenting
    the certificate *cert* with its *key* (PEM files) and trusting the
    broker's certificate when *ca* signed it for *address*'s host (or for
    *server_name*).  Nothing is sent until the first call.

    Raises:
        BrokerClientError: a file that cannot be read (INVALID_ARGUMENT).
    """
    cert_pem, key_pem, ca_pem = await asyncio.to_thread(
        lambda: (_read("certificate", cert, address), _read("key", key, address), _read("CA bundle", ca, address))
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    options: list[tuple[str, Any]] = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = grpc.aio.secure_channel(address, credentials, options=options)
    return AdminClient(address, channel, timeout=timeout)
