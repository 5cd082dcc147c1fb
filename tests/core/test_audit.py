"""The audit log (core/audit.py): one record per session opened and closed, refusal
by the policy or a budget, grants mapped/shared and released, port bound and
unbound — each with the session's identity — on a logger of its own.

The records are captured in-process by a handler on the ``grant_broker.audit``
logger (as the daemon's destinations receive them); their JSON form and where
they go are tested in ``tests/test_logs.py`` and ``tests/service/test_audit_log.py``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from grant_broker.backend.contract import GrantRef, GrantRefs
from grant_broker.core import audit
from grant_broker.core.operations import evtchn, gntalloc, gntdev
from grant_broker.core.policy import DomainGrant, Limits, Policy
from grant_broker.core.session import Session
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import PeerCredentials
from grant_broker_protocol.v1 import common_pb2, evtchn_pb2, gntalloc_pb2, gntdev_pb2

from .conftest import PEER, SELF, Core

USER = 1000  # an unprivileged uid (the tests run as root, whom the policy never narrows)


class Records(logging.Handler):
    """The audit records, as ``{"event": ..., **identity, **fields}``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"event": record.getMessage(), **record.audit_identity, **record.audit})  # type: ignore[attr-defined]

    def of(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["event"] == event]

    def one(self, event: str) -> dict[str, Any]:
        (record,) = self.of(event)
        return record


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    audit.audit_log.addHandler(handler)
    audit.audit_log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        audit.audit_log.removeHandler(handler)
        audit.audit_log.setLevel(audit.OFF)


def identity(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.id,
        "uid": session.creds.uid,
        "pid": session.creds.pid,
        "client_name": session.client_name,
        "domain": session.domid,
    }


def open_as(core: Core, registry: Any, uid: int, domid: int | None = SELF, name: str = "audited") -> Session:
    channel, _ = core.channel()
    creds = PeerCredentials(os.getpid(), uid, uid)
    try:
        return registry.open(channel, creds, name, domid, None)
    except BaseException:
        channel.close()
        raise


def test_the_audit_logger_is_its_own() -> None:
    assert audit.audit_log.name == "grant_broker.audit"
    assert audit.audit_log.propagate is False


def test_a_record_never_reaches_the_operational_log(core: Core, records: Records) -> None:
    # (pytest's own capture handlers are attached to non-propagating loggers
    # too, so this looks at a handler of the root logger's own.)
    operational = Records()
    operational.emit = lambda record: operational.records.append({"event": record.name})  # type: ignore[method-assign]
    root = logging.getLogger()
    level = root.level
    root.addHandler(operational)
    root.setLevel(logging.DEBUG)
    try:
        session = core.registered(name="quiet")
        core.registry.close_session(session)
    finally:
        root.removeHandler(operational)
        root.setLevel(level)
    assert [r["event"] for r in records.records] == ["session_opened", "session_closed"]
    assert {"event": "grant_broker.core.registry"} in operational.records  # the operational log's "session opened"
    assert {"event": audit.AUDIT_LOGGER} not in operational.records


def test_session_opened_and_closed_name_the_session_and_what_it_held(core: Core, records: Records) -> None:
    session = core.registered(name="compositor")
    opened = records.one("session_opened")
    assert opened == {"event": "session_opened", **identity(session), "gid": os.getgid(), "vmid": session.vmid}
    assert opened["client_name"] == "compositor" and opened["domain"] == SELF
    session.usage.mapped_grants = 2  # as if it held two grants when it ended
    core.registry.close_session(session)
    closed = records.one("session_closed")
    assert {k: closed[k] for k in identity(session)} == identity(session)
    assert closed["held"] == {"mapped_grants": 2}
    assert closed["seconds"] >= 0


async def test_a_map_and_its_unmap_are_one_record_each(core: Core, records: Records) -> None:
    granted = core.grant(2)
    session = core.session(name="mapper")
    reply = await gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=granted.refs, writable=True))
    reply.close()
    mapped = records.one("grants_mapped")
    assert mapped == {
        "event": "grants_mapped", **identity(session), "operation": "gntdev map", "remote_domain": PEER,
        "refs": granted.refs, "index": reply.message.index, "writable": True,
    }
    await gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=reply.message.index, count=2))
    unmapped = records.one("grants_unmapped")
    assert unmapped == {
        "event": "grants_unmapped", **identity(session), "operation": "gntdev unmap grant ref", "remote_domain": PEER,
        "refs": granted.refs, "index": reply.message.index,
    }


async def test_a_reservation_is_a_map(core: Core, records: Records) -> None:
    granted = core.grant(2)
    session = core.session()
    request = gntdev_pb2.MapGrantRefRequest(count=2)
    for ref in granted.refs:
        request.refs.add(domid=PEER, ref=ref)
    index = (await gntdev.map_grant_ref(session, request)).message.index
    mapped = records.one("grants_mapped")
    assert (mapped["operation"], mapped["remote_domain"], mapped["refs"], mapped["index"]) == (
        "gntdev map grant refs", PEER, granted.refs, index,
    )
    assert "writable" not in mapped  # known when the memory is handed out, not at the reservation


def test_grants_of_several_domains_name_the_domain_of_each_ref() -> None:
    assert audit._grants((GrantRef(3, 8), GrantRef(3, 9))) == {"remote_domain": 3, "refs": [8, 9]}
    assert audit._grants((GrantRef(3, 8), GrantRef(4, 9))) == {"remote_domain": [3, 4], "refs": [8, 9]}
    # Packed, as the map path keeps them: the same record.
    assert audit._grants(GrantRefs(3, [8, 9])) == {"remote_domain": 3, "refs": [8, 9]}
    assert audit._grants(GrantRefs([3, 4], [8, 9])) == {"remote_domain": [3, 4], "refs": [8, 9]}
    assert audit._grants(GrantRefs([], [])) == audit._grants(()) == {"remote_domain": None, "refs": []}


async def test_shared_pages_and_their_release_are_one_record_each(core: Core, records: Records) -> None:
    session = core.session(name="sharer")
    reply = await gntalloc.alloc_gref(session, gntalloc_pb2.AllocGrefRequest(domid=PEER, flags=0, count=2))
    reply.close()
    shared = records.one("grants_shared")
    refs = list(reply.message.gref_ids)
    assert shared == {
        "event": "grants_shared", **identity(session), "operation": "gntalloc alloc gref", "remote_domain": PEER,
        "refs": refs, "index": reply.message.index, "writable": False,
    }
    await gntalloc.dealloc_gref(session, gntalloc_pb2.DeallocGrefRequest(index=reply.message.index, count=2))
    assert records.one("grants_unshared") == {
        "event": "grants_unshared", **identity(session), "operation": "gntalloc dealloc gref", "remote_domain": PEER,
        "refs": refs, "index": reply.message.index,
    }


async def test_a_port_bound_and_unbound_is_one_record_each(core: Core, records: Records) -> None:
    session = core.session(name="notifier")
    reply = await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))
    port = reply.message.port
    assert records.one("port_bound") == {
        "event": "port_bound", **identity(session), "operation": "evtchn bind unbound port", "port": port,
        "remote_domain": PEER,
    }
    await evtchn.unbind(session, evtchn_pb2.UnbindRequest(port=port))
    assert records.one("port_unbound") == {
        "event": "port_unbound", **identity(session), "operation": "evtchn unbind", "port": port,
    }


async def test_a_dmabuf_export_is_a_map_until_it_is_released(core: Core, records: Records) -> None:
    granted = core.grant(1)
    session = core.session()
    reply = await gntdev.dmabuf_export_from_refs(
        session, gntdev_pb2.DmabufExportFromRefsRequest(count=1, domid=PEER, refs=granted.refs)
    )
    reply.close()  # the client lets go of the buffer
    dmabuf_id = reply.message.dmabuf_id
    mapped = records.one("grants_mapped")
    assert (mapped["operation"], mapped["remote_domain"], mapped["refs"], mapped["dmabuf_id"]) == (
        "gntdev dma-buf export", PEER, granted.refs, dmabuf_id,
    )
    await gntdev.dmabuf_export_wait_released(
        session, gntdev_pb2.DmabufExportWaitReleasedRequest(dmabuf_id=dmabuf_id, wait_to_ms=2000)
    )
    unmapped = records.one("grants_unmapped")
    assert (unmapped["remote_domain"], unmapped["refs"], unmapped["dmabuf_id"]) == (PEER, granted.refs, dmabuf_id)


async def test_a_dmabuf_import_is_a_share_until_it_is_released(core: Core, records: Records) -> None:
    session = core.session()
    allocation = await gntalloc.alloc_gref(session, gntalloc_pb2.AllocGrefRequest(domid=PEER, flags=1, count=1))
    (pages,) = allocation.fds
    transfer_id = 1
    session.incoming.deliver(transfer_id, [pages])
    request = gntdev_pb2.DmabufImportToRefsRequest(fd_transfer=transfer_id, fd=common_pb2.FdRef(index=0), count=1, domid=PEER)
    reply = await gntdev.dmabuf_import_to_refs(session, request)
    shared = records.of("grants_shared")[-1]
    refs = list(reply.message.refs)
    assert (shared["operation"], shared["remote_domain"], shared["refs"], shared["dmabuf_id"]) == (
        "gntdev dma-buf import", PEER, refs, reply.message.dmabuf_id,
    )
    await gntdev.dmabuf_import_release(session, gntdev_pb2.DmabufImportReleaseRequest(dmabuf_id=reply.message.dmabuf_id))
    unshared = records.one("grants_unshared")
    assert (unshared["remote_domain"], unshared["refs"], unshared["dmabuf_id"]) == (PEER, refs, reply.message.dmabuf_id)


async def test_notify_and_refused_requests_are_not_recorded(core: Core, records: Records) -> None:
    session = core.session()
    port = (await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))).message.port
    records.records.clear()
    for _ in range(3):
        await evtchn.notify(session, evtchn_pb2.NotifyRequest(port=port))
    with pytest.raises(BrokerError):
        await gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=[3000]))  # EINVAL: not a refusal of the broker's
    assert records.records == []


def test_a_hello_the_policy_refuses_is_a_policy_refusal(core: Core, records: Records) -> None:
    registry = core.new_registry(Policy(allowed_uids=frozenset({4242})))
    with pytest.raises(BrokerError) as refused:
        open_as(core, registry, USER, domid=7, name="intruder")
    assert refused.value.errno == errno.EPERM
    record = records.one("policy_refused")
    assert record["session_id"] is None
    assert (record["uid"], record["pid"], record["client_name"], record["domain"]) == (USER, os.getpid(), "intruder", 7)
    assert record["operation"] == "open session" and record["errno"] == "EPERM"
    assert "not allowed by the broker's policy" in record["reason"]
    assert records.of("session_opened") == []


def test_a_hello_for_a_domain_the_domain_policy_refuses_is_a_policy_refusal(core: Core, records: Records) -> None:
    registry = core.new_registry(Policy(act_as_domains=(DomainGrant.parse(f"{USER + 1}:5"),)))  # reserved for another uid
    with pytest.raises(BrokerError):
        open_as(core, registry, USER, domid=5)
    record = records.one("policy_refused")
    assert (record["uid"], record["domain"], record["errno"]) == (USER, 5, "EPERM")


def test_a_hello_past_the_session_budget_is_a_budget_refusal(core: Core, records: Records) -> None:
    registry = core.new_registry(limits=Limits(max_sessions_per_uid=1))
    open_as(core, registry, USER)
    with pytest.raises(BrokerError) as refused:
        open_as(core, registry, USER)
    assert refused.value.errno == errno.EDQUOT
    record = records.one("budget_refused")
    assert record["session_id"] is None and record["uid"] == USER and record["errno"] == "EDQUOT"
    assert "max_sessions_per_uid" in record["reason"]


async def test_a_call_naming_a_domain_the_policy_refuses_is_a_policy_refusal(core: Core, records: Records) -> None:
    registry = core.new_registry(Policy(remote_domains=(DomainGrant.parse(f"{USER}:4"),)))
    session = open_as(core, registry, USER, name="narrowed")
    with pytest.raises(BrokerError):
        await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))
    record = records.one("policy_refused")
    assert {k: record[k] for k in identity(session)} == identity(session)
    assert record["operation"] == "evtchn bind unbound port" and record["errno"] == "EPERM"
    assert f"may not bind to domain {PEER}" in record["reason"]
    assert records.of("port_bound") == []


@pytest.mark.parametrize("level", ["session", "uid"])
async def test_a_call_past_a_budget_is_a_budget_refusal(core: Core, records: Records, level: str) -> None:
    limits = Limits(max_ports_per_session=1) if level == "session" else Limits(max_ports_per_uid=1)
    session = core.session(limits)
    await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))
    with pytest.raises(BrokerError) as refused:
        await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))
    assert refused.value.errno == errno.EDQUOT
    record = records.one("budget_refused")
    assert {k: record[k] for k in identity(session)} == identity(session)
    assert record["operation"] == "evtchn bind unbound port"
    assert f"max_ports_per_{level}" in record["reason"]


async def test_the_grant_quota_is_a_budget_refusal(core: Core, records: Records) -> None:
    granted = core.grant(2)
    session = core.session(Limits(max_grants_per_session=1))
    with pytest.raises(BrokerError):
        await gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=granted.refs))
    assert "max_grants_per_session" in records.one("budget_refused")["reason"]
    assert records.of("grants_mapped") == []


async def test_switched_off_nothing_is_made(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    assert audit.audit_log.level == audit.OFF  # until the daemon routes it (`serve --audit off` leaves it so)
    handler = Records()
    audit.audit_log.addHandler(handler)
    made: list[object] = []
    monkeypatch.setattr(audit, "_emit", lambda *args: made.append(args))
    try:
        session = core.registered()
        reply = await gntalloc.alloc_gref(session, gntalloc_pb2.AllocGrefRequest(domid=PEER, flags=1, count=1))
        reply.close()
        core.registry.close_session(session)
    finally:
        audit.audit_log.removeHandler(handler)
    assert made == [] and handler.records == []
