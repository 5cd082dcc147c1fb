"""gntalloc: sharing this domain's own pages (contract: GntallocInstance).

``domains.peer`` allocates and grants; ``domains.local`` maps with gntdev.
"""

from __future__ import annotations

import errno

import pytest

from grant_broker.backend.contract import PAGE_SIZE, GrantRef
from grant_broker_protocol.errors import BrokerError

from ._grant_helpers import grant_refs, granted_pages, granter_view, grantee_view, map_and_close


def test_first_allocation_of_fresh_instance_has_index_0(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation):
        assert allocation.index == 0


def test_allocation_grants_each_page_its_own_ref(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid, 3) as (_, allocation):
        assert allocation.count == 3
        assert len(set(allocation.refs)) == 3
        assert allocation.domid == domains.local.domid
        assert allocation.writable


def test_next_allocation_follows_the_previous_one(domains) -> None:
    with domains.peer.open_gntalloc() as gntalloc:
        first = gntalloc.alloc_gref(domains.local.domid, 2)
        second = gntalloc.alloc_gref(domains.local.domid, 1)
        assert second.index == first.index + 2 * PAGE_SIZE
        assert not set(first.refs) & set(second.refs)


def test_allocated_pages_start_zeroed(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as view,
    ):
        assert bytes(view) == bytes(2 * PAGE_SIZE)


def test_alloc_of_zero_pages_is_einval(domains) -> None:
    with domains.peer.open_gntalloc() as gntalloc, pytest.raises(BrokerError) as caught:
        gntalloc.alloc_gref(domains.local.domid, 0)
    assert caught.value.errno == errno.EINVAL


def test_granting_to_an_unknown_domain_is_allowed(domains) -> None:
    # Linux's gntalloc never checks the grantee.
    with granted_pages(domains.peer, domains.unknown_domid) as (_, allocation):
        assert allocation.domid == domains.unknown_domid
        assert allocation.count == 1


def test_memory_spans_are_writable(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation):
        spans = gntalloc.memory_spans(allocation.index, allocation.count)
        assert all(span.writable for span in spans)
        assert sum(span.length for span in spans) == 2 * PAGE_SIZE
        with map_and_close(spans, writable=True) as memory:
            memory.view[-1] = 0x5A


def test_memory_spans_may_cover_consecutive_allocations(domains) -> None:
    with domains.peer.open_gntalloc() as gntalloc:
        first = gntalloc.alloc_gref(domains.local.domid, 1)
        gntalloc.alloc_gref(domains.local.domid, 1)
        with map_and_close(gntalloc.memory_spans(first.index, 2), writable=True) as memory:
            memory.view[PAGE_SIZE] = 1
            assert len(memory.view) == 2 * PAGE_SIZE


def test_memory_spans_of_unknown_index_is_enoent(domains) -> None:
    with domains.peer.open_gntalloc() as gntalloc, pytest.raises(BrokerError) as caught:
        gntalloc.memory_spans(64 * PAGE_SIZE, 1)
    assert caught.value.errno == errno.ENOENT


def test_memory_spans_beyond_the_allocation_is_enoent(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation):
        with pytest.raises(BrokerError) as caught:
            gntalloc.memory_spans(allocation.index, 2)
        assert caught.value.errno == errno.ENOENT


def test_dealloc_of_unknown_index_is_einval(domains) -> None:
    with domains.peer.open_gntalloc() as gntalloc, pytest.raises(BrokerError) as caught:
        gntalloc.dealloc_gref(64 * PAGE_SIZE, 1)
    assert caught.value.errno == errno.EINVAL


def test_dealloc_of_more_pages_than_allocated_is_einval(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation):
        with pytest.raises(BrokerError) as caught:
            gntalloc.dealloc_gref(allocation.index, 2)
        assert caught.value.errno == errno.EINVAL


def test_deallocated_pages_are_gone_from_the_instance(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation):
        gntalloc.dealloc_gref(allocation.index, 1)
        with pytest.raises(BrokerError) as caught:
            gntalloc.memory_spans(allocation.index, 1)
        assert caught.value.errno == errno.ENOENT


def test_deallocated_unmapped_grant_cannot_be_mapped(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation), domains.local.open_gntdev() as gntdev:
        refs = grant_refs(domains.peer, allocation)
        gntalloc.dealloc_gref(allocation.index, 1)
        index = gntdev.map_grant_refs(refs)
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=True)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 1)


def test_dealloc_is_deferred_while_mapped(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation), domains.local.open_gntdev() as gntdev:
        with granter_view(gntalloc, allocation) as granter:
            granter[0:5] = b"alive"
        with grantee_view(gntdev, grant_refs(domains.peer, allocation)) as (_, grantee):
            gntalloc.dealloc_gref(allocation.index, 1)
            # The page the local domain maps survives the dealloc.
            assert bytes(grantee.view[0:5]) == b"alive"
            grantee.view[0:5] = b"still"
            assert bytes(grantee.view[0:5]) == b"still"


def test_closing_the_instance_ends_unmapped_grants(domains) -> None:
    with domains.local.open_gntdev() as gntdev:
        with granted_pages(domains.peer, domains.local.domid) as (_, allocation):
            refs = grant_refs(domains.peer, allocation)
        index = gntdev.map_grant_refs(refs)
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 1)


def test_read_only_allocation_is_reported_read_only(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid, writable=False) as (_, allocation):
        assert not allocation.writable


def test_closed_instance_refuses_operations(domains) -> None:
    gntalloc = domains.peer.open_gntalloc()
    gntalloc.close()
    gntalloc.close()  # idempotent
    with pytest.raises(BrokerError) as caught:
        gntalloc.alloc_gref(domains.local.domid, 1)
    assert caught.value.errno == errno.EBADF


def test_unknown_ref_of_granting_domain_is_not_mappable(domains) -> None:
    # A ref is meaningful only in the granter's table: the same number from
    # another domain is not the grant.
    with (
        granted_pages(domains.peer, domains.local.domid) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        if domains.local.domid == domains.peer.domid:
            pytest.skip("local and peer are the same domain on this backend")
        (ref,) = allocation.refs
        index = gntdev.map_grant_refs([GrantRef(domains.local.domid, ref)])
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 1)
