"""The registry of sessions, without a server: admission by the policy and the
limits, look-up by token, and closing a session."""

from __future__ import annotations

import errno
import os

import pytest

from grant_broker.core.operations import evtchn
from grant_broker.core.policy import Limits, Policy
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.v1 import evtchn_pb2

from .conftest import PEER, SELF, Core


def test_a_session_acts_as_the_domain_it_asked_for(core: Core) -> None:
    session = core.registered(domid=PEER)
    assert session.domid == PEER
    assert core.registry.sessions == [session]


def test_a_session_that_names_no_domain_acts_as_the_providers_default(core: Core) -> None:
    assert core.registered(domid=None).domid == SELF


def test_the_policy_refuses_a_uid_it_does_not_allow_with_eperm(core: Core) -> None:
    registry = core.new_registry(Policy(allowed_uids=frozenset({os.getuid() + 1})))
    with pytest.raises(BrokerError) as raised:
        core.registered(registry, uid=os.getuid() + 2)
    assert raised.value.errno == errno.EPERM
    assert registry.sessions == []


def test_the_policy_admits_root_whatever_it_lists(core: Core) -> None:
    registry = core.new_registry(Policy(allowed_uids=frozenset({4242})))
    core.registered(registry, uid=0)


def test_sessions_beyond_max_sessions_are_edquot(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_sessions=1))
    core.registered(registry, uid=1000)
    with pytest.raises(BrokerError) as raised:
        core.registered(registry, uid=1001)
    assert raised.value.errno == errno.EDQUOT


def test_sessions_of_one_uid_beyond_max_sessions_per_uid_are_edquot(core: Core) -> None:
    registry = core.new_registry(limits=Limits(max_sessions_per_uid=1))
    core.registered(registry, uid=1000)
    core.registered(registry, uid=1001)
    with pytest.raises(BrokerError) as raised:
        core.registered(registry, uid=1000)
    assert raised.value.errno == errno.EDQUOT
    assert "uid 1000" in raised.value.detail


def test_a_domain_the_backend_cannot_be_is_einval(core: Core) -> None:
    with pytest.raises(BrokerError) as raised:
        core.registered(domid=0x7FF0)
    assert raised.value.errno == errno.EINVAL
    assert core.registry.sessions == []


def test_lookup_finds_a_session_by_its_token(core: Core) -> None:
    session = core.registered()
    core.registered()
    assert core.registry.lookup(session.token) is session


@pytest.mark.parametrize("token", [None, "", "not a token"])
def test_lookup_without_a_known_token_is_eperm(core: Core, token: str | None) -> None:
    core.registered()
    with pytest.raises(BrokerError) as raised:
        core.registry.lookup(token)
    assert raised.value.errno == errno.EPERM


def test_a_token_is_refused_once_its_client_hung_up(core: Core) -> None:
    session = core.registered()
    core.hang_up(session)
    with pytest.raises(BrokerError) as raised:
        core.registry.lookup(session.token)
    assert raised.value.errno == errno.EPERM


async def test_close_session_releases_the_session_and_forgets_its_token(core: Core) -> None:
    session = core.registered()
    await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))
    core.registry.close_session(session)
    assert session.closed.is_set() and session.channel.closed
    assert core.registry.sessions == []
    with pytest.raises(BrokerError):
        core.registry.lookup(session.token)


def test_sessions_of_one_registry_share_its_event_hub(core: Core) -> None:
    assert core.registered().event_hub is core.registered().event_hub is core.registry.event_hub


def test_reconfigure_narrows_the_admission_of_new_sessions(core: Core) -> None:
    registry = core.new_registry(Policy())
    core.registered(registry, uid=4242)
    registry.reconfigure(policy=Policy(allowed_uids=frozenset({4343})))
    with pytest.raises(BrokerError) as raised:
        core.registered(registry, uid=4242)
    assert raised.value.errno == errno.EPERM


def test_reconfigure_gives_live_sessions_the_new_policy_and_limits_and_keeps_them_open(core: Core) -> None:
    registry = core.new_registry(Policy(), Limits(max_ports_per_uid=10))
    session = core.registered(registry, uid=4242)
    policy, limits = Policy(admin_uids=frozenset({4242})), Limits(max_ports_per_uid=3)
    registry.reconfigure(policy=policy, limits=limits)
    assert registry.sessions == [session] and session.connected()
    assert (session.policy, session.limits, session.user.limits) == (policy, limits, limits)
