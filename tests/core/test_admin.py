"""The remote administrator's operations without a listener: rights, force-release, drain, limits.

The TLS listener and the SDK's admin client are tested end to end in
tests/service/test_admin_tls.py; here :class:`Administration` is called
directly with the names a certificate would carry.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from grant_broker.core import admin as admin_module
from grant_broker.core.admin import AdminCaller, Administration, DrainOutcome, changed_limits, drain_sessions, release_session
from grant_broker.core.operations.broker import BrokerStatus
from grant_broker.core.policy import ADMIN_RIGHTS, AdminIdentity, Limits, Policy
from grant_broker.core.registry import SessionRegistry
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.v1 import admin_pb2

from .conftest import Core

OPS = AdminCaller(("ops-admin", "CN=ops-admin,O=Example", "ops.example.org"), "ipv4:127.0.0.1:5555")
VIEWER = AdminCaller(("viewer",), "ipv4:127.0.0.1:5556")
STRANGER = AdminCaller(("stranger",), "ipv4:127.0.0.1:5557")
POLICY = Policy(admin_identities=(AdminIdentity.parse("ops.example.org=all"), AdminIdentity.parse("viewer=view")))


# --------------------------------------------------------------------------- identities and rights


def test_an_admin_identity_reads_its_rights() -> None:
    assert AdminIdentity.parse("viewer=view,drain") == AdminIdentity("viewer", frozenset({"view", "drain"}))


def test_all_stands_for_every_right() -> None:
    assert AdminIdentity.parse("ops=all").rights == frozenset(ADMIN_RIGHTS)


def test_an_identity_may_contain_an_equals_sign() -> None:
    # The rights follow the last "=": a subject such as CN=ops,O=Example is an identity too.
    assert AdminIdentity.parse("CN=ops,O=Example=view").identity == "CN=ops,O=Example"


@pytest.mark.parametrize("text", ["viewer", "viewer=", "=view", "viewer=read", "viewer=view,root"])
def test_an_admin_identity_without_known_rights_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="IDENTITY=RIGHT"):
        AdminIdentity.parse(text)


def test_the_policy_matches_any_name_of_the_certificate() -> None:
    assert POLICY.admin_rights(OPS.names) == ("ops.example.org", frozenset(ADMIN_RIGHTS))
    assert POLICY.admin_rights(STRANGER.names) is None


def test_rights_of_several_matching_identities_add_up() -> None:
    policy = Policy(admin_identities=(AdminIdentity.parse("a=view"), AdminIdentity.parse("b=drain")))
    assert policy.admin_rights(["a", "b"]) == ("a", frozenset({"view", "drain"}))


# --------------------------------------------------------------------------- limits


def test_changed_limits_keeps_each_limits_type() -> None:
    limits = changed_limits(Limits(), [
        admin_pb2.LimitSetting(name="max_grants_per_session", value=10),
        admin_pb2.LimitSetting(name="hello_timeout_seconds", value=2.5),
    ])
    assert (limits.max_grants_per_session, limits.hello_timeout_seconds) == (10, 2.5)
    assert isinstance(limits.max_grants_per_session, int)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [("max_everything", 1, "is no limit"), ("max_sessions", 0, "not positive"), ("max_sessions", 2.5, "whole number")],
)
def test_changed_limits_refuses_what_is_no_limit_value(name: str, value: float, reason: str) -> None:
    with pytest.raises(BrokerError) as raised:
        changed_limits(Limits(), [admin_pb2.LimitSetting(name=name, value=value)])
    assert raised.value.errno == errno.EINVAL
    assert reason in raised.value.detail


# --------------------------------------------------------------------------- the service


def _administration(core: Core, registry: SessionRegistry, drained: list[tuple[float, bool]] | None = None) -> Administration:
    async def drain(deadline: float, release: bool) -> DrainOutcome:
        if drained is not None:
            drained.append((deadline, release))
        return DrainOutcome(0, 0, 0.0)

    status = BrokerStatus(registry, core.peer.capabilities)
    return Administration(registry, status, metrics=lambda: ("text/plain", b"grant_broker_sessions 0\n"), drain=drain)


async def test_an_identity_the_policy_does_not_name_is_refused(core: Core) -> None:
    admin = _administration(core, core.new_registry(POLICY))
    with pytest.raises(BrokerError) as raised:
        await admin.call(STRANGER, "WhoAmI", admin_pb2.WhoAmIRequest())
    assert raised.value.errno == errno.EPERM
    assert "no administrator" in raised.value.detail


async def test_an_operation_outside_the_rights_is_refused_and_not_run(core: Core) -> None:
    drained: list[tuple[float, bool]] = []
    admin = _administration(core, core.new_registry(POLICY), drained)
    with pytest.raises(BrokerError) as raised:
        await admin.call(VIEWER, "Drain", admin_pb2.DrainRequest(deadline_seconds=1))
    assert raised.value.errno == errno.EPERM
    assert drained == []


async def test_drain_is_handed_to_the_daemon_with_its_deadline(core: Core) -> None:
    drained: list[tuple[float, bool]] = []
    admin = _administration(core, core.new_registry(POLICY), drained)
    await admin.call(OPS, "Drain", admin_pb2.DrainRequest(deadline_seconds=3, release_at_deadline=True))
    assert drained == [(3.0, True)]


async def test_set_limits_applies_to_live_sessions(core: Core) -> None:
    registry = core.new_registry(POLICY)
    session = core.registered(registry)
    admin = _administration(core, registry)
    request = admin_pb2.SetLimitsRequest(limits=[admin_pb2.LimitSetting(name="max_ports_per_session", value=3)])
    await admin.call(OPS, "SetLimits", request)
    assert registry.limits.max_ports_per_session == 3
    assert session.limits.max_ports_per_session == 3


async def test_metrics_are_the_daemons_snapshot(core: Core) -> None:
    admin = _administration(core, core.new_registry(POLICY))
    answer = await admin.call(VIEWER, "Metrics", admin_pb2.MetricsRequest())
    assert isinstance(answer, admin_pb2.MetricsResponse)
    assert answer.text == b"grant_broker_sessions 0\n"


# --------------------------------------------------------------------------- force-release and drain


async def test_release_shuts_the_sessions_fd_channel(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    # No fd channel server reads this session: the registry releases it once the wait is over.
    monkeypatch.setattr(admin_module, "RELEASE_WAIT_SECONDS", 0.05)
    registry = core.new_registry()
    session = core.registered(registry)
    client_end = core._client_of[session]
    await release_session(registry, session, "test")
    assert session.closed.is_set()
    assert registry.sessions == []
    assert client_end.recv(64) == b""  # the client sees its channel end


async def test_drain_refuses_new_sessions(core: Core) -> None:
    registry = core.new_registry()
    await drain_sessions(registry, 0)
    with pytest.raises(BrokerError) as raised:
        core.registered(registry)
    assert raised.value.errno == errno.EAGAIN


async def test_drain_ends_when_the_last_session_has(core: Core) -> None:
    registry = core.new_registry()
    session = core.registered(registry)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, registry.close_session, session)
    outcome = await drain_sessions(registry, 30)
    assert (outcome.sessions_left, outcome.released) == (0, 0)
    assert outcome.waited_seconds < 30


async def test_drain_releases_what_is_left_at_its_deadline(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_module, "RELEASE_WAIT_SECONDS", 0.05)
    registry = core.new_registry()
    core.registered(registry)
    core.registered(registry)
    outcome = await drain_sessions(registry, 0.05, release_at_deadline=True)
    assert (outcome.sessions_left, outcome.released) == (0, 2)


def test_every_method_of_the_admin_service_has_its_right() -> None:
    from grant_broker_protocol.v1 import admin_pb2 as protocol

    methods = {method.name for method in protocol.DESCRIPTOR.services_by_name["Admin"].methods}
    assert methods == set(admin_module.RIGHT_OF)
    assert set(admin_module.RIGHT_OF.values()) == set(ADMIN_RIGHTS)
