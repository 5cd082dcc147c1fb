"""Grant copy (contract: GntdevInstance.grant_copy): one GNTST status per segment.

Statuses follow Xen's ``gnttab_copy``: an unknown domain is GNTST_bad_domain,
a ref beyond the table GNTST_bad_gntref, a ref not granted to the copying
domain or a read-only grant used as destination GNTST_general_error.
"""

from __future__ import annotations

import errno

import pytest

from grant_broker.backend.contract import PAGE_SIZE, CopyForeign, CopyLocal, GrantCopySegment
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi.grant_table import GNTST_bad_domain, GNTST_bad_gntref, GNTST_general_error, GNTST_okay

from ._grant_helpers import granted_pages, granter_view

BEYOND_ANY_GRANT_TABLE = 0xFFFF_FFF0
DOMID_SELF = 0x7FF0  # xen/include/public/xen.h


def test_copy_from_granted_page_to_local_buffer(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[100:111] = b"hello world"
        buffer = bytearray(32)
        source = CopyForeign(ref=allocation.refs[0], offset=100, domid=domains.peer.domid)
        statuses = gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(buffer), 4), 11)])
        assert statuses == [GNTST_okay]
        assert bytes(buffer[4:15]) == b"hello world"


def test_copy_from_local_buffer_to_granted_page(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        dest = CopyForeign(ref=allocation.refs[0], offset=PAGE_SIZE - 5, domid=domains.peer.domid)
        statuses = gntdev.grant_copy([GrantCopySegment(CopyLocal(memoryview(b"xxtail")), dest, 5)])
        assert statuses == [GNTST_okay]
        assert bytes(granter[PAGE_SIZE - 5 :]) == b"xxtai"


def test_copy_between_two_granted_pages(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[0:4] = b"page"
        first, second = allocation.refs
        segment = GrantCopySegment(
            CopyForeign(first, 0, domains.peer.domid), CopyForeign(second, 8, domains.peer.domid), 4
        )
        assert gntdev.grant_copy([segment]) == [GNTST_okay]
        assert bytes(granter[PAGE_SIZE + 8 : PAGE_SIZE + 12]) == b"page"


def test_copy_statuses_are_per_segment(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[0:2] = b"ok"
        good, bad_ref, bad_domain, also_good = bytearray(2), bytearray(2), bytearray(2), bytearray(2)
        ref = allocation.refs[0]
        segments = [
            GrantCopySegment(CopyForeign(ref, 0, domains.peer.domid), CopyLocal(memoryview(good)), 2),
            GrantCopySegment(
                CopyForeign(BEYOND_ANY_GRANT_TABLE, 0, domains.peer.domid), CopyLocal(memoryview(bad_ref)), 2
            ),
            GrantCopySegment(CopyForeign(ref, 0, domains.unknown_domid), CopyLocal(memoryview(bad_domain)), 2),
            GrantCopySegment(CopyForeign(ref, 0, domains.peer.domid), CopyLocal(memoryview(also_good)), 2),
        ]
        assert gntdev.grant_copy(segments) == [GNTST_okay, GNTST_bad_gntref, GNTST_bad_domain, GNTST_okay]
        assert (bytes(good), bytes(bad_ref), bytes(bad_domain), bytes(also_good)) == (b"ok", b"\0\0", b"\0\0", b"ok")


def test_copy_from_ref_beyond_the_table_is_bad_gntref(domains) -> None:
    with domains.local.open_gntdev() as gntdev:
        source = CopyForeign(BEYOND_ANY_GRANT_TABLE, 0, domains.peer.domid)
        assert gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(bytearray(8))), 8)]) == [
            GNTST_bad_gntref
        ]


def test_copy_from_unknown_domain_is_bad_domain(domains) -> None:
    with domains.local.open_gntdev() as gntdev:
        source = CopyForeign(8, 0, domains.unknown_domid)
        assert gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(bytearray(8))), 8)]) == [
            GNTST_bad_domain
        ]


def test_copy_from_ref_granted_to_another_domain_is_general_error(domains) -> None:
    with (
        granted_pages(domains.peer, domains.unknown_domid) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
    ):
        source = CopyForeign(allocation.refs[0], 0, domains.peer.domid)
        assert gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(bytearray(8))), 8)]) == [
            GNTST_general_error
        ]


def test_copy_to_read_only_grant_is_general_error(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, writable=False) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        dest = CopyForeign(allocation.refs[0], 0, domains.peer.domid)
        assert gntdev.grant_copy([GrantCopySegment(CopyLocal(memoryview(b"nope")), dest, 4)]) == [
            GNTST_general_error
        ]
        assert bytes(granter[0:4]) == bytes(4)


def test_copy_from_read_only_grant_works(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, writable=False) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[0:2] = b"ro"
        buffer = bytearray(2)
        source = CopyForeign(allocation.refs[0], 0, domains.peer.domid)
        assert gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(buffer)), 2)]) == [GNTST_okay]
        assert bytes(buffer) == b"ro"


def test_copy_with_both_sides_local_is_einval(domains) -> None:
    with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.grant_copy([GrantCopySegment(CopyLocal(memoryview(b"ab")), CopyLocal(memoryview(bytearray(2))), 2)])
    assert caught.value.errno == errno.EINVAL


def test_copy_crossing_the_foreign_page_is_einval(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        source = CopyForeign(allocation.refs[0], PAGE_SIZE - 4, domains.peer.domid)
        with pytest.raises(BrokerError) as caught:
            gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(bytearray(8))), 8)])
        assert caught.value.errno == errno.EINVAL


def test_copy_outside_the_local_buffer_is_einval(domains) -> None:
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        source = CopyForeign(allocation.refs[0], 0, domains.peer.domid)
        with pytest.raises(BrokerError) as caught:
            gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(bytearray(8)), 4), 8)])
        assert caught.value.errno == errno.EINVAL


def test_malformed_segment_means_nothing_is_copied(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[0:4] = b"data"
        buffer = bytearray(4)
        ref = allocation.refs[0]
        good = GrantCopySegment(CopyForeign(ref, 0, domains.peer.domid), CopyLocal(memoryview(buffer)), 4)
        crossing = GrantCopySegment(
            CopyForeign(ref, PAGE_SIZE - 1, domains.peer.domid), CopyLocal(memoryview(bytearray(4))), 4
        )
        with pytest.raises(BrokerError) as caught:
            gntdev.grant_copy([good, crossing])
        assert caught.value.errno == errno.EINVAL
        assert bytes(buffer) == bytes(4)


def test_copy_of_no_segments_returns_no_statuses(domains) -> None:
    with domains.local.open_gntdev() as gntdev:
        assert gntdev.grant_copy([]) == []


def test_copy_from_domid_self_reads_the_copying_domains_own_grant(domains) -> None:
    # gnttab_copy looks domains up with rcu_lock_domain_by_any_id, so DOMID_SELF
    # names the copying domain (seen on Xen 4.17; a map refuses it, see test_gntdev).
    with (
        granted_pages(domains.local, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[0:4] = b"self"
        buffer = bytearray(4)
        source = CopyForeign(allocation.refs[0], 0, DOMID_SELF)
        assert gntdev.grant_copy([GrantCopySegment(source, CopyLocal(memoryview(buffer)), 4)]) == [GNTST_okay]
        assert bytes(buffer) == b"self"
