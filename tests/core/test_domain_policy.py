"""Who may act as which domain, and which domains a session's calls may name (issue 14 §5).

Before: on the emulated backend every admitted user could act as any domain
and mem-buf VMID — and so map another user's grants, bind the port another
user offered, or import another user's memparcel, by naming its domain.  Now
(core/policy.py, checked through core/checks.py ``check_peers``):

* with ``act_as="owned"`` (``grant-broker serve``'s default), a domain or VMID
  belongs to the first uid that acts as it (administrators and the broker's
  own uid excepted); ``--allow-domain``/``--allow-vmid`` grants reserve
  domains for their grantees, and a uid granted some may act only as those
  (``--act-as granted``: a uid without a grant acts as none);
* ``--allow-remote``/``--allow-remote-vmid`` narrow the domains and VMIDs a
  uid's calls may name (map grants of, grant to, copy with, bind to, share
  with) — on every call, on every backend (on a real Xen host every session
  acts as the broker's domain, so this is what narrows a client there).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable
from typing import Any

import pytest

from grant_broker.backend.contract import PAGE_SIZE, Backend
from grant_broker.core.operations import evtchn, gntalloc, gntdev, membuf
from grant_broker.core.policy import DomainGrant, Limits, Policy
from grant_broker.core.registry import BackendProvider, SessionRegistry
from grant_broker.core.session import Session
from grant_broker_protocol.abi import MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import PeerCredentials
from grant_broker_protocol.v1 import common_pb2, evtchn_pb2, gntalloc_pb2, gntdev_pb2, membuf_pb2

from .conftest import PEER, SELF, Core

USER = 1000  # unprivileged uids (the tests run as root, the broker's own uid and an administrator)
OTHER = 1001
GROUP = 100
RW = 0x3  # PERM_READ | PERM_WRITE


def grant(text: str) -> DomainGrant:
    return DomainGrant.parse(text)


def open_as(core: Core, registry: SessionRegistry, uid: int, domid: int | None = None, vmid: int | None = None, *,
            gid: int | None = None) -> Session:
    """A session of *uid* opened through *registry*, as the fd channel server opens one."""
    channel, _ = core.channel()
    creds = PeerCredentials(os.getpid(), uid, USER if gid is None else gid)
    try:
        return registry.open(channel, creds, f"uid {uid}", domid, vmid)
    except BaseException:
        channel.close()
        raise


def denied(call: Any, *words: str) -> BrokerError:
    with pytest.raises(BrokerError) as raised:
        call()
    assert raised.value.errno == errno.EPERM, str(raised.value)
    for word in words:
        assert word in str(raised.value), str(raised.value)
    return raised.value


async def denied_call(call: Awaitable[Any], *words: str) -> BrokerError:
    with pytest.raises(BrokerError) as raised:
        await call
    assert raised.value.errno == errno.EPERM, str(raised.value)
    for word in words:
        assert word in str(raised.value), str(raised.value)
    return raised.value


async def not_denied(call: Awaitable[Any]) -> None:
    """The policy let *call* through (it may still fail further on, for its own reasons)."""
    try:
        reply = await call
    except BrokerError as exc:
        assert exc.errno != errno.EPERM, str(exc)
    else:
        reply.close()


# --------------------------------------------------------------------------- the grants, as written


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000:3", DomainGrant(frozenset({3}), uid=1000)),
        ("uid:1000:3,4", DomainGrant(frozenset({3, 4}), uid=1000)),
        ("gid:100:10-12,20", DomainGrant(frozenset({10, 11, 12, 20}), gid=100)),
    ],
)
def test_grants_are_written_uid_or_gid_then_ids(text: str, expected: DomainGrant) -> None:
    assert DomainGrant.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["", "1000", "1000:", "x:3", "1000:a", "1000:5-3", "1000:3,5-3", "-1:3", "group:100:3", "1000:-2", "1000:0-4294967295"]
)
def test_a_malformed_grant_is_refused_saying_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected \[uid:\|gid:\]N:ID"):
        DomainGrant.parse(text)


# --------------------------------------------------------------------------- acting as a domain (emulated)


def test_a_domain_belongs_to_the_first_user_that_acts_as_it(core: Core) -> None:
    registry = core.new_registry(Policy(act_as="owned"))
    open_as(core, registry, USER, 5)
    open_as(core, registry, USER, 5)  # its own again: fine
    # Before: another user acting as domain 5 could map what was granted to it,
    # bind what was offered to it.  Now it is refused at the hello.
    denied(lambda: open_as(core, registry, OTHER, 5), "domain 5 belongs to another user")
    assert open_as(core, registry, OTHER, 6).domid == 6
    # Administrators (root) act as any domain; a domain root acted as first is root's.
    assert open_as(core, registry, 0, 6).domid == 6
    open_as(core, registry, 0, 7)
    denied(lambda: open_as(core, registry, USER, 7), "domain 7 belongs to another user")


def test_without_act_as_owned_anyone_acts_as_any_domain_no_grant_names(core: Core) -> None:
    # The default of the Policy class (embedding, tests); `grant-broker serve` defaults to "owned".
    assert Policy().act_as == "any"
    registry = core.new_registry(Policy(act_as_domains=(grant("1000:3"),)))
    open_as(core, registry, USER, 3)
    assert open_as(core, registry, OTHER, 5).domid == open_as(core, registry, USER + 2, 5).domid == 5
    denied(lambda: open_as(core, registry, OTHER, 3), "domain 3 is reserved")
    with pytest.raises(ValueError, match="act_as 'some' is not one of owned, granted, any"):
        Policy(act_as="some")  # type: ignore[arg-type]


def test_a_domain_stays_its_users_after_its_sessions_ended(core: Core) -> None:
    registry = core.new_registry(Policy(act_as="owned"))
    session = open_as(core, registry, USER, 5)
    registry.close_session(session)
    # Grants offered to domain 5 outlive the session: nobody else may pick them up.
    denied(lambda: open_as(core, registry, OTHER, 5), "belongs to another user")


def test_granted_domains_are_the_only_ones_and_reserved(core: Core) -> None:
    registry = core.new_registry(Policy(act_as_domains=(grant("1000:3,4"), grant("gid:200:8")), act_as="owned"))
    assert open_as(core, registry, USER).domid == 3  # a hello naming none: the smallest granted
    assert open_as(core, registry, USER, 4).domid == 4
    denied(lambda: open_as(core, registry, USER, 5), "may not act as domain 5", "3-4")
    # Reserved for their grantees, even before they used them.
    denied(lambda: open_as(core, registry, OTHER, 4), "domain 4 is reserved")
    denied(lambda: open_as(core, registry, OTHER, 8), "domain 8 is reserved")
    assert open_as(core, registry, OTHER, 8, gid=200).domid == 8  # a member of gid 200
    assert open_as(core, registry, OTHER, 9).domid == 9  # not reserved: first come
    assert open_as(core, registry, 0, 3).domid == 3  # root: any


def test_granted_domains_only_leaves_a_user_without_grants_no_domain(core: Core) -> None:
    registry = core.new_registry(Policy(act_as_domains=(grant("1000:3"),), act_as="granted"))
    assert open_as(core, registry, USER).domid == 3
    denied(lambda: open_as(core, registry, OTHER), "may act as no domain", "--allow-domain")
    denied(lambda: open_as(core, registry, OTHER, 9), "may act as no domain")
    assert registry.sessions and all(s.creds.uid == USER for s in registry.sessions)


def test_the_brokers_own_uid_is_not_restricted(core: Core) -> None:
    registry = core.new_registry(Policy(admin_uids=frozenset(), owner_uid=USER, act_as="granted"))
    assert open_as(core, registry, USER, 12).domid == 12
    denied(lambda: open_as(core, registry, OTHER, 13), "may act as no domain")


def test_on_a_backend_of_one_domain_acting_as_is_not_asked(core: Core) -> None:
    # A real Xen host: every session is the broker's own domain; its policy is what the calls name.
    hypervisor = core.hypervisor

    def xen_like(domid: int | None, vmid: int | None) -> Backend:
        return hypervisor.backend(0, vmid=MEM_BUF_VMID_PRIMARY_VM)

    registry = SessionRegistry(BackendProvider(xen_like, any_domain=False), Policy(act_as="granted"), Limits())
    try:
        assert open_as(core, registry, USER).domid == 0
        assert open_as(core, registry, OTHER).domid == 0
    finally:
        registry.close()


# --------------------------------------------------------------------------- what the calls name


def narrowed(core: Core) -> Session:
    """A session of uid USER acting as SELF, which may name only domain 4 (and its own)."""
    registry = core.new_registry(Policy(remote_domains=(grant(f"{USER}:4"),)))
    return open_as(core, registry, USER, SELF)


async def test_a_narrowed_user_may_grant_only_to_the_domains_it_may_name(core: Core) -> None:
    session = narrowed(core)
    request = gntalloc_pb2.AllocGrefRequest
    await denied_call(gntalloc.alloc_gref(session, request(domid=PEER, count=1, flags=1)), "may not grant to domain 2", "4")
    await not_denied(gntalloc.alloc_gref(session, request(domid=4, count=1, flags=1)))
    await not_denied(gntalloc.alloc_gref(session, request(domid=SELF, count=1, flags=1)))  # its own
    # Checked on every call, not once.
    await denied_call(gntalloc.alloc_gref(session, request(domid=PEER, count=1, flags=1)), "may not grant to")
    assert session.usage.allocations == 2


async def test_a_narrowed_user_may_map_and_copy_only_grants_of_the_domains_it_may_name(core: Core) -> None:
    session = narrowed(core)
    ref = core.grant(1).refs[0]  # granted by domain 2 to this session's domain
    await denied_call(gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=[ref])), "may not map grants of domain 2")
    grant_ref = common_pb2.GrantRef(domid=PEER, ref=ref)
    await denied_call(gntdev.map_grant_ref(session, gntdev_pb2.MapGrantRefRequest(count=1, refs=[grant_ref])), "domain 2")
    await denied_call(
        gntdev.dmabuf_export_from_refs(session, gntdev_pb2.DmabufExportFromRefsRequest(domid=PEER, count=1, refs=[ref])),
        "domain 2",
    )
    segment = gntdev_pb2.GrantCopySegment(
        source=gntdev_pb2.GrantCopyPointer(foreign=gntdev_pb2.GrantCopyForeign(ref=ref, domid=PEER)),
        dest=gntdev_pb2.GrantCopyPointer(virt=gntdev_pb2.GrantCopyLocal()), len=8, flags=1,
    )
    await denied_call(gntdev.grant_copy(session, gntdev_pb2.GrantCopyRequest(count=1, segments=[segment])), "copy with grants of domain 2")
    assert (session.usage.mappings, session.usage.mapped_grants) == (0, 0)
    # Domain 4 may be named: the call goes on (and fails for want of a grant, not of permission).
    await not_denied(gntdev.map_(session, gntdev_pb2.MapRequest(domids=[4], refs=[ref])))


async def test_a_narrowed_user_may_bind_only_to_the_domains_it_may_name(core: Core) -> None:
    session = narrowed(core)
    await denied_call(evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER)), "may not bind to domain 2")
    await denied_call(
        evtchn.bind_interdomain(session, evtchn_pb2.BindInterdomainRequest(remote_domain=PEER, remote_port=1)), "bind to domain 2"
    )
    await not_denied(evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=4)))
    assert session.usage.event_channels == 1


async def test_users_the_remote_rules_do_not_name_are_not_narrowed(core: Core) -> None:
    registry = core.new_registry(Policy(remote_domains=(grant(f"{USER}:4"),)))
    other = open_as(core, registry, OTHER, 6)
    root = open_as(core, registry, 0, 7)
    for session in (other, root):
        await not_denied(gntalloc.alloc_gref(session, gntalloc_pb2.AllocGrefRequest(domid=PEER, count=1, flags=1)))


# --------------------------------------------------------------------------- mem-buf VMIDs


def acl(vmid: int) -> dict[str, Any]:
    return {"nr_acl_entries": 1, "acl_list": [membuf_pb2.AclEntry(vmid=vmid, perms=RW)]}


def alloc(session: Session, vmid: int = MEM_BUF_VMID_TRUSTED_VM) -> Awaitable[Any]:
    return membuf.alloc(session, membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE, **acl(vmid)))


async def test_a_vmid_belongs_to_the_first_user_that_uses_mem_buf_as_it(core: Core) -> None:
    registry = core.new_registry(Policy(act_as="owned"))
    # Every session has a VMID (the default one when its hello names none):
    # the VMID is taken by its first mem-buf call, not by the hello.
    first = open_as(core, registry, USER, 5, MEM_BUF_VMID_PRIMARY_VM)
    second = open_as(core, registry, OTHER, 6, MEM_BUF_VMID_PRIMARY_VM)
    await not_denied(alloc(first))
    await denied_call(alloc(second), f"mem-buf VMID {MEM_BUF_VMID_PRIMARY_VM} belongs to another user")
    importer = open_as(core, registry, OTHER, 6, MEM_BUF_VMID_TRUSTED_VM)
    request = membuf_pb2.MemBufImportRequest(memparcel_hdl=1, **acl(MEM_BUF_VMID_TRUSTED_VM))
    await not_denied(membuf.import_(importer, request))  # its own VMID now
    await denied_call(alloc(open_as(core, registry, USER, 5, MEM_BUF_VMID_TRUSTED_VM)), "belongs to another user")


async def test_granted_vmids_and_narrowed_acls(core: Core) -> None:
    policy = Policy(act_as_vmids=(grant(f"{USER}:{MEM_BUF_VMID_TRUSTED_VM}"),), remote_vmids=(grant(f"{USER}:40"),))
    registry = core.new_registry(policy)
    session = open_as(core, registry, USER, 5)
    assert session.vmid == MEM_BUF_VMID_TRUSTED_VM  # a hello naming none: the granted one
    denied(lambda: open_as(core, registry, USER, 5, MEM_BUF_VMID_PRIMARY_VM), f"may not act as mem-buf VMID {MEM_BUF_VMID_PRIMARY_VM}")
    await not_denied(alloc(session, MEM_BUF_VMID_TRUSTED_VM))  # its own
    await not_denied(alloc(session, 40))
    await denied_call(alloc(session, 41), "may not lend memory to VMID 41")
    other = open_as(core, registry, OTHER, 6, MEM_BUF_VMID_TRUSTED_VM)  # the hello does not take VMIDs ...
    await denied_call(alloc(other), f"mem-buf VMID {MEM_BUF_VMID_TRUSTED_VM} is reserved")  # ... its mem-buf calls are refused
