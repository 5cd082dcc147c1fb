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


# --------------------------------------------------------------------------- adjacent segments
# A batch of segments contiguous on both sides (consecutive granted pages,
# consecutive bytes of one local buffer) is what a copy ring's doorbell
# usually carries; a backend may copy it at once (the emulated one does), with
# the results of copying the segments one by one, in order.

ADJACENT_PAGES = 4


def _pattern(length: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 256 for i in range(length))


def test_adjacent_segments_copy_granted_pages_into_one_buffer_and_back(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, ADJACENT_PAGES) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        size = ADJACENT_PAGES * PAGE_SIZE
        granter[:size] = _pattern(size, 1)
        buffer = bytearray(size)
        view = memoryview(buffer)
        peer = domains.peer.domid
        half = PAGE_SIZE // 2
        # Half pages: two segments per page, every one continuing the last.
        inward = [
            GrantCopySegment(CopyForeign(ref, part * half, peer), CopyLocal(view, page * PAGE_SIZE + part * half), half)
            for page, ref in enumerate(allocation.refs)
            for part in (0, 1)
        ]
        assert gntdev.grant_copy(inward) == [GNTST_okay] * len(inward)
        assert bytes(buffer) == bytes(granter[:size])
        buffer[:] = _pattern(size, 2)
        outward = [
            GrantCopySegment(CopyLocal(view, page * PAGE_SIZE), CopyForeign(ref, 0, peer), PAGE_SIZE)
            for page, ref in enumerate(allocation.refs)
        ]
        assert gntdev.grant_copy(outward) == [GNTST_okay] * ADJACENT_PAGES
        assert bytes(granter[:size]) == bytes(buffer)
        del view


def test_adjacent_segments_with_a_failure_between_copy_the_others(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid, 3) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        granter[: 3 * PAGE_SIZE] = _pattern(3 * PAGE_SIZE, 3)
        buffer = bytearray(3 * PAGE_SIZE)
        view = memoryview(buffer)
        peer = domains.peer.domid
        first, _, third = allocation.refs
        segments = [
            GrantCopySegment(CopyForeign(first, 0, peer), CopyLocal(view, 0), PAGE_SIZE),
            GrantCopySegment(CopyForeign(BEYOND_ANY_GRANT_TABLE, 0, peer), CopyLocal(view, PAGE_SIZE), PAGE_SIZE),
            GrantCopySegment(CopyForeign(third, 0, peer), CopyLocal(view, 2 * PAGE_SIZE), PAGE_SIZE),
        ]
        assert gntdev.grant_copy(segments) == [GNTST_okay, GNTST_bad_gntref, GNTST_okay]
        assert bytes(buffer[:PAGE_SIZE]) == bytes(granter[:PAGE_SIZE])
        assert bytes(buffer[PAGE_SIZE : 2 * PAGE_SIZE]) == bytes(PAGE_SIZE)
        assert bytes(buffer[2 * PAGE_SIZE :]) == bytes(granter[2 * PAGE_SIZE : 3 * PAGE_SIZE])
        del view


def test_segments_are_copied_in_order_across_runs(domains) -> None:
    # Out to the pages, then back from them: the reads see the writes before them.
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        buffer = bytearray(4 * PAGE_SIZE)
        buffer[: 2 * PAGE_SIZE] = _pattern(2 * PAGE_SIZE, 4)
        view = memoryview(buffer)
        peer = domains.peer.domid
        first, second = allocation.refs
        segments = [
            GrantCopySegment(CopyLocal(view, 0), CopyForeign(first, 0, peer), PAGE_SIZE),
            GrantCopySegment(CopyLocal(view, PAGE_SIZE), CopyForeign(second, 0, peer), PAGE_SIZE),
            GrantCopySegment(CopyForeign(first, 0, peer), CopyLocal(view, 2 * PAGE_SIZE), PAGE_SIZE),
            GrantCopySegment(CopyForeign(second, 0, peer), CopyLocal(view, 3 * PAGE_SIZE), PAGE_SIZE),
        ]
        assert gntdev.grant_copy(segments) == [GNTST_okay] * 4
        assert bytes(buffer[2 * PAGE_SIZE :]) == bytes(buffer[: 2 * PAGE_SIZE]) == bytes(granter[: 2 * PAGE_SIZE])
        del view


def test_segments_contiguous_on_one_side_only(domains) -> None:
    # Consecutive pages into scattered buffer offsets, and scattered pages from
    # consecutive buffer offsets: contiguity on one side alone joins nothing.
    with (
        granted_pages(domains.peer, domains.local.domid, ADJACENT_PAGES) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        size = ADJACENT_PAGES * PAGE_SIZE
        granter[:size] = _pattern(size, 5)
        buffer = bytearray(2 * size)
        view = memoryview(buffer)
        peer = domains.peer.domid
        refs = allocation.refs
        scattered = [
            GrantCopySegment(CopyForeign(ref, 0, peer), CopyLocal(view, 2 * page * PAGE_SIZE), PAGE_SIZE)
            for page, ref in enumerate(refs)
        ]
        assert gntdev.grant_copy(scattered) == [GNTST_okay] * ADJACENT_PAGES
        for page in range(ADJACENT_PAGES):
            assert bytes(buffer[2 * page * PAGE_SIZE : (2 * page + 1) * PAGE_SIZE]) == bytes(
                granter[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            )
            assert bytes(buffer[(2 * page + 1) * PAGE_SIZE : (2 * page + 2) * PAGE_SIZE]) == bytes(PAGE_SIZE)
        reversed_pages = [
            GrantCopySegment(CopyForeign(ref, 0, peer), CopyLocal(view, i * PAGE_SIZE), PAGE_SIZE)
            for i, ref in enumerate(reversed(refs))
        ]
        assert gntdev.grant_copy(reversed_pages) == [GNTST_okay] * ADJACENT_PAGES
        for i in range(ADJACENT_PAGES):
            page = ADJACENT_PAGES - 1 - i
            assert bytes(buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) == bytes(
                granter[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            )
        del view
