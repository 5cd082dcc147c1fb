"""The remote admin listener: mutual TLS on loopback, certificate identities and their rights.

A broker runs in the test's loop with ``admin_listen="127.0.0.1:0"`` and a
fresh PKI (tls_helpers.py): a CA that signs the broker's certificate and the
administrators' ones, and a second CA that the broker does not trust.  The
policy gives ``ops.example.org`` (a DNS name in the ops certificate) every
right and ``viewer`` (a subject common name) only ``view``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import io
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import cast
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import grant_broker_client
from grant_broker.core.policy import AdminIdentity, Limits, Policy
from grant_broker.daemon.logs import configure_audit
from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.admin import AdminClient, connect_admin
from grant_broker_client.gntdev import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.v1 import gntdev_pb2

from waiting import eventually

from .tls_helpers import Authority, Issued, issue, make_authority

SHARER, MAPPER = 1, 2


@pytest.fixture(autouse=True)
def transport() -> str:
    """The admin listener is the same whichever transport the SDK's sessions use: run once."""
    return "fast-path"


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Issued
    ops: Issued  # SAN DNS ops.example.org: every right
    viewer: Issued  # CN viewer: view only
    stranger: Issued  # signed by the CA, named by no policy
    rogue: Issued  # CN and SAN of ops, signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_authority(directory, "admin-ca")
    other = make_authority(directory, "other-ca")
    return Pki(
        ca=ca,
        server=issue(ca, directory, "server", "broker", dns=("localhost",), ips=("127.0.0.1",), server=True),
        ops=issue(ca, directory, "ops", "ops-admin", dns=("ops.example.org",)),
        viewer=issue(ca, directory, "viewer", "viewer"),
        stranger=issue(ca, directory, "stranger", "stranger", dns=("stranger.example.org",)),
        rogue=issue(other, directory, "rogue", "ops-admin", dns=("ops.example.org",)),
    )


@dataclass
class AdminBroker:
    server: BrokerServer
    socket_path: str
    address: str
    pki: Pki

    @property
    def registry(self):  # type: ignore[no-untyped-def]
        assert self.server.registry is not None
        return self.server.registry

    async def admin(self, who: Issued | None = None, **kwargs: object) -> AdminClient:
        who = who or self.pki.ops
        return await connect_admin(self.address, cert=who.cert, key=who.key, ca=self.pki.ca.cert, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def broker_limits() -> Limits:
    return Limits()


@pytest.fixture
async def admin_broker(short_tmp: Path, pki: Pki, broker_limits: Limits) -> AsyncIterator[AdminBroker]:
    config = ServerConfig(
        socket_path=str(short_tmp / "broker.sock"),
        backend="emulated",
        grace_seconds=0,
        limits=broker_limits,
        policy=Policy(admin_identities=(
            AdminIdentity.parse("ops.example.org=all"),
            AdminIdentity.parse("viewer=view"),
        )),
        admin_listen="127.0.0.1:0",
        admin_cert=pki.server.cert,
        admin_key=pki.server.key,
        admin_client_ca=pki.ca.cert,
    )
    async with BrokerServer(config) as server:
        assert server.admin_listener is not None
        yield AdminBroker(server, config.socket_path, str(server.admin_listener.address), pki)


@pytest.fixture
async def admin(admin_broker: AdminBroker) -> AsyncIterator[AdminClient]:
    async with await admin_broker.admin() as client:
        yield client


@pytest.fixture
def audit_records() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    undo = configure_audit("stderr", stream=stream)
    try:
        yield stream
    finally:
        undo()


def _records(stream: io.StringIO, event: str) -> list[dict[str, object]]:
    return [record for line in stream.getvalue().splitlines() if (record := json.loads(line))["event"] == event]


# --------------------------------------------------------------------------- allowed calls


async def test_whoami_names_the_identity_the_policy_matched_and_its_rights(admin: AdminClient) -> None:
    me = await admin.whoami()
    assert me.identity == "ops.example.org"
    assert set(me.rights) == {"view", "release", "drain", "limits"}
    assert "ops-admin" in me.names  # the subject's common name is one of the names


async def test_a_subject_common_name_can_be_the_identity(admin_broker: AdminBroker) -> None:
    async with await admin_broker.admin(admin_broker.pki.viewer) as viewer:
        me = await viewer.whoami()
    assert (me.identity, list(me.rights)) == ("viewer", ["view"])


async def test_status_shows_every_session_and_what_it_holds(admin_broker: AdminBroker, admin: AdminClient) -> None:
    async with await grant_broker_client.connect(admin_broker.socket_path, domid=SHARER, client_name="one") as one, \
            await grant_broker_client.connect(admin_broker.socket_path, domid=MAPPER, client_name="two"):
        async with await one.gntalloc.share(MAPPER, 3):
            answer = await admin.status()
    sessions = {s.client_name: s for s in answer.status.sessions}
    assert set(sessions) == {"one", "two"}
    assert sessions["one"].usage.granted_pages == 3
    assert answer.status.open_fds > 0  # the full view
    assert not answer.draining
    assert {limit.name: limit.value for limit in answer.limits}["max_sessions"] == Limits().max_sessions


async def test_describe_session_by_id(admin_broker: AdminBroker, admin: AdminClient) -> None:
    async with await grant_broker_client.connect(admin_broker.socket_path, domid=SHARER, client_name="described") as session:
        info = await admin.describe_session(session.session_id)
    assert (info.session_id, info.client_name, info.domid) == (session.session_id, "described", SHARER)


async def test_describing_a_session_that_is_not_there_is_not_found(admin: AdminClient) -> None:
    with pytest.raises(BrokerClientError) as raised:
        await admin.describe_session(999)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert "no session 999" in raised.value.detail


async def test_the_metrics_snapshot_follows_what_clients_hold(admin_broker: AdminBroker, admin: AdminClient) -> None:
    def mapped(text: bytes) -> float:
        total = 0.0
        for family in text_string_to_metric_families(text.decode()):
            if family.name == "grant_broker_grants_mapped":
                total += sum(sample.value for sample in family.samples)
        return total

    async with await grant_broker_client.connect(admin_broker.socket_path, domid=SHARER) as sharer, \
            await grant_broker_client.connect(admin_broker.socket_path, domid=MAPPER) as mapper:
        async with await sharer.gntalloc.share(MAPPER, 2) as pages:
            async with await mapper.gntdev.map([(SHARER, ref) for ref in pages.refs]):
                snapshot = await admin.metrics()
                assert snapshot.content_type.startswith("text/plain")
                assert mapped(snapshot.text) == 2
            assert mapped((await admin.metrics()).text) == 0


# --------------------------------------------------------------------------- refusals


async def _raw_call(address: str, credentials: grpc.ChannelCredentials, method: str, request: bytes = b"") -> grpc.aio.AioRpcError:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(request, timeout=10)
    return raised.value


async def test_a_client_without_a_certificate_does_not_get_past_the_handshake(admin_broker: AdminBroker) -> None:
    ca = Path(admin_broker.pki.ca.cert).read_bytes()
    error = await _raw_call(admin_broker.address, grpc.ssl_channel_credentials(root_certificates=ca), "/grant_broker.v1.Admin/WhoAmI")
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_of_another_ca_does_not_get_past_the_handshake(admin_broker: AdminBroker) -> None:
    # Its names are those of the administrator's certificate: only the CA differs.
    async with await admin_broker.admin(admin_broker.pki.rogue) as rogue:
        with pytest.raises(BrokerClientError) as raised:
            await rogue.whoami()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert admin_broker.address in str(raised.value)


async def test_a_plaintext_client_is_not_served(admin_broker: AdminBroker) -> None:
    async with grpc.aio.insecure_channel(admin_broker.address) as channel:
        call = channel.unary_unary("/grant_broker.v1.Admin/WhoAmI", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_identity_the_policy_does_not_name_is_permission_denied(
    admin_broker: AdminBroker, audit_records: io.StringIO
) -> None:
    async with await admin_broker.admin(admin_broker.pki.stranger) as stranger:
        with pytest.raises(BrokerClientError) as raised:
            await stranger.status()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "stranger.example.org" in raised.value.detail
    [record] = _records(audit_records, "admin_refused")
    assert record["admin_identity"] is None
    assert "stranger.example.org" in record["certificate_names"]  # type: ignore[operator]


async def test_an_operation_outside_the_identitys_rights_is_permission_denied(
    admin_broker: AdminBroker, audit_records: io.StringIO
) -> None:
    async with await admin_broker.admin(admin_broker.pki.viewer) as viewer:
        await viewer.status()  # view: allowed
        with pytest.raises(BrokerClientError) as raised:
            await viewer.drain(0)
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs drain" in raised.value.detail
    assert admin_broker.registry.draining is None
    [record] = _records(audit_records, "admin_refused")
    assert (record["admin_identity"], record["operation"]) == ("viewer", "Drain")


def _credentials(who: Issued, pki: Pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(pki.ca.cert).read_bytes(),
        private_key=Path(who.key).read_bytes(),
        certificate_chain=Path(who.cert).read_bytes(),
    )


@pytest.mark.parametrize(
    "method", ["/grant_broker.v1.Gntdev/Map", "/grant_broker.v1.Evtchn/Subscribe", "/grant_broker.v1.Broker/Status"]
)
async def test_device_calls_are_failed_precondition(admin_broker: AdminBroker, method: str) -> None:
    credentials = _credentials(admin_broker.pki.ops, admin_broker.pki)
    request = gntdev_pb2.MapRequest().SerializeToString()
    error = await _raw_call(admin_broker.address, credentials, method, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only grant_broker.v1.Admin" in (error.details() or "")


# --------------------------------------------------------------------------- release, drain, limits


@pytest.fixture
async def sharer(admin_broker: AdminBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(admin_broker.socket_path, domid=SHARER, client_name="sharer") as session:
        yield session


async def test_force_release_fires_the_sessions_unmap_notifications(
    admin_broker: AdminBroker, admin: AdminClient, sharer: Session, audit_records: io.StringIO
) -> None:
    mapper = await grant_broker_client.connect(admin_broker.socket_path, domid=MAPPER, client_name="stuck")
    try:
        async with await sharer.gntalloc.share(MAPPER, 1) as pages:
            offered = await sharer.evtchn.bind_unbound_port(remote_domain=MAPPER)
            port = await mapper.evtchn.bind_interdomain(remote_domain=SHARER, remote_port=offered)
            pages.view[100] = 1
            clearing = await mapper.gntdev.map([(SHARER, pages.refs[0])])
            await clearing.set_unmap_notify(100, UNMAP_NOTIFY_CLEAR_BYTE)
            signalling = await mapper.gntdev.map([(SHARER, pages.refs[0])])
            await signalling.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, port)
            async with sharer.evtchn.subscribe(ports=[offered]) as events:
                released = await admin.release_session(mapper.session_id, reason="stuck compositor")
                event = await asyncio.wait_for(anext(events), 5)
            assert event.port == offered  # type: ignore[union-attr]
            assert pages.view[100] == 0
            assert released.released.usage.mappings == 2
            assert mapper.session_id not in {s.id for s in admin_broker.registry.sessions}
    finally:
        await mapper.close()
    [record] = _records(audit_records, "admin_action")
    assert record["admin_identity"] == "ops.example.org"
    assert (record["operation"], record["session_id"], record["outcome"]) == ("ReleaseSession", mapper.session_id, "ok")
    assert [r["session_id"] for r in _records(audit_records, "session_closed")] == [mapper.session_id]


async def test_releasing_a_session_that_is_not_there_is_not_found(admin: AdminClient) -> None:
    with pytest.raises(BrokerClientError) as raised:
        await admin.release_session(4242)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND


async def test_drain_refuses_new_sessions_and_ends_when_the_last_one_has(
    admin_broker: AdminBroker, admin: AdminClient, sharer: Session
) -> None:
    draining = asyncio.ensure_future(admin.drain(30))
    while admin_broker.registry.draining is None:
        await asyncio.sleep(0.01)
    assert not draining.done()
    with pytest.raises(BrokerClientError) as raised:
        await grant_broker_client.connect(admin_broker.socket_path, domid=MAPPER)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(f"unix:{admin_broker.socket_path}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    async with grpc.aio.secure_channel(admin_broker.address, _credentials(admin_broker.pki.viewer, admin_broker.pki)) as channel:
        remote = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert remote.status == health_pb2.HealthCheckResponse.NOT_SERVING  # seen on the admin listener too
    await sharer.close()
    outcome = await asyncio.wait_for(draining, 10)
    assert (outcome.sessions_left, outcome.released) == (0, 0)
    assert admin_broker.registry.sessions == []
    assert (await admin.status()).draining


async def test_drain_releases_the_sessions_left_at_its_deadline(
    admin_broker: AdminBroker, admin: AdminClient, sharer: Session
) -> None:
    outcome = await admin.drain(0.2, release_at_deadline=True)
    assert (outcome.sessions_left, outcome.released) == (0, 1)
    assert admin_broker.registry.sessions == []


async def test_set_limits_changes_a_budget_of_live_sessions(
    admin_broker: AdminBroker, admin: AdminClient, sharer: Session
) -> None:
    answer = await admin.set_limits({"max_pool_pages_per_session": 2})
    assert {limit.name: limit.value for limit in answer.limits}["max_pool_pages_per_session"] == 2
    with pytest.raises(BrokerClientError) as raised:
        await sharer.gntalloc.share(MAPPER, 3)
    assert raised.value.errno == errno.EDQUOT
    async with await sharer.gntalloc.share(MAPPER, 2):
        pass


async def test_a_reload_says_which_limits_set_at_run_time_it_replaces(
    admin_broker: AdminBroker, admin: AdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    await admin.set_limits({"max_pool_pages_per_session": 2, "max_sessions": 7})
    config = admin_broker.server.config
    reloaded = dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_sessions=7))
    with caplog.at_level(logging.WARNING, logger="grant_broker.daemon.server"):
        admin_broker.server.reconfigure(reloaded)  # what a reload (SIGHUP) does: the file's limits
    assert admin_broker.registry.limits.max_pool_pages_per_session == config.limits.max_pool_pages_per_session
    replaced = [record.getMessage() for record in caplog.records]
    assert replaced == [
        f"reload: max_pool_pages_per_session=2, set at run time (set-limit), is replaced by the configuration's "
        f"{config.limits.max_pool_pages_per_session}"
    ]  # max_sessions: the file now says what set-limit said


async def test_set_limits_refuses_a_name_that_is_no_limit(admin: AdminClient) -> None:
    with pytest.raises(BrokerClientError) as raised:
        await admin.set_limits({"max_everything": 3})
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- certificates rotated in place


@dataclass
class RotatableBroker:
    """A broker whose admin certificate, key and client CA are copies of its
    own, for a test to rewrite as a certificate manager would."""

    server: BrokerServer
    address: str
    cert: Path
    key: Path
    client_ca: Path

    def rotate(self, cert: str, key: str, client_ca: str) -> None:
        for path, source in ((self.cert, cert), (self.key, key), (self.client_ca, client_ca)):
            path.write_bytes(Path(source).read_bytes())

    async def reload(self) -> None:
        assert self.server.admin_listener is not None
        await self.server.admin_listener.reload_certificates()


@pytest.fixture
async def rotatable(short_tmp: Path, pki: Pki) -> AsyncIterator[RotatableBroker]:
    tls = short_tmp / "tls"
    tls.mkdir()
    cert, key, client_ca = tls / "server.pem", tls / "server.key", tls / "clients-ca.pem"
    config = ServerConfig(
        socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0,
        policy=Policy(admin_identities=(AdminIdentity.parse("ops.example.org=all"),)),
        admin_listen="127.0.0.1:0", admin_cert=str(cert), admin_key=str(key), admin_client_ca=str(client_ca),
    )
    broker = RotatableBroker(cast(BrokerServer, None), "", cert, key, client_ca)
    broker.rotate(pki.server.cert, pki.server.key, pki.ca.cert)
    async with BrokerServer(config) as server:
        assert server.admin_listener is not None
        broker.server, broker.address = server, str(server.admin_listener.address)
        yield broker


@dataclass(frozen=True)
class Rotated:
    ca: Authority
    server: Issued
    ops: Issued


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Rotated:
    """The next generation: a new CA, the broker's certificate and ops' signed by it."""
    directory = tmp_path_factory.mktemp("rotated")
    ca = make_authority(directory, "admin-ca-2")
    return Rotated(
        ca=ca,
        server=issue(ca, directory, "server", "broker", dns=("localhost",), ips=("127.0.0.1",), server=True),
        ops=issue(ca, directory, "ops", "ops-admin", dns=("ops.example.org",)),
    )


async def _whoami(address: str, who: Issued, ca: Authority) -> str:
    async with await connect_admin(address, cert=who.cert, key=who.key, ca=ca.cert) as client:
        return (await client.whoami()).identity


async def test_a_reload_takes_rotated_admin_certificates_for_new_connections(
    rotatable: RotatableBroker, pki: Pki, rotated: Rotated
) -> None:
    async with await connect_admin(rotatable.address, cert=pki.ops.cert, key=pki.ops.key, ca=pki.ca.cert) as before:
        assert (await before.whoami()).identity == "ops.example.org"
        rotatable.rotate(rotated.server.cert, rotated.server.key, rotated.ca.cert)
        await rotatable.reload()
        assert await _whoami(rotatable.address, rotated.ops, rotated.ca) == "ops.example.org"
        with pytest.raises(BrokerClientError) as raised:  # the old CA's clients: past
            await _whoami(rotatable.address, pki.ops, pki.ca)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        # A connection made before the rotation keeps what it was made with.
        assert (await before.whoami()).identity == "ops.example.org"


async def test_rotated_files_are_only_read_at_a_reload(rotatable: RotatableBroker, pki: Pki, rotated: Rotated) -> None:
    rotatable.rotate(rotated.server.cert, rotated.server.key, rotated.ca.cert)
    assert await _whoami(rotatable.address, pki.ops, pki.ca) == "ops.example.org"


async def test_a_reload_with_a_key_that_is_not_the_certificates_keeps_the_running_ones(
    rotatable: RotatableBroker, pki: Pki, rotated: Rotated
) -> None:
    rotatable.rotate(pki.server.cert, rotated.server.key, pki.ca.cert)  # a rotation half-way: the new key only
    with pytest.raises(BrokerError) as raised:
        await rotatable.reload()
    assert raised.value.errno == errno.EINVAL
    assert str(rotatable.key) in str(raised.value) and "not a PEM certificate and its key" in str(raised.value)
    assert await _whoami(rotatable.address, pki.ops, pki.ca) == "ops.example.org"


async def test_a_reload_with_a_client_ca_that_is_not_pem_keeps_the_running_certificates(
    rotatable: RotatableBroker, pki: Pki
) -> None:
    rotatable.client_ca.write_text("not a certificate\n")
    with pytest.raises(BrokerError) as raised:
        await rotatable.reload()
    assert raised.value.errno == errno.EINVAL and str(rotatable.client_ca) in str(raised.value)
    assert await _whoami(rotatable.address, pki.ops, pki.ca) == "ops.example.org"


async def test_the_admin_listener_does_not_start_with_a_key_that_is_not_its_certificates(
    short_tmp: Path, pki: Pki, rotated: Rotated
) -> None:
    config = ServerConfig(
        socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0,
        admin_listen="127.0.0.1:0", admin_cert=pki.server.cert, admin_key=rotated.server.key, admin_client_ca=pki.ca.cert,
    )
    with pytest.raises(BrokerError) as raised:
        async with BrokerServer(config):
            pass
    assert raised.value.errno == errno.EINVAL and "not a PEM certificate and its key" in str(raised.value)
    assert not os.path.exists(config.socket_path)


async def test_the_admin_listener_does_not_start_with_an_encrypted_key(short_tmp: Path, pki: Pki) -> None:
    # Refused, not prompted for: OpenSSL would ask for its password on the broker's terminal.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki.server.key).read_bytes(), None)
    encrypted = short_tmp / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
    ))
    config = ServerConfig(
        socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0,
        admin_listen="127.0.0.1:0", admin_cert=pki.server.cert, admin_key=str(encrypted), admin_client_ca=pki.ca.cert,
    )
    with pytest.raises(BrokerError) as raised:
        async with BrokerServer(config):
            pass
    assert raised.value.errno == errno.EINVAL and "(unencrypted)" in str(raised.value)


# --------------------------------------------------------------------------- configuration and the CLI


async def test_the_admin_listener_needs_its_certificates(short_tmp: Path) -> None:
    config = ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", admin_listen="127.0.0.1:0")
    with pytest.raises(BrokerError) as raised:
        await BrokerServer(config).start()
    assert raised.value.errno == errno.EINVAL
    assert "--admin-cert" in raised.value.detail


async def _cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "grant_broker.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _tls_options(broker: AdminBroker, who: Issued) -> list[str]:
    return ["--admin", broker.address, "--cert", who.cert, "--key", who.key, "--ca", broker.pki.ca.cert]


async def test_the_cli_shows_a_remote_brokers_status(admin_broker: AdminBroker, sharer: Session) -> None:
    code, out, err = await _cli(*_tls_options(admin_broker, admin_broker.pki.viewer), "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert [s["client_name"] for s in status["status"]["sessions"]] == ["sharer"]


async def test_the_cli_releases_a_session(admin_broker: AdminBroker, sharer: Session) -> None:
    code, out, err = await _cli(*_tls_options(admin_broker, admin_broker.pki.ops), "release-session", str(sharer.session_id))
    assert code == 0, err
    assert admin_broker.registry.sessions == []


async def test_a_cli_refusal_names_the_host(admin_broker: AdminBroker) -> None:
    code, out, err = await _cli(*_tls_options(admin_broker, admin_broker.pki.viewer), "drain", "--deadline", "0")
    assert code == 4  # refused by the policy
    assert admin_broker.address in err
    assert "PERMISSION_DENIED" in err


async def test_the_cli_says_which_host_did_not_answer(admin_broker: AdminBroker) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{probe.getsockname()[1]}"
    options = _tls_options(admin_broker, admin_broker.pki.ops)
    options[1] = silent
    code, out, err = await _cli(*options, "--admin-timeout", "3", "status", "--json")
    assert code in (1, 3)  # unreachable, or timed out
    error = json.loads(err.strip().splitlines()[-1])["error"]
    assert silent in error["message"]
    assert error["grpc_code"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def test_serve_starts_the_admin_listener_from_its_options(short_tmp: Path, pki: Pki) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "grant_broker.cli", "--socket", str(short_tmp / "broker.sock"), "serve", "--json",
        "--backend", "emulated", "--grace", "0", "--admin-listen", "127.0.0.1:0", "--admin-cert", pki.server.cert,
        "--admin-key", pki.server.key, "--admin-client-ca", pki.ca.cert, "--admin-identity", "viewer=view",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        listening = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        address = listening["admin"]
        assert address.startswith("127.0.0.1:")
        async with await connect_admin(address, cert=pki.viewer.cert, key=pki.viewer.key, ca=pki.ca.cert) as viewer:
            me = await viewer.whoami()
        assert (me.identity, list(me.rights)) == ("viewer", ["view"])
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def test_sighup_rotates_the_admin_certificates_of_a_serving_broker(short_tmp: Path, pki: Pki, rotated: Rotated) -> None:
    tls = short_tmp / "tls"
    tls.mkdir()
    files = RotatableBroker(cast(BrokerServer, None), "", tls / "server.pem", tls / "server.key", tls / "clients-ca.pem")
    files.rotate(pki.server.cert, pki.server.key, pki.ca.cert)
    config = short_tmp / "broker.toml"
    config.write_text(f'socket = "{short_tmp / "broker.sock"}"\nbackend = "emulated"\ngrace_seconds = 0\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "grant_broker.cli", "serve", "--json", "--config", str(config),
        "--admin-listen", "127.0.0.1:0", "--admin-cert", str(files.cert), "--admin-key", str(files.key),
        "--admin-client-ca", str(files.client_ca), "--admin-identity", "ops.example.org=all",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        address = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))["admin"]
        assert await _whoami(address, pki.ops, pki.ca) == "ops.example.org"
        files.rotate(rotated.server.cert, rotated.server.key, rotated.ca.cert)
        process.send_signal(signal.SIGHUP)

        async def rotated_in() -> bool:
            try:
                return await _whoami(address, rotated.ops, rotated.ca) == "ops.example.org"
            except BrokerClientError:
                return False

        await eventually(rotated_in, "the new CA's administrator served after SIGHUP")
        with pytest.raises(BrokerClientError):
            await _whoami(address, pki.ops, pki.ca)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def test_an_identity_removed_from_the_policy_at_run_time_is_refused_at_its_next_call(
    admin_broker: AdminBroker, admin: AdminClient
) -> None:
    await admin.whoami()
    config = admin_broker.server.config
    admin_broker.server.reconfigure(dataclasses.replace(config, policy=Policy()))  # what a reload (SIGHUP) does
    with pytest.raises(BrokerClientError) as raised:
        await admin.whoami()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
