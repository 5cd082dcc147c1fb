"""gntdev: mapping other domains' grants (contract: GntdevInstance).

``domains.peer`` grants with gntalloc, ``domains.local`` maps with gntdev.
On real Xen both are dom0, so nothing here assumes the domids differ.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

from grant_broker.backend.contract import PAGE_SIZE, GrantRef, GrantRefs
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.memory import map_spans
from grant_broker.uapi.grant_table import GNTST_bad_domain, GNTST_bad_gntref, GNTST_general_error

from ._grant_helpers import close_spans, grant_refs, granted_pages, granter_view, grantee_view, map_and_close

BEYOND_ANY_GRANT_TABLE = 0xFFFF_FFF0
DOMID_SELF = 0x7FF0  # xen/include/public/xen.h


def test_first_map_of_fresh_instance_returns_index_0(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        assert index == 0
        gntdev.unmap_grant_ref(index, 1)


def test_second_map_gets_a_page_aligned_index_after_the_first(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid, 3) as (_, allocation), domains.local.open_gntdev() as gntdev:
        refs = grant_refs(domains.peer, allocation)
        first = gntdev.map_grant_refs(refs[:2])
        second = gntdev.map_grant_refs(refs[2:])
        assert second % PAGE_SIZE == 0
        assert second >= first + 2 * PAGE_SIZE or second + PAGE_SIZE <= first
        gntdev.unmap_grant_ref(first, 2)
        gntdev.unmap_grant_ref(second, 1)


def test_map_of_zero_grants_is_einval(domains) -> None:
    with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.map_grant_refs([])
    assert caught.value.errno == errno.EINVAL


def test_map_grant_refs_accepts_refs_not_granted_yet(domains) -> None:
    # Nothing is asked of the hypervisor until the memory is mapped.
    with domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs([GrantRef(domains.peer.domid, BEYOND_ANY_GRANT_TABLE)])
        gntdev.unmap_grant_ref(index, 1)


def test_unmap_with_wrong_count_is_enoent(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid, 2) as (_, allocation), domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        with pytest.raises(BrokerError) as caught:
            gntdev.unmap_grant_ref(index, 1)
        assert caught.value.errno == errno.ENOENT
        gntdev.unmap_grant_ref(index, 2)


def test_unmap_of_unknown_index_is_enoent(domains) -> None:
    with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.unmap_grant_ref(16 * PAGE_SIZE, 1)
    assert caught.value.errno == errno.ENOENT


def test_unmap_twice_is_enoent(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        gntdev.unmap_grant_ref(index, 1)
        with pytest.raises(BrokerError) as caught:
            gntdev.unmap_grant_ref(index, 1)
        assert caught.value.errno == errno.ENOENT


def test_map_memory_of_unknown_index_is_einval(domains) -> None:
    with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.map_memory(16 * PAGE_SIZE, 1, writable=False)
    assert caught.value.errno == errno.EINVAL


def test_map_memory_with_wrong_count_is_einval(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid, 2) as (_, allocation), domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=True)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 2)


def test_mapping_shows_granters_writes_and_vice_versa(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
        grantee_view(gntdev, grant_refs(domains.peer, allocation)) as (_, grantee),
    ):
        granter[PAGE_SIZE + 7 : PAGE_SIZE + 12] = b"peer!"
        assert bytes(grantee.view[PAGE_SIZE + 7 : PAGE_SIZE + 12]) == b"peer!"
        grantee.view[0:6] = b"local!"
        assert bytes(granter[0:6]) == b"local!"


def test_mapping_pages_keep_the_order_of_the_refs(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
        grantee_view(gntdev, list(reversed(grant_refs(domains.peer, allocation)))) as (_, grantee),
    ):
        granter[0:1] = b"A"
        granter[PAGE_SIZE : PAGE_SIZE + 1] = b"B"
        assert bytes(grantee.view[0:1]) == b"B"
        assert bytes(grantee.view[PAGE_SIZE : PAGE_SIZE + 1]) == b"A"


def test_read_only_grant_can_be_mapped_read_only(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, writable=False) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
        grantee_view(gntdev, grant_refs(domains.peer, allocation), writable=False) as (_, grantee),
    ):
        granter[0:4] = b"r/o!"
        assert bytes(grantee.view[0:4]) == b"r/o!"


def test_writable_mapping_of_read_only_grant_is_refused(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, writable=False) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=True)
        assert caught.value.errno == errno.EINVAL
        assert caught.value.gntst in (None, GNTST_general_error)
        gntdev.unmap_grant_ref(index, 1)


def test_read_only_mapping_cannot_be_written(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        spans = gntdev.map_memory(index, 1, writable=False)
        try:
            assert not any(span.writable for span in spans)
            with pytest.raises(OSError):
                map_spans(spans, writable=True)
            with map_spans(spans, writable=False) as memory:
                assert memory.view.readonly
        finally:
            close_spans(spans)
        gntdev.unmap_grant_ref(index, 1)


def test_mapping_made_read_only_refuses_a_later_writable_map(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        map_and_close(gntdev.map_memory(index, 1, writable=False), writable=False).close()
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=True)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 1)


def test_map_memory_of_ungranted_ref_names_ref_and_domain(domains) -> None:
    with domains.peer.open_gntalloc() as gntalloc, domains.local.open_gntdev() as gntdev:
        allocation = gntalloc.alloc_gref(domains.local.domid, 1)
        gntalloc.dealloc_gref(allocation.index, 1)  # nobody maps it: the grant ends now
        (ref,) = allocation.refs
        index = gntdev.map_grant_refs([GrantRef(domains.peer.domid, ref)])
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=True)
        assert caught.value.errno == errno.EINVAL
        assert f"ref {ref}" in caught.value.detail
        assert f"domain {domains.peer.domid}" in caught.value.detail
        assert caught.value.gntst in (None, GNTST_general_error)
        gntdev.unmap_grant_ref(index, 1)


def test_map_memory_of_ref_granted_to_another_domain_is_refused(domains) -> None:
    with (
        granted_pages(domains.peer, domains.unknown_domid) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        (ref,) = allocation.refs
        index = gntdev.map_grant_refs([GrantRef(domains.peer.domid, ref)])
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        assert f"ref {ref}" in caught.value.detail
        assert caught.value.gntst in (None, GNTST_general_error)
        gntdev.unmap_grant_ref(index, 1)


def test_unknown_domain_refused_at_map_memory(domains) -> None:
    with domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs([GrantRef(domains.unknown_domid, 8)])  # accepted here
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        assert f"domain {domains.unknown_domid}" in caught.value.detail
        assert caught.value.gntst in (None, GNTST_bad_domain)
        gntdev.unmap_grant_ref(index, 1)


def test_domid_self_refused_at_map_memory(domains) -> None:
    # Xen's map_grant_ref looks the granter up with rcu_lock_domain_by_id, to
    # which DOMID_SELF is no domain (a grant copy accepts it: test_grant_copy).
    with (
        granted_pages(domains.local, domains.local.domid) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        index = gntdev.map_grant_refs([GrantRef(DOMID_SELF, allocation.refs[0])])
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        assert caught.value.gntst in (None, GNTST_bad_domain)
        gntdev.unmap_grant_ref(index, 1)


def test_ref_beyond_the_grant_table_refused_at_map_memory(domains) -> None:
    with domains.local.open_gntdev() as gntdev:
        index = gntdev.map_grant_refs([GrantRef(domains.peer.domid, BEYOND_ANY_GRANT_TABLE)])
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        assert f"ref {BEYOND_ANY_GRANT_TABLE}" in caught.value.detail
        assert caught.value.gntst in (None, GNTST_bad_gntref)
        gntdev.unmap_grant_ref(index, 1)


def test_one_bad_ref_fails_the_whole_mapping(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        refs = grant_refs(domains.peer, allocation) + [GrantRef(domains.peer.domid, BEYOND_ANY_GRANT_TABLE)]
        index = gntdev.map_grant_refs(refs)
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 2, writable=True)
        assert caught.value.errno == errno.EINVAL
        gntdev.unmap_grant_ref(index, 2)


def test_a_refusal_amid_a_batch_names_that_ref_and_the_others_stay_mappable(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid, 3) as (_, allocation), domains.local.open_gntdev() as gntdev:
        good = grant_refs(domains.peer, allocation)
        refs = good[:2] + [GrantRef(domains.peer.domid, BEYOND_ANY_GRANT_TABLE)] + good[2:]
        index = gntdev.map_grant_refs(refs)
        with pytest.raises(BrokerError) as caught:
            gntdev.map_memory(index, 4, writable=False)
        assert caught.value.errno == errno.EINVAL
        assert f"ref {BEYOND_ANY_GRANT_TABLE}" in caught.value.detail
        gntdev.unmap_grant_ref(index, 4)
        with grantee_view(gntdev, good, writable=False):
            pass


def test_packed_grant_refs_map_as_grant_ref_objects_do(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 3) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
        grantee_view(gntdev, GrantRefs(domains.peer.domid, allocation.refs[::-1])) as (_, grantee),
    ):
        for page in range(3):
            granter[page * PAGE_SIZE] = ord("a") + page
        assert bytes(grantee.view[0 : 3 * PAGE_SIZE : PAGE_SIZE]) == b"cba"


def test_a_ref_given_twice_is_mapped_twice(domains) -> None:
    # As on Linux (each grant of the request is a map of its own): both pages are the granted page.
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        first, second = grant_refs(domains.peer, allocation)
        with grantee_view(gntdev, [first, second, first]) as (_, grantee):
            granter[0:5] = b"twice"
            assert bytes(grantee.view[0:5]) == bytes(grantee.view[2 * PAGE_SIZE : 2 * PAGE_SIZE + 5]) == b"twice"
            grantee.view[2 * PAGE_SIZE] = ord("T")
            assert bytes(granter[0:5]) == b"Twice"
        with grantee_view(gntdev, [first]) as (_, again):  # and nothing of it stays behind
            assert bytes(again.view[0:5]) == b"Twice"


def test_offset_for_vaddr_gives_index_and_count_of_the_mapping(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 3) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        refs = grant_refs(domains.peer, allocation)
        first = gntdev.map_grant_refs(refs[:1])
        with grantee_view(gntdev, refs[1:]) as (index, memory):
            assert index != first
            assert gntdev.get_offset_for_vaddr(memory.address) == (index, 2)
        gntdev.unmap_grant_ref(first, 1)


def test_offset_for_vaddr_of_other_memory_is_einval(domains) -> None:
    heap = ctypes.create_string_buffer(PAGE_SIZE)
    with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.get_offset_for_vaddr(ctypes.addressof(heap))
    assert caught.value.errno == errno.EINVAL


def test_offset_for_vaddr_after_unmap_is_einval(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        with grantee_view(gntdev, grant_refs(domains.peer, allocation)) as (_, memory):
            address = memory.address
        with pytest.raises(BrokerError) as caught:
            gntdev.get_offset_for_vaddr(address)
        assert caught.value.errno == errno.EINVAL


def test_set_max_grants_limits_later_mappings(domains) -> None:
    if not domains.local.capabilities.set_max_grants:
        pytest.skip("this backend's gntdev has no SET_MAX_GRANTS")
    with granted_pages(domains.peer, domains.local.domid, 3) as (_, allocation), domains.local.open_gntdev() as gntdev:
        gntdev.set_max_grants(2)
        refs = grant_refs(domains.peer, allocation)
        with pytest.raises(BrokerError) as too_many:
            gntdev.map_grant_refs(refs)
        assert too_many.value.errno == errno.EINVAL
        index = gntdev.map_grant_refs(refs[:2])
        with pytest.raises(BrokerError) as exhausted:
            gntdev.map_grant_refs(refs[2:])
        assert exhausted.value.errno == errno.ENOMEM
        gntdev.unmap_grant_ref(index, 2)


def test_set_max_grants_unsupported_is_enotty(domains) -> None:
    if domains.local.capabilities.set_max_grants:
        pytest.skip("this backend implements SET_MAX_GRANTS")
    with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.set_max_grants(16)
    assert caught.value.errno == errno.ENOTTY


def test_closed_instance_refuses_operations(domains) -> None:
    gntdev = domains.local.open_gntdev()
    gntdev.close()
    gntdev.close()  # idempotent
    with pytest.raises(BrokerError) as caught:
        gntdev.map_grant_refs([GrantRef(domains.peer.domid, 8)])
    assert caught.value.errno == errno.EBADF


def test_closing_the_instance_drops_its_mappings(domains) -> None:
    # After close, a fresh instance starts again at index 0 and the grant can
    # be mapped again: nothing of the closed instance lingers.
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation):
        refs = grant_refs(domains.peer, allocation)
        with domains.local.open_gntdev() as gntdev:
            index = gntdev.map_grant_refs(refs)
            map_and_close(gntdev.map_memory(index, 1, writable=True), writable=True).close()
        with domains.local.open_gntdev() as gntdev, grantee_view(gntdev, refs) as (index, _):
            assert index == 0
