"""The remote admin listener (``serve --admin-listen HOST:PORT``): TCP, TLS only, client certificates required.

There is no insecure mode: the listener needs the server's certificate and
key and the CA that signs the administrators' client certificates
(``--admin-cert``, ``--admin-key``, ``--admin-client-ca``); a client
without a certificate that CA signed does not get past the TLS handshake.
Which certificate identity may do what is the policy's
(``--admin-identity IDENTITY=RIGHTS``, :class:`~grant_broker.core.policy.AdminIdentity`).
The listener serves the ``Admin`` service (``transport/grpc/admin.py``,
``core/admin.py``) and the health service (so that a remote check sees a
drain's NOT_SERVING), nothing else.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from grant_broker.core.admin import Administration
from grant_broker.transport.grpc.admin import admin_handlers
from grant_broker_protocol.errors import BrokerError

log = logging.getLogger(__name__)

OPERATION = "admin listener"

ADMIN_SERVER_OPTIONS = [
    # Admin requests are a few bytes; a metrics snapshot (the largest reply) is sent, not received.
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.max_concurrent_streams", 64),
]


@dataclass(frozen=True, slots=True)
class AdminAddress:
    """Where the admin listener listens: ``HOST:PORT`` or ``[IPV6]:PORT`` (port 0: any free one)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "AdminAddress":
        """Raises ValueError saying what is expected."""
        expected = f"{text!r}: expected HOST:PORT or [IPV6]:PORT (TCP; the admin listener is TLS only)"
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ValueError(expected)
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(expected) from None
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon or not host or ":" in host:
                raise ValueError(expected)
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(expected) from None
        if not 0 <= port <= 65535:
            raise ValueError(expected)
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AdminTls:
    """The PEM files of the listener: its certificate (chain), its key, and
    the CA bundle its clients' certificates must chain to.

    They are read at start and again at each :meth:`reload` (the broker's
    SIGHUP), so that certificates rotated in place (cert-manager, an ACME
    client) are taken without a restart: a reload hands gRPC the new ones,
    which it uses from the next TLS handshake on — connections already open
    keep the certificates they were made with.  Files that do not make a
    working set (unreadable, not PEM, a key that is not the certificate's)
    are refused whole, and the running certificates stay."""

    cert: str
    key: str
    client_ca: str
    # What the next handshake takes (see _fetch): set by reload, taken once by gRPC.
    _rotated: list[grpc.ServerCertificateConfiguration] = field(default_factory=list, compare=False, repr=False)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        """The files read once each, checked as a set, as gRPC's configuration (blocking: off the loop)."""
        contents = []
        for option, path in (("--admin-cert", self.cert), ("--admin-key", self.key), ("--admin-client-ca", self.client_ca)):
            try:
                with open(path, "rb") as file:
                    contents.append(file.read())
            except OSError as exc:
                raise BrokerError(exc.errno or errno.EIO, OPERATION, f"cannot read {option} {path}: {exc.strerror}") from None
        cert, key, ca = contents
        self._check(cert, key, ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _check(self, cert: bytes, key: bytes, ca: bytes) -> None:
        """Refuse what gRPC would only fail on at the first handshake: a
        certificate or key that is not PEM, a key that is not the
        certificate's, a CA bundle without a certificate."""
        # Checked from the bytes read (not the paths again: a rotation may be
        # half-way), which OpenSSL takes only as files here: memfds.
        fds: list[int] = []
        try:
            try:
                for data in (cert, key):
                    fds.append(os.memfd_create("grant-broker-admin-tls", os.MFD_CLOEXEC))
                    os.write(fds[-1], data)
            except OSError as exc:
                raise BrokerError(exc.errno or errno.EIO, OPERATION, f"cannot check the certificate files now: {exc.strerror}") from None
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                # An empty password: an encrypted key is refused (gRPC takes
                # none), where no password at all would have OpenSSL prompt on
                # the broker's terminal.
                context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}", password=b"")
            except ssl.SSLError as exc:
                raise BrokerError(
                    errno.EINVAL, OPERATION,
                    f"--admin-cert {self.cert} and --admin-key {self.key} are not a PEM certificate and its key "
                    f"(unencrypted): {exc.reason or exc}",
                ) from None
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise BrokerError(
                    errno.EINVAL, OPERATION, f"--admin-client-ca {self.client_ca} holds no PEM CA certificate: {exc}"
                ) from None
        finally:
            for fd in fds:
                os.close(fd)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake, on a thread of its own: it
        # takes the reloaded set once (None: keep the current one).
        try:
            return self._rotated.pop()
        except IndexError:
            return None

    async def credentials(self) -> grpc.ServerCredentials:
        """Server credentials requiring a client certificate signed by the CA (files read off the event loop).

        Raises:
            BrokerError: a file that cannot be read, or files that are not a working set.
        """
        initial = await asyncio.to_thread(self._read)
        # The fetcher may answer None ("no change", grpc's documentation); its type stubs say otherwise.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)

    async def reload(self) -> None:
        """Read the files again; the next handshakes use them.

        Raises:
            BrokerError: as :meth:`credentials`; the running certificates stay.
        """
        configuration = await asyncio.to_thread(self._read)
        self._rotated[:] = [configuration]


class AdminListener:
    """One running admin listener; :meth:`start`, then :meth:`close`."""

    def __init__(self, admin: Administration, address: AdminAddress, tls: AdminTls, health_servicer: health.aio.HealthServicer) -> None:
        self._admin = admin
        self._requested = address
        self._tls = tls
        self._health = health_servicer
        self._server: grpc.aio.Server | None = None
        self.address: AdminAddress = address
        """Where it listens (the port it was given when asked for port 0)."""

    async def start(self) -> None:
        """Listen and serve.

        Raises:
            BrokerError: a file that cannot be read, an address that cannot be bound.
        """
        credentials = await self._tls.credentials()
        server = grpc.aio.server(options=ADMIN_SERVER_OPTIONS)
        server.add_generic_rpc_handlers(admin_handlers(self._admin))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port = server.add_secure_port(str(self._requested), credentials)
        except RuntimeError as exc:  # grpc raises when it cannot bind
            raise BrokerError(errno.EADDRNOTAVAIL, OPERATION, f"cannot listen on {self._requested}: {exc}") from None
        if not port:
            raise BrokerError(errno.EADDRINUSE, OPERATION, f"cannot listen on {self._requested}")
        await server.start()
        self._server = server
        self.address = AdminAddress(self._requested.host, port)
        log.info("admin listener on %s (TLS, client certificates required)", self.address)

    async def reload_certificates(self) -> None:
        """Read the certificate, key and client CA files again (SIGHUP): the
        next connections are made with them, the open ones keep theirs.

        Raises:
            BrokerError: files that cannot be read or are not a working set;
                the running certificates stay.
        """
        await self._tls.reload()
        log.info("admin listener: certificates read again from %s, %s and %s; new connections use them",
                 self._tls.cert, self._tls.key, self._tls.client_ca)

    async def close(self, grace: float = 0) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)
