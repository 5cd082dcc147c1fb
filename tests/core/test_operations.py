"""The operations of the core, called directly with request messages: no server, no gRPC.

Each test is one behaviour of one operation: a check the core makes before
any device is touched (with the errno a client gets), a limit, or a success
path and what it does to the session's usage.  The emulated hypervisor backs
the sessions (see ``conftest.py``); the transports' mapping of these errors
is tested in ``tests/transport`` and ``tests/service/test_bad_input.py``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
from collections.abc import Awaitable
from contextlib import closing
from typing import Any

import pytest

from grant_broker.backend.contract import PAGE_SIZE, GrantRef, GrantRefs
from grant_broker.core.operations import broker, evtchn, gntalloc, gntdev, membuf
from grant_broker.core.policy import Limits, Policy
from grant_broker.core.reply import Reply
from grant_broker.core.session import Session
from grant_broker_protocol.abi import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
    UNMAP_NOTIFY_CLEAR_BYTE,
    UNMAP_NOTIFY_SEND_EVENT,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi.grant_table import GNTST_general_error
from grant_broker_protocol.fds import OwnedFd, open_fd_count
from grant_broker_protocol.v1 import broker_pb2, common_pb2, evtchn_pb2, gntalloc_pb2, gntdev_pb2, membuf_pb2

from .conftest import PEER, SELF, Core, Granted

BEYOND_DOMID_T = 0x10000
FD0 = common_pb2.FdRef(index=0)
RW = 3
TRUSTED_RW = membuf_pb2.AclEntry(vmid=MEM_BUF_VMID_TRUSTED_VM, perms=RW)


# --------------------------------------------------------------------------- helpers


async def refused(call: Awaitable[Any], code: int, fragment: str = "") -> BrokerError:
    """Await *call*, which must fail with *code* and a detail containing *fragment*."""
    with pytest.raises(BrokerError) as raised:
        await call
    error = raised.value
    assert error.errno == code, str(error)
    assert fragment in error.detail, str(error)
    return error


def usage(session: Session) -> dict[str, int]:
    """The session's non-zero usage counts."""
    return {name: value for name, value in vars(session.usage).items() if value}


_transfer_ids = iter(range(1000, 1_000_000))


def send(session: Session, *fds: OwnedFd) -> int:
    """Deliver *fds* to the session as the fd channel server does for a transfer frame; the id."""
    transfer_id = next(_transfer_ids)
    session.incoming.deliver(transfer_id, list(fds))
    return transfer_id


def memfd(size: int = PAGE_SIZE, *, seal_shrink: bool = True) -> OwnedFd:
    fd = OwnedFd(os.memfd_create("core-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    os.ftruncate(fd.fileno(), size)
    if seal_shrink:
        fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def check_fds_match_spans(reply: Reply[Any], spans: Any) -> None:
    """The reply has one descriptor per span, named by index in order, each
    open and holding the span's bytes."""
    assert len(reply.fds) == len(spans) > 0
    for i, (span, fd) in enumerate(zip(spans, reply.fds, strict=True)):
        assert span.fd.index == i
        assert not fd.closed
        assert os.fstat(fd.fileno()).st_size >= span.offset + span.length


def read_span(reply: Reply[Any], i: int, length: int) -> bytes:
    span = reply.message.spans[i]
    with mmap.mmap(reply.fds[i].fileno(), span.length, mmap.MAP_SHARED, mmap.PROT_READ, offset=span.offset) as memory:
        return memory[:length]


def write_peer(granted: Granted, data: bytes, page: int = 0) -> None:
    """PEER writes *data* at the start of page *page* of its granted pages."""
    offset = page * PAGE_SIZE
    for span in granted.spans:
        if offset < span.length:
            with mmap.mmap(span.fd.fileno(), span.length, mmap.MAP_SHARED, offset=span.offset) as memory:
                memory[offset : offset + len(data)] = data
            return
        offset -= span.length
    raise AssertionError("no such page")


def read_peer(granted: Granted, length: int, page: int = 0) -> bytes:
    offset = page * PAGE_SIZE
    for span in granted.spans:
        if offset < span.length:
            with mmap.mmap(span.fd.fileno(), span.length, mmap.MAP_SHARED, mmap.PROT_READ, offset=span.offset) as memory:
                return memory[offset : offset + length]
        offset -= span.length
    raise AssertionError("no such page")


def grant_refs(granted: Granted, domid: int = PEER) -> list[common_pb2.GrantRef]:
    return [common_pb2.GrantRef(domid=domid, ref=ref) for ref in granted.refs]


async def map_all(session: Session, granted: Granted, *, writable: bool = True) -> Reply[gntdev_pb2.MapResponse]:
    return await gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=granted.refs, writable=writable))


async def reserve(session: Session, granted: Granted) -> int:
    """MapGrantRef of all of *granted*: the mapping's index."""
    reply = await gntdev.map_grant_ref(
        session, gntdev_pb2.MapGrantRefRequest(count=len(granted.refs), refs=grant_refs(granted))
    )
    return reply.message.index


async def bind(session: Session) -> int:
    """A port of *session* (unbound, for PEER)."""
    reply = await evtchn.bind_unbound_port(session, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER))
    return reply.message.port


# --------------------------------------------------------------------------- gntdev: map


async def test_map_grant_ref_with_count_0_is_einval(core: Core) -> None:
    await refused(gntdev.map_grant_ref(core.session(), gntdev_pb2.MapGrantRefRequest(count=0)), errno.EINVAL, "count is 0")


async def test_map_grant_ref_count_must_match_its_refs(core: Core) -> None:
    request = gntdev_pb2.MapGrantRefRequest(count=2, refs=[common_pb2.GrantRef(domid=PEER, ref=8)])
    await refused(gntdev.map_grant_ref(core.session(), request), errno.EINVAL, "count is 2 but 1 refs")


async def test_map_grant_ref_domid_beyond_domid_t_is_einval(core: Core) -> None:
    request = gntdev_pb2.MapGrantRefRequest(count=1, refs=[common_pb2.GrantRef(domid=BEYOND_DOMID_T, ref=8)])
    await refused(gntdev.map_grant_ref(core.session(), request), errno.EINVAL, "refs[0].domid 65536 does not fit domid_t")


async def test_map_without_refs_is_einval(core: Core) -> None:
    await refused(gntdev.map_(core.session(), gntdev_pb2.MapRequest(domids=[PEER])), errno.EINVAL, "count is 0")


async def test_map_needs_one_domid_per_ref_or_one_for_all(core: Core) -> None:
    request = gntdev_pb2.MapRequest(domids=[PEER, PEER], refs=[8, 9, 10])
    await refused(gntdev.map_(core.session(), request), errno.EINVAL, "2 domids for 3 refs")


@pytest.mark.parametrize(
    ("domids", "fragment"),
    [([BEYOND_DOMID_T], "domid 65536"), ([PEER, BEYOND_DOMID_T], "domids[1] 65536")],
    ids=["one-for-all", "one-per-ref"],
)
async def test_map_domid_beyond_domid_t_is_einval(core: Core, domids: list[int], fragment: str) -> None:
    request = gntdev_pb2.MapRequest(domids=domids, refs=[8] * len(domids))
    await refused(gntdev.map_(core.session(), request), errno.EINVAL, fragment)


async def test_map_of_an_ungranted_ref_is_refused_and_holds_nothing(core: Core) -> None:
    session = core.session()
    await refused(gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=[3000])), errno.EINVAL)
    assert usage(session) == {}
    assert gntdev.gntdev_state(session).mappings == {}


async def test_map_returns_one_descriptor_per_span_holding_the_pages(core: Core) -> None:
    granted = core.grant(2)
    write_peer(granted, b"page one", page=0)
    write_peer(granted, b"page two", page=1)
    session = core.session()
    reply = await map_all(session, granted)
    try:
        check_fds_match_spans(reply, reply.message.spans)
        assert sum(span.length for span in reply.message.spans) == 2 * PAGE_SIZE
        assert all(span.writable for span in reply.message.spans)
        content = b"".join(read_span(reply, i, reply.message.spans[i].length) for i in range(len(reply.fds)))
        assert content[:8] == b"page one" and content[PAGE_SIZE : PAGE_SIZE + 8] == b"page two"
    finally:
        reply.close()


async def test_map_read_only_gives_read_only_spans(core: Core) -> None:
    granted = core.grant(1)
    reply = await map_all(core.session(), granted, writable=False)
    with closing(reply):
        assert [span.writable for span in reply.message.spans] == [False]
        with pytest.raises(OSError):
            mmap.mmap(reply.fds[0].fileno(), PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


async def test_map_counts_the_mapping_in_usage(core: Core) -> None:
    granted = core.grant(3)
    session = core.session()
    reply = await map_all(session, granted)
    reply.close()
    assert usage(session) == {"mappings": 1, "mapped_grants": 3}


async def test_map_grant_ref_reserves_without_handing_out_memory(core: Core) -> None:
    granted = core.grant(2)
    session = core.session()
    reply = await gntdev.map_grant_ref(session, gntdev_pb2.MapGrantRefRequest(count=2, refs=grant_refs(granted)))
    assert reply.fds == []
    assert usage(session) == {"mappings": 1, "mapped_grants": 2}


async def test_unmap_returns_usage_to_zero(core: Core) -> None:
    granted = core.grant(2)
    session = core.session()
    reply = await map_all(session, granted)
    reply.close()
    await gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=reply.message.index, count=2))
    assert usage(session) == {}
    assert gntdev.gntdev_state(session).mappings == {}


async def test_map_keeps_the_grants_packed_from_the_request_to_the_device(core: Core) -> None:
    granted = core.grant(3)
    session = core.session()
    reply = await map_all(session, granted)
    reply.close()
    (mapping,) = gntdev.gntdev_state(session).mappings.values()
    # One domid and an array of refs, no object per grant (read as GrantRefs all the same).
    assert isinstance(mapping.refs, GrantRefs)
    assert (mapping.refs.domid, mapping.refs.refs.tolist()) == (PEER, granted.refs)
    assert mapping.refs == tuple(GrantRef(PEER, ref) for ref in granted.refs)


async def test_map_of_grants_of_several_domains_maps_each_from_its_own(core: Core) -> None:
    granted = core.grant(2)
    write_peer(granted, b"peer 0", page=0)
    write_peer(granted, b"peer 1", page=1)
    session = core.session()
    with core.hypervisor.backend(3, vmid=MEM_BUF_VMID_TRUSTED_VM) as third, third.open_gntalloc() as other:
        allocation = other.alloc_gref(SELF, 1)
        (span,) = other.memory_spans(allocation.index, 1)
        with span.fd, mmap.mmap(span.fd.fileno(), span.length, mmap.MAP_SHARED, offset=span.offset) as memory:
            memory[0:7] = b"third 0"
        request = gntdev_pb2.MapRequest(domids=[PEER, 3, PEER], refs=[granted.refs[0], allocation.refs[0], granted.refs[1]])
        reply = await gntdev.map_(session, request)
        with closing(reply):
            content = b"".join(read_span(reply, i, reply.message.spans[i].length) for i in range(len(reply.fds)))
        assert [content[page * PAGE_SIZE : page * PAGE_SIZE + 7] for page in range(3)] == [b"peer 0\0", b"third 0", b"peer 1\0"]
        refs = gntdev.gntdev_state(session).mappings[reply.message.index].refs
        assert refs.domid is None and refs.domids.tolist() == [PEER, 3, PEER]
        await gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=reply.message.index, count=3))


async def test_a_ref_given_twice_in_one_map_is_mapped_twice_and_ends_once(core: Core) -> None:
    granted = core.grant(2)
    write_peer(granted, b"twice", page=0)
    session = core.session()
    ref = granted.refs[0]
    reply = await gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=[ref, granted.refs[1], ref]))
    with closing(reply):
        content = b"".join(read_span(reply, i, reply.message.spans[i].length) for i in range(len(reply.fds)))
    assert content[0:5] == content[2 * PAGE_SIZE : 2 * PAGE_SIZE + 5] == b"twice"
    table = core.hypervisor.grants.tables[PEER]
    assert table.entries[ref].pins == 2 and table.entries[granted.refs[1]].pins == 1
    # The granter ends its grants while they are mapped: deferred until the unmap,
    # which frees each entry once (and its backing reference once).
    core.peer_gntalloc.dealloc_gref(granted.allocation.index, 2)
    assert ref in table.entries
    await gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=reply.message.index, count=3))
    assert ref not in table.entries and granted.refs[1] not in table.entries
    assert usage(session) == {}


async def test_a_refusal_amid_a_batch_names_that_ref_and_leaves_nothing_pinned(core: Core) -> None:
    granted = core.grant(3)
    session = core.session()
    refs = [granted.refs[0], granted.refs[1], 3000, granted.refs[2]]
    error = await refused(gntdev.map_(session, gntdev_pb2.MapRequest(domids=[PEER], refs=refs)), errno.EINVAL, "ref 3000 of domain 2")
    assert error.gntst == GNTST_general_error
    table = core.hypervisor.grants.tables[PEER]
    assert [table.entries[ref].pins for ref in granted.refs] == [0, 0, 0]
    assert usage(session) == {} and gntdev.gntdev_state(session).mappings == {}
    # A read-only grant amid writable ones: refused for a writable map only.
    read_only = core.grant(1, writable=False)
    request = gntdev_pb2.MapRequest(domids=[PEER], refs=[granted.refs[0], read_only.refs[0]], writable=True)
    await refused(gntdev.map_(session, request), errno.EINVAL, f"ref {read_only.refs[0]} of domain 2: a read-only grant")
    assert table.entries[granted.refs[0]].pins == 0
    request.writable = False
    with closing(await gntdev.map_(session, request)):
        pass


async def test_unmap_of_an_unknown_index_is_enoent(core: Core) -> None:
    request = gntdev_pb2.UnmapGrantRefRequest(index=4096, count=1)
    await refused(gntdev.unmap_grant_ref(core.session(), request), errno.ENOENT, "no mapping of 1 grants at index 0x1000")


async def test_unmap_with_a_count_other_than_the_mappings_is_enoent(core: Core) -> None:
    granted = core.grant(2)
    session = core.session()
    index = await reserve(session, granted)
    await refused(gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=index, count=1)), errno.ENOENT)
    assert usage(session) == {"mappings": 1, "mapped_grants": 2}


async def test_unmap_is_refused_for_an_index_only_a_dmabuf_export_holds(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux keeps the grants of a dma-buf export as a map of the same gntdev
    # instance (dmabuf_exp_from_refs -> gntdev_add_map), at an index that
    # IOCTL_GNTDEV_UNMAP_GRANT_REF finds and unmaps.  The session's ledger has
    # no mapping there, so the broker must refuse (ENOENT) without asking the
    # device: otherwise the kernel unmaps grants a dma-buf still uses, and the
    # ledger, asked afterwards, fails with a KeyError (INTERNAL to the client).
    granted = core.grant(2)
    session = core.session()
    reply = await gntdev.dmabuf_export_from_refs(
        session, gntdev_pb2.DmabufExportFromRefsRequest(domid=PEER, count=2, refs=granted.refs)
    )
    reply.close()
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(session.gntdev, "unmap_grant_ref", lambda index, count: asked.append((index, count)))
    await refused(gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=0, count=2)), errno.ENOENT)
    assert asked == []
    assert usage(session) == {"dmabufs": 1, "mapped_grants": 2}


# --------------------------------------------------------------------------- gntdev: quotas and SetMaxGrants


async def test_map_beyond_the_grant_quota_is_edquot(core: Core) -> None:
    granted = core.grant(3)
    session = core.session(Limits(max_grants_per_session=2))
    await refused(map_all(session, granted), errno.EDQUOT, "the limit is 2")
    assert usage(session) == {}


async def test_the_grant_quota_counts_what_the_session_already_maps(core: Core) -> None:
    session = core.session(Limits(max_grants_per_session=2))
    (await map_all(session, core.grant(2))).close()
    await refused(map_all(session, core.grant(1)), errno.EDQUOT, "holds 2 grants and asked for 1 more")


async def test_the_grant_quota_counts_the_pages_the_session_granted(core: Core) -> None:
    session = core.session(Limits(max_grants_per_session=2))
    (await gntalloc.alloc_gref(session, gntalloc_pb2.AllocGrefRequest(domid=PEER, flags=1, count=2))).close()
    await refused(map_all(session, core.grant(1)), errno.EDQUOT)


async def test_the_grant_quota_is_checked_before_the_refs(core: Core) -> None:
    # A request far beyond the quota is refused on its count alone.
    session = core.session(Limits(max_grants_per_session=2))
    request = gntdev_pb2.MapRequest(domids=[BEYOND_DOMID_T], refs=[1, 2, 3])
    await refused(gntdev.map_(session, request), errno.EDQUOT)


async def test_set_max_grants_above_the_broker_limit_is_e2big(core: Core) -> None:
    session = core.session(Limits(max_grants_per_session=8))
    await refused(gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=9)), errno.E2BIG, "limit of 8")


async def test_set_max_grants_up_to_the_broker_limit_is_accepted(core: Core) -> None:
    session = core.session(Limits(max_grants_per_session=8))
    await gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=8))
    assert gntdev.gntdev_state(session).max_grants == 8


async def test_set_max_grants_tolerates_a_device_without_a_per_instance_limit(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Current Linux answers SET_MAX_GRANTS with ENOTTY; the broker enforces the limit itself.
    session = core.session()

    def enotty(count: int) -> None:
        raise BrokerError(errno.ENOTTY, "gntdev set max grants")

    monkeypatch.setattr(session.gntdev, "set_max_grants", enotty)
    await gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=1))
    await refused(map_all(session, core.grant(2)), errno.EINVAL, "SetMaxGrants limit of 1")


async def test_set_max_grants_passes_on_other_device_errors(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    session = core.session()

    def eio(count: int) -> None:
        raise BrokerError(errno.EIO, "gntdev set max grants")

    monkeypatch.setattr(session.gntdev, "set_max_grants", eio)
    await refused(gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=1)), errno.EIO)
    assert gntdev.gntdev_state(session).max_grants is None


async def test_set_max_grants_refuses_more_than_the_limit_at_once_with_einval(core: Core) -> None:
    session = core.session()
    await gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=2))
    await refused(map_all(session, core.grant(3)), errno.EINVAL, "SetMaxGrants limit of 2")


async def test_set_max_grants_refuses_more_than_what_is_left_with_enomem(core: Core) -> None:
    session = core.session()
    await gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=3))
    (await map_all(session, core.grant(2))).close()
    await refused(map_all(session, core.grant(2)), errno.ENOMEM, "maps 2 grants")


async def test_set_max_grants_lets_the_session_map_up_to_it(core: Core) -> None:
    session = core.session()
    await gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=3))
    (await map_all(session, core.grant(2))).close()
    (await map_all(session, core.grant(1))).close()
    assert usage(session) == {"mappings": 2, "mapped_grants": 3}


async def test_set_max_grants_leaves_room_once_a_mapping_is_unmapped(core: Core) -> None:
    session = core.session()
    await gntdev.set_max_grants(session, gntdev_pb2.SetMaxGrantsRequest(count=2))
    reply = await map_all(session, core.grant(2))
    reply.close()
    await gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=reply.message.index, count=2))
    (await map_all(session, core.grant(2))).close()


# --------------------------------------------------------------------------- gntdev: MapMemory


async def test_map_memory_of_an_unknown_index_is_einval(core: Core) -> None:
    request = gntdev_pb2.MapMemoryRequest(index=0, count=1)
    await refused(gntdev.map_memory(core.session(), request), errno.EINVAL, "no mapping starts at index 0")


async def test_map_memory_count_must_be_the_mappings(core: Core) -> None:
    session = core.session()
    index = await reserve(session, core.grant(2))
    request = gntdev_pb2.MapMemoryRequest(index=index, count=1)
    await refused(gntdev.map_memory(session, request), errno.EINVAL, "has 2 grants, not 1")


async def test_map_memory_hands_out_the_pages_of_a_reserved_mapping(core: Core) -> None:
    granted = core.grant(2)
    write_peer(granted, b"reserved first")
    session = core.session()
    index = await reserve(session, granted)
    reply = await gntdev.map_memory(session, gntdev_pb2.MapMemoryRequest(index=index, count=2, writable=True))
    with closing(reply):
        check_fds_match_spans(reply, reply.message.spans)
        assert read_span(reply, 0, 14) == b"reserved first"
    assert usage(session) == {"mappings": 1, "mapped_grants": 2}


async def test_memory_hand_outs_per_mapping_are_bounded(core: Core) -> None:
    session = core.session(Limits(max_map_memory_per_mapping=2))
    index = await reserve(session, core.grant(1))
    request = gntdev_pb2.MapMemoryRequest(index=index, count=1)
    (await gntdev.map_memory(session, request)).close()
    (await gntdev.map_memory(session, request)).close()
    await refused(gntdev.map_memory(session, request), errno.EDQUOT, "memory hand-outs of this mapping")


async def test_map_counts_as_the_first_memory_hand_out(core: Core) -> None:
    session = core.session(Limits(max_map_memory_per_mapping=1))
    reply = await map_all(session, core.grant(1))
    reply.close()
    request = gntdev_pb2.MapMemoryRequest(index=reply.message.index, count=1)
    await refused(gntdev.map_memory(session, request), errno.EDQUOT)


async def test_fresh_instance_gives_one_descriptor_from_offset_0(core: Core) -> None:
    granted = core.grant(3)
    write_peer(granted, b"fresh")
    session = core.session()
    index = await reserve(session, granted)
    reply = await gntdev.map_memory(session, gntdev_pb2.MapMemoryRequest(index=index, count=3, fresh_instance=True))
    with closing(reply):
        (span,) = reply.message.spans
        assert (span.fd.index, span.offset, span.length) == (0, 0, 3 * PAGE_SIZE)
        check_fds_match_spans(reply, reply.message.spans)
        assert read_span(reply, 0, 5) == b"fresh"


async def test_fresh_instance_twice_for_one_mapping_is_ebusy(core: Core) -> None:
    session = core.session()
    index = await reserve(session, core.grant(1))
    request = gntdev_pb2.MapMemoryRequest(index=index, count=1, fresh_instance=True)
    (await gntdev.map_memory(session, request)).close()
    await refused(gntdev.map_memory(session, request), errno.EBUSY, "already has an instance of its own")


async def test_fresh_instance_of_grants_not_held_as_one_piece_is_einval(core: Core) -> None:
    # The emulated hypervisor holds a whole allocation, from its first page, as one piece.
    granted = core.grant(2)
    session = core.session()
    request = gntdev_pb2.MapGrantRefRequest(count=1, refs=[common_pb2.GrantRef(domid=PEER, ref=granted.refs[1])])
    index = (await gntdev.map_grant_ref(session, request)).message.index
    fresh = gntdev_pb2.MapMemoryRequest(index=index, count=1, fresh_instance=True)
    await refused(gntdev.map_memory(session, fresh), errno.EINVAL, "not as one descriptor from offset 0")
    assert gntdev.gntdev_state(session).mappings[index].fresh is None


async def test_unmap_closes_the_mappings_fresh_instance(core: Core) -> None:
    session = core.session()
    index = await reserve(session, core.grant(1))
    (await gntdev.map_memory(session, gntdev_pb2.MapMemoryRequest(index=index, count=1, fresh_instance=True))).close()
    fresh = gntdev.gntdev_state(session).mappings[index].fresh
    assert fresh is not None
    await gntdev.unmap_grant_ref(session, gntdev_pb2.UnmapGrantRefRequest(index=index, count=1))
    assert fresh.closed


# --------------------------------------------------------------------------- unmap notifications


@pytest.mark.parametrize("action", [0x4, 0x80, UNMAP_NOTIFY_CLEAR_BYTE | 0x8])
async def test_gntdev_notify_action_with_unknown_bits_is_einval(core: Core, action: int) -> None:
    request = gntdev_pb2.SetUnmapNotifyRequest(index=0, action=action)
    await refused(gntdev.set_unmap_notify(core.session(), request), errno.EINVAL, f"action {action:#x}")


async def test_gntdev_notify_send_event_on_another_sessions_port_is_einval(core: Core) -> None:
    other = core.session()
    port = await bind(other)
    session = core.session()
    index = await reserve(session, core.grant(1))
    request = gntdev_pb2.SetUnmapNotifyRequest(index=index, action=UNMAP_NOTIFY_SEND_EVENT, event_channel_port=port)
    await refused(gntdev.set_unmap_notify(session, request), errno.EINVAL, f"port {port} is not bound by this session")


async def test_gntdev_notify_send_event_on_the_sessions_own_port_is_accepted(core: Core) -> None:
    session = core.session()
    port = await bind(session)
    index = await reserve(session, core.grant(1))
    request = gntdev_pb2.SetUnmapNotifyRequest(index=index, action=UNMAP_NOTIFY_SEND_EVENT, event_channel_port=port)
    await gntdev.set_unmap_notify(session, request)


async def test_gntdev_notify_clear_byte_does_not_check_the_port(core: Core) -> None:
    session = core.session()
    index = await reserve(session, core.grant(1))
    request = gntdev_pb2.SetUnmapNotifyRequest(index=index, action=UNMAP_NOTIFY_CLEAR_BYTE, event_channel_port=12345)
    await gntdev.set_unmap_notify(session, request)


# --------------------------------------------------------------------------- grant copy


def foreign(ref: int = 8, offset: int = 0, domid: int = PEER) -> gntdev_pb2.GrantCopyPointer:
    return gntdev_pb2.GrantCopyPointer(foreign=gntdev_pb2.GrantCopyForeign(ref=ref, offset=offset, domid=domid))


def local(buffer_id: int = 0, offset: int = 0, data: bytes = b"") -> gntdev_pb2.GrantCopyPointer:
    return gntdev_pb2.GrantCopyPointer(virt=gntdev_pb2.GrantCopyLocal(buffer_id=buffer_id, offset=offset, data=data))


def segment(source: Any, dest: Any, length: int = 4, flags: int | None = None) -> gntdev_pb2.GrantCopySegment:
    if flags is None:
        flags = (GNTCOPY_source_gref if source.WhichOneof("pointer") == "foreign" else 0) | (
            GNTCOPY_dest_gref if dest.WhichOneof("pointer") == "foreign" else 0
        )
    return gntdev_pb2.GrantCopySegment(source=source, dest=dest, len=length, flags=flags)


def copy(*segments: gntdev_pb2.GrantCopySegment, count: int | None = None) -> gntdev_pb2.GrantCopyRequest:
    return gntdev_pb2.GrantCopyRequest(count=len(segments) if count is None else count, segments=segments)


async def test_grant_copy_count_must_match_its_segments(core: Core) -> None:
    request = copy(segment(foreign(), local()), count=3)
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "count is 3 but 1 segments")


async def test_grant_copy_of_more_than_max_copy_segments_is_e2big(core: Core) -> None:
    segments = [segment(foreign(), local())] * (gntdev.MAX_COPY_SEGMENTS + 1)
    await refused(gntdev.grant_copy(core.session(), copy(*segments)), errno.E2BIG, "split the copy")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: segment(foreign(), local(), flags=0), "the source is foreign but GNTCOPY_source_gref is clear"),
        (
            lambda: segment(local(data=b"abcd"), foreign(), flags=GNTCOPY_source_gref | GNTCOPY_dest_gref),
            "the source is virt but GNTCOPY_source_gref is set",
        ),
        (lambda: segment(local(data=b"abcd"), foreign(), flags=0), "the dest is foreign but GNTCOPY_dest_gref is clear"),
        (
            lambda: segment(foreign(), local(), flags=GNTCOPY_source_gref | GNTCOPY_dest_gref),
            "the dest is virt but GNTCOPY_dest_gref is set",
        ),
    ],
    ids=["source-foreign-flag-clear", "source-local-flag-set", "dest-foreign-flag-clear", "dest-local-flag-set"],
)
async def test_grant_copy_flags_must_match_the_pointer_kinds(core: Core, make: Any, fragment: str) -> None:
    await refused(gntdev.grant_copy(core.session(), copy(make())), errno.EINVAL, fragment)


async def test_grant_copy_flags_with_unknown_bits_are_einval(core: Core) -> None:
    request = copy(segment(foreign(), local(), flags=GNTCOPY_source_gref | 0x8))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "flags 0x9")


async def test_grant_copy_with_both_sides_local_is_einval(core: Core) -> None:
    request = copy(segment(local(data=b"abcd"), local()))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "both sides are local")


async def test_grant_copy_with_a_side_missing_is_einval(core: Core) -> None:
    request = copy(gntdev_pb2.GrantCopySegment(source=foreign(), len=4, flags=GNTCOPY_source_gref))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "both source and dest must be set")


async def test_grant_copy_len_beyond_16_bits_is_einval(core: Core) -> None:
    request = copy(segment(foreign(), local(), length=0x10000))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "len 65536 does not fit 16 bits")


async def test_grant_copy_foreign_offset_beyond_16_bits_is_einval(core: Core) -> None:
    request = copy(segment(foreign(offset=0x10000), local()))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "source offset 65536 does not fit 16 bits")


async def test_grant_copy_foreign_domid_beyond_domid_t_is_einval(core: Core) -> None:
    request = copy(segment(local(data=b"abcd"), foreign(domid=BEYOND_DOMID_T)))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "dest domid 65536 does not fit domid_t")


async def test_grant_copy_naming_an_unknown_copy_buffer_is_einval(core: Core) -> None:
    request = copy(segment(foreign(), local(buffer_id=42)))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "no copy buffer 42")


async def test_grant_copy_local_side_with_a_buffer_and_inline_data_is_einval(core: Core) -> None:
    request = copy(segment(local(buffer_id=1, data=b"abcd"), foreign()))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "carries inline data too")


@pytest.mark.parametrize("dest", [local(data=b"xxxx"), local(offset=4)], ids=["data", "offset"])
async def test_grant_copy_inline_dest_takes_neither_data_nor_offset(core: Core, dest: Any) -> None:
    request = copy(segment(foreign(), dest))
    await refused(gntdev.grant_copy(core.session(), request), errno.EINVAL, "an inline dest takes neither")


async def test_grant_copy_inline_dest_bytes_are_bounded(core: Core) -> None:
    length = PAGE_SIZE  # the most one segment copies (a foreign side stays within its page)
    segments = [segment(foreign(), local(), length=length)] * (gntdev.MAX_INLINE_COPY_BYTES // length + 1)
    await refused(gntdev.grant_copy(core.session(), copy(*segments)), errno.E2BIG, "register a copy buffer")


async def test_grant_copy_of_no_segments_copies_nothing(core: Core) -> None:
    reply = await gntdev.grant_copy(core.session(), copy())
    assert list(reply.message.segments) == []


async def test_grant_copy_reads_a_grant_into_an_inline_dest(core: Core) -> None:
    granted = core.grant(1)
    write_peer(granted, b"\x00\x00hello")
    request = copy(segment(foreign(granted.refs[0], offset=2), local(), length=5))
    reply = await gntdev.grant_copy(core.session(), request)
    (result,) = reply.message.segments
    assert (result.status, result.dest.virt.data) == (0, b"hello")


async def test_grant_copy_writes_an_inline_source_into_a_grant(core: Core) -> None:
    granted = core.grant(1)
    request = copy(segment(local(data=b"..written", offset=2), foreign(granted.refs[0], offset=8), length=7))
    reply = await gntdev.grant_copy(core.session(), request)
    assert [result.status for result in reply.message.segments] == [0]
    assert read_peer(granted, 15) == b"\x00" * 8 + b"written"


async def test_grant_copy_reports_a_status_per_segment(core: Core) -> None:
    granted = core.grant(1)
    request = copy(segment(foreign(granted.refs[0]), local()), segment(foreign(3000), local()))
    reply = await gntdev.grant_copy(core.session(), request)
    first, second = reply.message.segments
    assert first.status == 0 and second.status < 0
    assert not second.dest.virt.data


# --------------------------------------------------------------------------- copy buffers


async def register(session: Session, fd: OwnedFd, length: int = PAGE_SIZE) -> Reply[gntdev_pb2.RegisterCopyBufferResponse]:
    return await gntdev.register_copy_buffer(
        session, gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=send(session, fd), fd=FD0, length=length)
    )


async def test_register_copy_buffer_naming_no_transfer_is_ebadf(core: Core) -> None:
    request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=0, fd=FD0, length=PAGE_SIZE)
    await refused(gntdev.register_copy_buffer(core.session(), request), errno.EBADF, "fd_transfer is 0")


async def test_register_copy_buffer_fd_index_not_in_the_transfer_is_ebadf(core: Core) -> None:
    session = core.session()
    fd = memfd()
    request = gntdev_pb2.RegisterCopyBufferRequest(
        fd_transfer=send(session, fd), fd=common_pb2.FdRef(index=3), length=PAGE_SIZE
    )
    await refused(gntdev.register_copy_buffer(session, request), errno.EBADF, "fd index 3")
    assert fd.closed


@pytest.mark.parametrize("length", [0, gntdev.MAX_COPY_BUFFER_BYTES + 1])
async def test_register_copy_buffer_length_out_of_range_is_einval(core: Core, length: int) -> None:
    await refused(register(core.session(), memfd(), length), errno.EINVAL, f"length {length} is not between")


async def test_register_copy_buffer_longer_than_its_file_is_einval(core: Core) -> None:
    await refused(register(core.session(), memfd(), 2 * PAGE_SIZE), errno.EINVAL, "less than the")


async def test_register_copy_buffer_needs_a_memfd_sealed_against_shrinking(core: Core) -> None:
    await refused(register(core.session(), memfd(seal_shrink=False)), errno.EINVAL, "F_SEAL_SHRINK")


async def test_register_copy_buffer_of_a_pipe_is_einval(core: Core) -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    await refused(register(core.session(), OwnedFd(read_end)), errno.EINVAL, "must be a memfd")


async def test_a_refused_copy_buffer_still_consumes_its_transfer(core: Core) -> None:
    session = core.session()
    fd = memfd()
    await refused(register(session, fd, 0), errno.EINVAL)
    assert fd.closed
    assert len(session.incoming) == 0


async def test_register_copy_buffer_keeps_no_descriptor(core: Core) -> None:
    session = core.session()
    fd = memfd()
    reply = await register(session, fd)
    assert reply.message.buffer_id > 0
    assert fd.closed  # the mapping is what the broker keeps


async def test_copy_buffers_per_session_are_bounded(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gntdev, "MAX_COPY_BUFFERS_PER_SESSION", 2)
    session = core.session()
    await register(session, memfd())
    await register(session, memfd())
    await refused(register(session, memfd()), errno.EDQUOT, "registered 2 copy buffers")


async def test_unregister_of_an_unknown_copy_buffer_is_enoent(core: Core) -> None:
    request = gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=9)
    await refused(gntdev.unregister_copy_buffer(core.session(), request), errno.ENOENT, "no copy buffer 9")


async def test_an_unregistered_copy_buffer_can_no_longer_be_named(core: Core) -> None:
    session = core.session()
    buffer_id = (await register(session, memfd())).message.buffer_id
    await gntdev.unregister_copy_buffer(session, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=buffer_id))
    await refused(gntdev.grant_copy(session, copy(segment(foreign(), local(buffer_id=buffer_id)))), errno.EINVAL)


async def test_grant_copy_into_a_registered_copy_buffer(core: Core) -> None:
    granted = core.grant(1)
    write_peer(granted, b"to the buffer")
    session = core.session()
    buffer = memfd()
    client_copy = buffer.dup()  # the client keeps its own descriptor of the buffer
    try:
        buffer_id = (await register(session, buffer)).message.buffer_id
        request = copy(segment(foreign(granted.refs[0]), local(buffer_id=buffer_id, offset=100), length=13))
        reply = await gntdev.grant_copy(session, request)
        assert [result.status for result in reply.message.segments] == [0]
        assert os.pread(client_copy.fileno(), 13, 100) == b"to the buffer"
    finally:
        client_copy.close()


async def test_grant_copy_beyond_the_end_of_a_copy_buffer_is_einval(core: Core) -> None:
    granted = core.grant(1)
    session = core.session()
    buffer_id = (await register(session, memfd())).message.buffer_id
    request = copy(segment(foreign(granted.refs[0]), local(buffer_id=buffer_id, offset=PAGE_SIZE - 2), length=4))
    await refused(gntdev.grant_copy(session, request), errno.EINVAL, "outside its")


# --------------------------------------------------------------------------- dma-buf


async def test_dmabuf_export_count_must_match_its_refs(core: Core) -> None:
    request = gntdev_pb2.DmabufExportFromRefsRequest(count=2, domid=PEER, refs=[8])
    await refused(gntdev.dmabuf_export_from_refs(core.session(), request), errno.EINVAL, "count is 2 but 1 refs")


async def test_dmabuf_export_with_count_0_is_einval(core: Core) -> None:
    request = gntdev_pb2.DmabufExportFromRefsRequest(count=0, domid=PEER)
    await refused(gntdev.dmabuf_export_from_refs(core.session(), request), errno.EINVAL, "count is 0")


async def test_dmabuf_export_flags_with_unknown_bits_are_einval(core: Core) -> None:
    request = gntdev_pb2.DmabufExportFromRefsRequest(flags=4, count=1, domid=PEER, refs=[8])
    await refused(gntdev.dmabuf_export_from_refs(core.session(), request), errno.EINVAL, "flags 0x4")


async def test_dmabuf_export_domid_beyond_domid_t_is_einval(core: Core) -> None:
    request = gntdev_pb2.DmabufExportFromRefsRequest(count=1, domid=BEYOND_DOMID_T, refs=[8])
    await refused(gntdev.dmabuf_export_from_refs(core.session(), request), errno.EINVAL, "domid_t")


async def test_dmabuf_export_counts_against_the_grant_quota(core: Core) -> None:
    granted = core.grant(3)
    request = gntdev_pb2.DmabufExportFromRefsRequest(count=3, domid=PEER, refs=granted.refs)
    await refused(gntdev.dmabuf_export_from_refs(core.session(Limits(max_grants_per_session=2)), request), errno.EDQUOT)


async def test_dmabuf_export_hands_out_one_descriptor_and_counts_its_grants(core: Core) -> None:
    granted = core.grant(2)
    session = core.session()
    request = gntdev_pb2.DmabufExportFromRefsRequest(count=2, domid=PEER, refs=granted.refs)
    reply = await gntdev.dmabuf_export_from_refs(session, request)
    with closing(reply):
        assert reply.message.fd.index == 0 and len(reply.fds) == 1
        assert reply.message.dmabuf_id > 0
    assert usage(session) == {"dmabufs": 1, "mapped_grants": 2}


async def test_dmabuf_wait_released_once_the_client_let_go_returns_usage_to_zero(core: Core) -> None:
    granted = core.grant(1)
    session = core.session()
    reply = await gntdev.dmabuf_export_from_refs(
        session, gntdev_pb2.DmabufExportFromRefsRequest(count=1, domid=PEER, refs=granted.refs)
    )
    reply.close()  # the client's copy (the transport closes the broker's after delivery)
    await gntdev.dmabuf_export_wait_released(
        session, gntdev_pb2.DmabufExportWaitReleasedRequest(dmabuf_id=reply.message.dmabuf_id, wait_to_ms=2000)
    )
    assert usage(session) == {}


async def test_dmabuf_wait_released_while_in_use_times_out(core: Core) -> None:
    granted = core.grant(1)
    session = core.session()
    reply = await gntdev.dmabuf_export_from_refs(
        session, gntdev_pb2.DmabufExportFromRefsRequest(count=1, domid=PEER, refs=granted.refs)
    )
    with closing(reply):  # the client still holds the buffer
        request = gntdev_pb2.DmabufExportWaitReleasedRequest(dmabuf_id=reply.message.dmabuf_id, wait_to_ms=30)
        await refused(gntdev.dmabuf_export_wait_released(session, request), errno.ETIMEDOUT, "still in use after 30 ms")
    assert usage(session) == {"dmabufs": 1, "mapped_grants": 1}


async def test_dmabuf_wait_released_of_an_unknown_id_is_enoent(core: Core) -> None:
    request = gntdev_pb2.DmabufExportWaitReleasedRequest(dmabuf_id=5)
    await refused(gntdev.dmabuf_export_wait_released(core.session(), request), errno.ENOENT, "no dma-buf 5")


def import_request(session: Session, fd: OwnedFd | None, **fields: int) -> gntdev_pb2.DmabufImportToRefsRequest:
    transfer = send(session, fd) if fd is not None else 0
    return gntdev_pb2.DmabufImportToRefsRequest(fd_transfer=transfer, fd=FD0, **{"count": 1, "domid": PEER, **fields})


async def test_dmabuf_import_naming_no_transfer_is_ebadf(core: Core) -> None:
    session = core.session()
    await refused(gntdev.dmabuf_import_to_refs(session, import_request(session, None)), errno.EBADF, "fd_transfer is 0")


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [({"reserved": 1}, "reserved is 1"), ({"count": 0}, "count is 0"), ({"domid": BEYOND_DOMID_T}, "domid_t")],
    ids=["reserved", "count-0", "domid-beyond-domid_t"],
)
async def test_dmabuf_import_bad_fields_are_einval_and_close_the_descriptor(
    core: Core, fields: dict[str, int], fragment: str
) -> None:
    session = core.session()
    fd = memfd()
    await refused(gntdev.dmabuf_import_to_refs(session, import_request(session, fd, **fields)), errno.EINVAL, fragment)
    assert fd.closed and len(session.incoming) == 0


async def test_dmabuf_import_counts_against_the_grant_quota(core: Core) -> None:
    session = core.session(Limits(max_grants_per_session=1))
    fd = memfd(2 * PAGE_SIZE)
    await refused(gntdev.dmabuf_import_to_refs(session, import_request(session, fd, count=2)), errno.EDQUOT)
    assert fd.closed


async def own_pages(session: Session, count: int) -> OwnedFd:
    """A descriptor of *count* pages the session granted (one span): memory the
    emulated hypervisor made, so it imports it as a dma-buf."""
    reply = await gntalloc.alloc_gref(session, alloc_request(count=count))
    (fd,) = reply.fds
    return fd


async def test_dmabuf_import_and_release_move_usage(core: Core) -> None:
    session = core.session()
    pages = await own_pages(session, 2)
    before = usage(session)
    reply = await gntdev.dmabuf_import_to_refs(session, import_request(session, pages, count=2))
    assert len(reply.message.refs) == 2 and reply.fds == []
    assert usage(session) == {**before, "dmabufs": 1, "granted_pages": before["granted_pages"] + 2}
    await gntdev.dmabuf_import_release(session, gntdev_pb2.DmabufImportReleaseRequest(dmabuf_id=reply.message.dmabuf_id))
    assert usage(session) == before


async def test_dmabuf_import_release_reserved_is_einval(core: Core) -> None:
    request = gntdev_pb2.DmabufImportReleaseRequest(dmabuf_id=1, reserved=7)
    await refused(gntdev.dmabuf_import_release(core.session(), request), errno.EINVAL, "reserved is 7")


async def test_dmabuf_import_release_of_an_unknown_id_is_enoent(core: Core) -> None:
    request = gntdev_pb2.DmabufImportReleaseRequest(dmabuf_id=3)
    await refused(gntdev.dmabuf_import_release(core.session(), request), errno.ENOENT, "no dma-buf 3")


# --------------------------------------------------------------------------- gntalloc


def alloc_request(**fields: int) -> gntalloc_pb2.AllocGrefRequest:
    return gntalloc_pb2.AllocGrefRequest(**{"domid": PEER, "flags": 1, "count": 1, **fields})


async def test_alloc_with_count_0_is_einval(core: Core) -> None:
    await refused(gntalloc.alloc_gref(core.session(), alloc_request(count=0)), errno.EINVAL, "count is 0")


async def test_alloc_domid_beyond_domid_t_is_einval(core: Core) -> None:
    await refused(gntalloc.alloc_gref(core.session(), alloc_request(domid=BEYOND_DOMID_T)), errno.EINVAL, "domid_t")


async def test_alloc_flags_with_unknown_bits_are_einval(core: Core) -> None:
    await refused(gntalloc.alloc_gref(core.session(), alloc_request(flags=2)), errno.EINVAL, "flags 0x2")


async def test_alloc_beyond_the_grant_quota_is_edquot(core: Core) -> None:
    session = core.session(Limits(max_grants_per_session=2))
    await refused(gntalloc.alloc_gref(session, alloc_request(count=3)), errno.EDQUOT, "the limit is 2")


async def test_alloc_quota_counts_the_grants_the_session_maps(core: Core) -> None:
    session = core.session(Limits(max_grants_per_session=2))
    (await map_all(session, core.grant(2))).close()
    await refused(gntalloc.alloc_gref(session, alloc_request()), errno.EDQUOT)


async def test_alloc_hands_out_descriptors_matching_its_spans_and_counts_usage(core: Core) -> None:
    session = core.session()
    reply = await gntalloc.alloc_gref(session, alloc_request(count=3))
    with closing(reply):
        check_fds_match_spans(reply, reply.message.spans)
        assert sum(span.length for span in reply.message.spans) == 3 * PAGE_SIZE
        assert len(reply.message.gref_ids) == 3
    assert usage(session) == {"allocations": 1, "granted_pages": 3}


async def test_dealloc_returns_usage_to_zero(core: Core) -> None:
    session = core.session()
    reply = await gntalloc.alloc_gref(session, alloc_request(count=2))
    reply.close()
    await gntalloc.dealloc_gref(session, gntalloc_pb2.DeallocGrefRequest(index=reply.message.index, count=2))
    assert usage(session) == {}


async def test_dealloc_of_an_unknown_index_is_einval(core: Core) -> None:
    request = gntalloc_pb2.DeallocGrefRequest(index=0, count=1)
    await refused(gntalloc.dealloc_gref(core.session(), request), errno.EINVAL, "no allocation starts at index 0")


async def test_dealloc_count_must_be_the_allocations(core: Core) -> None:
    session = core.session()
    reply = await gntalloc.alloc_gref(session, alloc_request(count=2))
    reply.close()
    request = gntalloc_pb2.DeallocGrefRequest(index=reply.message.index, count=1)
    await refused(gntalloc.dealloc_gref(session, request), errno.EINVAL, "has 2 pages, not 1")
    assert usage(session) == {"allocations": 1, "granted_pages": 2}


@pytest.mark.parametrize("action", [0x4, UNMAP_NOTIFY_SEND_EVENT | 0x10])
async def test_gntalloc_notify_action_with_unknown_bits_is_einval(core: Core, action: int) -> None:
    request = gntalloc_pb2.GntallocUnmapNotifyRequest(index=0, action=action)
    await refused(gntalloc.set_unmap_notify(core.session(), request), errno.EINVAL, f"action {action:#x}")


async def test_gntalloc_notify_send_event_on_another_sessions_port_is_einval(core: Core) -> None:
    port = await bind(core.session())
    session = core.session()
    (await gntalloc.alloc_gref(session, alloc_request())).close()
    request = gntalloc_pb2.GntallocUnmapNotifyRequest(index=0, action=UNMAP_NOTIFY_SEND_EVENT, event_channel_port=port)
    await refused(gntalloc.set_unmap_notify(session, request), errno.EINVAL, f"port {port} is not bound by this session")


async def test_gntalloc_notify_send_event_on_the_sessions_own_port_is_accepted(core: Core) -> None:
    session = core.session()
    port = await bind(session)
    reply = await gntalloc.alloc_gref(session, alloc_request())
    reply.close()
    request = gntalloc_pb2.GntallocUnmapNotifyRequest(
        index=reply.message.index, action=UNMAP_NOTIFY_SEND_EVENT, event_channel_port=port
    )
    await gntalloc.set_unmap_notify(session, request)


# --------------------------------------------------------------------------- evtchn


async def test_bind_counts_the_port_in_usage(core: Core) -> None:
    session = core.session()
    port = await bind(session)
    assert usage(session) == {"event_channels": 1}
    assert evtchn.session_ports(session) == {port}


async def test_unbind_returns_usage_to_zero(core: Core) -> None:
    session = core.session()
    port = await bind(session)
    await evtchn.unbind(session, evtchn_pb2.UnbindRequest(port=port))
    assert usage(session) == {}
    assert evtchn.session_ports(session) == frozenset()


async def test_ports_per_session_are_bounded(core: Core) -> None:
    session = core.session(Limits(max_ports_per_session=1))
    await bind(session)
    await refused(bind(session), errno.EDQUOT, "event channel ports")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: evtchn.bind_unbound_port(s, evtchn_pb2.BindUnboundPortRequest(remote_domain=BEYOND_DOMID_T)),
        lambda s: evtchn.bind_interdomain(s, evtchn_pb2.BindInterdomainRequest(remote_domain=BEYOND_DOMID_T, remote_port=1)),
        lambda s: evtchn.restrict_domid(s, evtchn_pb2.RestrictDomidRequest(domid=BEYOND_DOMID_T)),
    ],
    ids=["bind-unbound-port", "bind-interdomain", "restrict-domid"],
)
async def test_evtchn_domid_beyond_domid_t_is_einval(core: Core, call: Any) -> None:
    session = core.session()
    await refused(call(session), errno.EINVAL, "does not fit domid_t")
    assert usage(session) == {}


PORT_OPERATIONS = [
    pytest.param(lambda s, p: evtchn.notify(s, evtchn_pb2.NotifyRequest(port=p)), id="notify"),
    pytest.param(lambda s, p: evtchn.unmask(s, evtchn_pb2.UnmaskRequest(port=p)), id="unmask"),
    pytest.param(lambda s, p: evtchn.unbind(s, evtchn_pb2.UnbindRequest(port=p)), id="unbind"),
    pytest.param(lambda s, p: anext(evtchn.subscribe(s, evtchn_pb2.SubscribeRequest(ports=[p]))), id="subscribe"),
]


@pytest.mark.parametrize("call", PORT_OPERATIONS)
async def test_evtchn_operation_on_a_port_bound_by_another_session_is_enotconn(core: Core, call: Any) -> None:
    port = await bind(core.session())
    session = core.session()
    await refused(call(session, port), errno.ENOTCONN, f"port {port} is not bound by this session")


@pytest.mark.parametrize("call", PORT_OPERATIONS)
async def test_evtchn_operation_on_a_port_the_session_unbound_is_enotconn(core: Core, call: Any) -> None:
    session = core.session()
    port = await bind(session)
    await evtchn.unbind(session, evtchn_pb2.UnbindRequest(port=port))
    await refused(call(session, port), errno.ENOTCONN)


async def test_notify_and_unmask_on_the_sessions_own_port_succeed(core: Core) -> None:
    session = core.session()
    port = await bind(session)
    await evtchn.notify(session, evtchn_pb2.NotifyRequest(port=port))
    await evtchn.unmask(session, evtchn_pb2.UnmaskRequest(port=port))


async def test_subscribe_first_yields_subscribed_and_counts_the_subscription(core: Core) -> None:
    session = core.session()
    await bind(session)
    stream = evtchn.subscribe(session, evtchn_pb2.SubscribeRequest())
    try:
        assert await anext(stream) == evtchn_pb2.Event(subscribed=True)
        assert usage(session)["subscriptions"] == 1
    finally:
        await stream.aclose()
    assert "subscriptions" not in usage(session)


async def test_subscription_receives_the_events_of_its_port(core: Core) -> None:
    listener, port, notifier, remote = await interdomain_pair(core)
    stream = evtchn.subscribe(listener, evtchn_pb2.SubscribeRequest(ports=[port]))
    try:
        assert (await anext(stream)).subscribed
        await evtchn.notify(notifier, evtchn_pb2.NotifyRequest(port=remote))
        assert await asyncio.wait_for(anext(stream), 5) == evtchn_pb2.Event(port=port)
    finally:
        await stream.aclose()


async def interdomain_pair(core: Core) -> tuple[Session, int, Session, int]:
    """Two sessions of SELF with the two ends of one channel: (listener, its port, notifier, its port)."""
    listener = core.session()
    port = (await evtchn.bind_unbound_port(listener, evtchn_pb2.BindUnboundPortRequest(remote_domain=SELF))).message.port
    notifier = core.session()
    request = evtchn_pb2.BindInterdomainRequest(remote_domain=SELF, remote_port=port)
    remote = (await evtchn.bind_interdomain(notifier, request)).message.port
    return listener, port, notifier, remote


async def test_a_subscription_ends_with_enotconn_when_its_port_is_unbound(core: Core) -> None:
    listener, port, _, _ = await interdomain_pair(core)
    stream = evtchn.subscribe(listener, evtchn_pb2.SubscribeRequest(ports=[port]))
    try:
        assert (await anext(stream)).subscribed
        await evtchn.unbind(listener, evtchn_pb2.UnbindRequest(port=port))
        await refused(asyncio.wait_for(anext(stream), 5), errno.ENOTCONN, f"port {port} was unbound")
    finally:
        await stream.aclose()
    assert usage(listener) == {}


async def test_events_of_an_unbound_port_are_dropped_before_any_subscription(core: Core) -> None:
    listener, port, notifier, remote = await interdomain_pair(core)
    await evtchn.notify(notifier, evtchn_pb2.NotifyRequest(port=remote))
    await asyncio.sleep(0.01)  # the listener's reader reads the event (nobody subscribed yet)
    await evtchn.unbind(listener, evtchn_pb2.UnbindRequest(port=port))
    again = (await evtchn.bind_unbound_port(listener, evtchn_pb2.BindUnboundPortRequest(remote_domain=SELF))).message.port
    stream = evtchn.subscribe(listener, evtchn_pb2.SubscribeRequest())
    try:
        assert (await anext(stream)).subscribed
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.1)
    finally:
        await stream.aclose()
    assert again == port  # the new channel reuses the number: the old event must not reach it


async def test_subscriptions_per_session_are_bounded(core: Core) -> None:
    session = core.session(Limits(max_subscriptions_per_session=1))
    await bind(session)
    first = evtchn.subscribe(session, evtchn_pb2.SubscribeRequest())
    second = evtchn.subscribe(session, evtchn_pb2.SubscribeRequest())
    try:
        await anext(first)
        await refused(anext(second), errno.EDQUOT, "subscriptions")
    finally:
        await first.aclose()
        await second.aclose()
    assert "subscriptions" not in usage(session)


async def test_subscribe_queue_size_above_the_maximum_is_einval(core: Core) -> None:
    request = evtchn_pb2.SubscribeRequest(queue_size=evtchn.MAX_QUEUE_SIZE + 1)
    await refused(anext(evtchn.subscribe(core.session(), request)), errno.EINVAL, "queue size")


async def test_subscribe_naming_more_ports_than_a_session_may_bind_is_e2big(core: Core) -> None:
    session = core.session(Limits(max_ports_per_session=2))
    request = evtchn_pb2.SubscribeRequest(ports=[1, 2, 3])
    await refused(anext(evtchn.subscribe(session, request)), errno.E2BIG, "3 ports named")


async def test_subscribe_while_the_broker_shuts_down_is_eagain(core: Core) -> None:
    stream = evtchn.subscribe(core.session(), evtchn_pb2.SubscribeRequest(), refuse_new=lambda: True)
    await refused(anext(stream), errno.EAGAIN, "shutting down")


# --------------------------------------------------------------------------- mem-buf


def acl(*entries: membuf_pb2.AclEntry, nr: int | None = None) -> dict[str, Any]:
    return {"acl_list": list(entries), "nr_acl_entries": len(entries) if nr is None else nr}


async def membuf_alloc(session: Session, **fields: Any) -> Reply[membuf_pb2.MemBufAllocResponse]:
    return await membuf.alloc(session, membuf_pb2.MemBufAllocRequest(**{"size": PAGE_SIZE, **acl(TRUSTED_RW), **fields}))


async def membuf_export(session: Session, fd: OwnedFd | None, **fields: Any) -> Reply[membuf_pb2.MemBufExportResponse]:
    transfer = send(session, fd) if fd is not None else 0
    request = membuf_pb2.MemBufExportRequest(**{"fd_transfer": transfer, "dma_buf_fd": FD0, **acl(TRUSTED_RW), **fields})
    return await membuf.export(session, request)


async def membuf_import(session: Session, **fields: Any) -> Reply[membuf_pb2.MemBufImportResponse]:
    return await membuf.import_(session, membuf_pb2.MemBufImportRequest(**{"memparcel_hdl": 1, **acl(TRUSTED_RW), **fields}))


MEMBUF_CALLS = {
    "alloc": lambda s, **f: membuf_alloc(s, **f),
    "export": lambda s, **f: membuf_export(s, memfd(), **f),
    "import": lambda s, **f: membuf_import(s, **f),
}


@pytest.mark.parametrize("call", MEMBUF_CALLS)
async def test_membuf_nr_acl_entries_must_match_the_acl_list(core: Core, call: str) -> None:
    await refused(MEMBUF_CALLS[call](core.session(), **acl(TRUSTED_RW, nr=2)), errno.EINVAL, "nr_acl_entries is 2 but 1")


@pytest.mark.parametrize("call", MEMBUF_CALLS)
@pytest.mark.parametrize("entries", [0, 17])
async def test_membuf_acl_needs_1_to_16_entries(core: Core, call: str, entries: int) -> None:
    await refused(MEMBUF_CALLS[call](core.session(), **acl(*[TRUSTED_RW] * entries)), errno.EINVAL, f"got {entries}")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("alloc", "reserved0"), ("alloc", "reserved1"), ("alloc", "reserved2"),
        ("export", "reserved0"), ("export", "reserved1"), ("export", "reserved2"),
        ("import", "reserved0"), ("import", "reserved1"), ("import", "reserved2"), ("import", "reserved3"),
    ],
)
async def test_membuf_reserved_fields_must_be_0(core: Core, call: str, field: str) -> None:
    await refused(MEMBUF_CALLS[call](core.session(), **{field: 5}), errno.EINVAL, f"{field} is 5")


@pytest.mark.parametrize("size", [0, membuf.MAX_ALLOC_BYTES + 1])
async def test_membuf_alloc_size_out_of_range_is_einval(core: Core, size: int) -> None:
    await refused(membuf_alloc(core.session(), size=size), errno.EINVAL, f"size {size} is not between")


async def test_membuf_errors_name_their_operation_once(core: Core) -> None:
    unknown_vmid = acl(membuf_pb2.AclEntry(vmid=7, perms=RW))
    error = await refused(membuf_alloc(core.session(), **unknown_vmid), errno.EINVAL, "vmid 7")
    assert error.operation == "mem-buf alloc"
    assert "mem-buf mem-buf" not in str(error)


async def test_membuf_alloc_hands_out_one_descriptor_and_counts_it(core: Core) -> None:
    session = core.session()
    reply = await membuf_alloc(session)
    with closing(reply):
        assert reply.message.mem_buf_fd.index == 0 and len(reply.fds) == 1
        assert os.fstat(reply.fds[0].fileno()).st_size == PAGE_SIZE
    assert usage(session) == {"membufs": 1}


async def test_membuf_export_naming_no_transfer_is_ebadf(core: Core) -> None:
    await refused(membuf_export(core.session(), None), errno.EBADF, "fd_transfer is 0")


async def test_membuf_export_then_import_by_the_trusted_vm(core: Core) -> None:
    owner = core.session()
    buffer = await membuf_alloc(owner)
    exported = await membuf_export(owner, buffer.fds[0])  # the client sends its buffer; the broker keeps none
    assert exported.message.memparcel_hdl and len(exported.fds) == 1
    assert usage(owner) == {"membufs": 2}
    trusted = core.session(vmid=MEM_BUF_VMID_TRUSTED_VM)
    imported = await membuf_import(trusted, memparcel_hdl=exported.message.memparcel_hdl)
    with closing(imported), closing(exported):
        assert imported.message.dma_buf_import_fd.index == 0 and len(imported.fds) == 1
    assert usage(trusted) == {"membufs": 1}


# --------------------------------------------------------------------------- broker


async def test_describe_session_tells_who_the_session_is(core: Core) -> None:
    session = core.session(name="describer")
    info = (await broker.describe_session(session, broker_pb2.DescribeSessionRequest())).message
    assert (info.session_id, info.domid, info.vmid) == (session.id, SELF, MEM_BUF_VMID_PRIMARY_VM)
    assert (info.pid, info.uid, info.gid, info.client_name) == (os.getpid(), os.getuid(), os.getgid(), "describer")
    assert info.capabilities.backend == "emulated"


async def test_describe_session_counts_what_the_session_holds(core: Core) -> None:
    session = core.session()
    (await map_all(session, core.grant(2))).close()
    (await gntalloc.alloc_gref(session, alloc_request(count=3))).close()
    await bind(session)
    (await membuf_alloc(session)).close()
    stream = evtchn.subscribe(session, evtchn_pb2.SubscribeRequest())
    try:
        await anext(stream)
        info = (await broker.describe_session(session, broker_pb2.DescribeSessionRequest())).message
    finally:
        await stream.aclose()
    assert info.usage == broker_pb2.Usage(
        mappings=1, mapped_grants=2, allocations=1, granted_pages=3, event_channels=1, membufs=1, subscriptions=1
    )


def broker_status(core: Core, view: Any = "own", *, admin_uids: frozenset[int] = frozenset({0})) -> broker.BrokerStatus:
    registry = core.new_registry(Policy(admin_uids=admin_uids))
    return broker.BrokerStatus(registry, core.peer.capabilities, view=view)


OTHER_UID = os.getuid() + 1


async def test_status_in_the_own_view_shows_a_session_only_the_sessions_of_its_uid(core: Core) -> None:
    status = broker_status(core, admin_uids=frozenset({OTHER_UID + 1}))
    mine = core.registered(status.registry, name="mine")
    core.registered(status.registry, uid=OTHER_UID, name="theirs")
    also_mine = core.registered(status.registry, name="also mine")
    response = (await status.status(mine, broker_pb2.StatusRequest())).message
    assert [s.session_id for s in response.sessions] == [mine.id, also_mine.id]


async def test_status_in_the_own_view_hides_the_brokers_descriptor_count_from_a_non_admin(core: Core) -> None:
    status = broker_status(core, admin_uids=frozenset({OTHER_UID}))
    session = core.registered(status.registry)
    assert (await status.status(session, broker_pb2.StatusRequest())).message.open_fds == 0


async def test_status_in_the_own_view_shows_a_call_without_a_session_no_session(core: Core) -> None:
    status = broker_status(core, admin_uids=frozenset({os.getuid()}))
    core.registered(status.registry)
    response = (await status.status(None, broker_pb2.StatusRequest())).message
    assert list(response.sessions) == [] and response.open_fds == 0
    assert response.version and response.capabilities.backend == "emulated"


async def test_status_in_the_own_view_shows_an_admin_every_session(core: Core) -> None:
    status = broker_status(core, admin_uids=frozenset({os.getuid()}))
    admin = core.registered(status.registry, name="admin")
    other = core.registered(status.registry, uid=OTHER_UID, name="other")
    response = (await status.status(admin, broker_pb2.StatusRequest())).message
    assert [(s.session_id, s.client_name) for s in response.sessions] == [(admin.id, "admin"), (other.id, "other")]
    assert response.open_fds > 0


async def test_status_in_the_all_view_shows_a_call_without_a_session_everything(core: Core) -> None:
    status = broker_status(core, "all", admin_uids=frozenset())
    session = core.registered(status.registry)
    (await map_all(session, core.grant(1))).close()
    response = (await status.status(None, broker_pb2.StatusRequest())).message
    (info,) = response.sessions
    assert (info.session_id, info.usage.mapped_grants) == (session.id, 1)
    assert response.open_fds > 0


def test_status_refuses_an_unknown_view(core: Core) -> None:
    with pytest.raises(ValueError, match="status view"):
        broker_status(core, "everyone")


# --------------------------------------------------------------------------- the session: descriptors from the client


async def test_a_call_waits_for_descriptors_that_arrive_after_it(core: Core) -> None:
    session = core.session()
    request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=77, fd=FD0, length=PAGE_SIZE)
    call = asyncio.ensure_future(gntdev.register_copy_buffer(session, request))
    await asyncio.sleep(0.01)
    assert not call.done()
    session.incoming.deliver(77, [memfd()])
    assert (await asyncio.wait_for(call, 5)).message.buffer_id > 0


async def test_a_call_whose_descriptors_never_come_fails_with_ebadf(core: Core) -> None:
    session = core.session(Limits(fd_frame_wait_seconds=0.02))
    request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=77, fd=FD0, length=PAGE_SIZE)
    await refused(gntdev.register_copy_buffer(session, request), errno.EBADF, "transfer id 77")


async def test_release_fails_a_call_waiting_for_its_descriptors_with_ecanceled(core: Core) -> None:
    session = core.session()
    request = gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=77, fd=FD0, length=PAGE_SIZE)
    call = asyncio.ensure_future(gntdev.register_copy_buffer(session, request))
    await asyncio.sleep(0.01)
    session.release()
    await refused(call, errno.ECANCELED)


# --------------------------------------------------------------------------- the session: release


async def test_release_closes_everything_the_session_holds(core: Core) -> None:
    granted = core.grant(2)
    dmabuf_pages = core.grant(1)
    before = open_fd_count()
    session = core.session()
    (await map_all(session, granted)).close()
    index = await reserve(session, granted)
    # (writable: the emulated grant keeps a read-only descriptor of its memory,
    # made for its first read-only span, for as long as the grant lives)
    fresh = gntdev_pb2.MapMemoryRequest(index=index, count=2, fresh_instance=True, writable=True)
    (await gntdev.map_memory(session, fresh)).close()
    await register(session, memfd())
    (await gntdev.dmabuf_export_from_refs(
        session, gntdev_pb2.DmabufExportFromRefsRequest(count=1, domid=PEER, refs=dmabuf_pages.refs)
    )).close()
    await gntdev.dmabuf_import_to_refs(session, import_request(session, await own_pages(session, 1)))
    (await gntalloc.alloc_gref(session, alloc_request(count=2))).close()
    port = await bind(session)
    stream = evtchn.subscribe(session, evtchn_pb2.SubscribeRequest(ports=[port]))
    await anext(stream)
    send(session, memfd(), memfd())  # a transfer no call took
    (await membuf_alloc(session)).close()
    assert open_fd_count() > before

    session.release()
    await stream.aclose()
    core.hang_up(session)
    assert open_fd_count() == before
    assert session.channel.closed


async def test_release_fires_the_unmap_notifications_of_its_mappings(core: Core) -> None:
    granted = core.grant(1)
    write_peer(granted, b"\xff")
    session = core.session()
    reply = await map_all(session, granted)
    reply.close()
    request = gntdev_pb2.SetUnmapNotifyRequest(index=reply.message.index, action=UNMAP_NOTIFY_CLEAR_BYTE)
    await gntdev.set_unmap_notify(session, request)
    session.release()
    assert read_peer(granted, 1) == b"\x00"


async def test_release_ends_the_sessions_subscriptions(core: Core) -> None:
    session = core.session()
    await bind(session)
    stream = evtchn.subscribe(session, evtchn_pb2.SubscribeRequest())
    await anext(stream)
    session.release()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 5)


async def test_release_is_idempotent(core: Core) -> None:
    session = core.session()
    await bind(session)
    session.release()
    session.release()
    assert session.closed.is_set()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: gntalloc.alloc_gref(s, alloc_request()),
        lambda s: gntdev.map_(s, gntdev_pb2.MapRequest(domids=[PEER], refs=[8])),
        lambda s: evtchn.bind_unbound_port(s, evtchn_pb2.BindUnboundPortRequest(remote_domain=PEER)),
        lambda s: membuf_alloc(s),
    ],
    ids=["gntalloc", "gntdev", "evtchn", "membuf"],
)
async def test_a_call_after_release_opens_no_device_and_is_ecanceled(core: Core, call: Any) -> None:
    session = core.session()
    session.release()
    await refused(call(session), errno.ECANCELED, "has ended")
