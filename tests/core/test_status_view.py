"""What the broker tells strangers (issue 14 §7): Status and the log.

By default (``view="own"``) a session sees the sessions of its own uid, an
administrator's session (``Policy.admin_uids``, root by default) sees every
session and the broker's descriptor count, and a call without a session —
which could come from anyone who can open the socket, even a uid the policy
refuses — sees no session at all.  ``view="all"`` shows everything to anyone.
"""

from __future__ import annotations

import logging
import os

import pytest

from grant_broker.core.operations.broker import BrokerStatus, StatusView
from grant_broker.core.policy import Policy
from grant_broker_protocol.v1 import broker_pb2

from .conftest import Core

ME = os.getuid()
OTHER = ME + 1000


def status_of(core: Core, view: StatusView = "own", *, admins: frozenset[int] = frozenset()) -> BrokerStatus:
    registry = core.new_registry(Policy(admin_uids=admins))
    return BrokerStatus(registry, core.peer.capabilities, view=view)


async def ask(status: BrokerStatus, session: object) -> broker_pb2.StatusResponse:
    reply = await status.status(session, broker_pb2.StatusRequest())  # type: ignore[arg-type]
    return reply.message


async def test_by_default_a_session_sees_only_its_own_uids_sessions(core: Core) -> None:
    status = status_of(core)
    mine = core.registered(status.registry, name="mine")
    also_mine = core.registered(status.registry, name="also mine")
    core.registered(status.registry, uid=OTHER, name="someone else's")
    response = await ask(status, mine)
    assert [(s.session_id, s.client_name) for s in response.sessions] == [(mine.id, "mine"), (also_mine.id, "also mine")]
    assert response.open_fds == 0  # how busy the broker is is not a stranger's business
    assert response.version and response.capabilities.backend == "emulated"


async def test_by_default_a_call_without_a_session_sees_no_session(core: Core) -> None:
    status = status_of(core)
    core.registered(status.registry, name="someone")
    response = await ask(status, None)
    assert list(response.sessions) == [] and response.open_fds == 0
    assert response.version and response.capabilities.backend == "emulated" and response.uptime_seconds >= 0


async def test_an_administrator_sees_every_session(core: Core) -> None:
    status = status_of(core, admins=frozenset({OTHER}))
    mine = core.registered(status.registry, name="mine")
    admin = core.registered(status.registry, uid=OTHER, name="admin")
    response = await ask(status, admin)
    assert [s.session_id for s in response.sessions] == [mine.id, admin.id]
    assert response.open_fds > 0


async def test_root_is_the_default_administrator(core: Core) -> None:
    assert Policy().admin_uids == frozenset({0})


async def test_view_all_shows_every_session_to_anyone(core: Core) -> None:
    status = status_of(core, "all")
    first = core.registered(status.registry)
    second = core.registered(status.registry, uid=OTHER)
    for caller in (None, first):
        response = await ask(status, caller)
        assert [s.session_id for s in response.sessions] == [first.id, second.id]
        assert response.open_fds > 0


def test_an_unknown_view_is_refused(core: Core) -> None:
    with pytest.raises(ValueError, match="not one of own, all"):
        BrokerStatus(core.registry, core.peer.capabilities, view="everyone")  # type: ignore[arg-type]


def test_a_client_name_cannot_forge_log_lines(core: Core, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="grant_broker")
    session = core.registered(core.registry, name="x\n2024-01-01 INFO grant_broker: session 99 opened: root")
    core.registry.close_session(session)
    lines = [record.getMessage() for record in caplog.records]
    assert any("opened" in line for line in lines) and any("released" in line for line in lines)
    assert not any("\n" in line for line in lines), lines
