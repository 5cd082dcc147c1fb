"""GrantRefs: the map path's packed grants (backend contract), and the SDK's packing of a map's refs."""

from __future__ import annotations

import errno
from array import array

import pytest

from grant_broker.backend.contract import GrantRef, GrantRefs, packed_grants
from grant_broker_client.gntdev import _grant_refs, _packed
from grant_broker_protocol.errors import BrokerError


def test_one_domain_for_all_is_kept_once() -> None:
    grants = GrantRefs(3, [8, 9, 10])
    assert (grants.domid, grants.refs.tolist(), len(grants)) == (3, [8, 9, 10], 3)
    assert grants.domids.tolist() == [3, 3, 3] and grants.domains == (3,)
    # The same grants given a domid each are the same value.
    assert GrantRefs([3, 3, 3], [8, 9, 10]) == grants and GrantRefs([3, 3, 3], [8, 9, 10]).domid == 3
    assert GrantRefs([3], array("I", [8, 9, 10])) == grants


def test_several_domains_keep_one_domid_per_ref() -> None:
    grants = GrantRefs([3, 4, 3], [8, 9, 10])
    assert grants.domid is None and grants.domids.tolist() == [3, 4, 3] and grants.domains == frozenset({3, 4})
    assert list(grants.pairs()) == [(3, 8), (4, 9), (3, 10)]
    with pytest.raises(ValueError):
        GrantRefs([3, 4], [8, 9, 10])


def test_it_reads_as_a_sequence_of_grant_refs() -> None:
    grants = GrantRefs([3, 4, 3], [8, 9, 10])
    assert list(grants) == [GrantRef(3, 8), GrantRef(4, 9), GrantRef(3, 10)]
    assert grants[1] == GrantRef(4, 9) and grants[-1] == GrantRef(3, 10)
    assert grants[1:] == (GrantRef(4, 9), GrantRef(3, 10))
    assert grants[2:].domid == 3  # one domain left
    assert grants == [GrantRef(3, 8), GrantRef(4, 9), GrantRef(3, 10)]
    assert grants != (GrantRef(3, 8),) and grants != GrantRefs(3, [8, 9, 10])
    assert GrantRefs.of(grants) is grants
    assert GrantRefs.of([GrantRef(5, 1), GrantRef(5, 2)]) == GrantRefs(5, [1, 2])
    with pytest.raises(IndexError):
        grants[3]
    assert not GrantRefs([], []) and GrantRefs([], []).domains == frozenset()


@pytest.mark.parametrize("grant", [GrantRef(1 << 32, 8), GrantRef(1, 1 << 32), GrantRef(1, -1), GrantRef(-1, 8)])
def test_a_value_beyond_u32_is_refused(grant: GrantRef) -> None:
    with pytest.raises(OverflowError):
        GrantRefs.of([GrantRef(1, 8), grant])
    with pytest.raises(BrokerError) as caught:
        packed_grants([GrantRef(1, 8), grant], "gntdev map grant refs")
    assert caught.value.errno == errno.EINVAL
    assert f"ref {grant.ref} of domain {grant.domid} is out of range" in caught.value.detail


# --------------------------------------------------------------------------- the SDK's side


def test_sdk_packs_pairs_grant_refs_and_mixed_forms_alike() -> None:
    pairs = [(3, 8), (3, 9)]
    assert _packed(pairs) == ((3,), (8, 9))
    assert _packed([GrantRef(3, 8), GrantRef(3, 9)]) == ([3], [8, 9])
    assert _packed([(3, 8), GrantRef(4, 9)]) == ([3, 4], [8, 9])
    assert _packed(iter(pairs)) == ((3,), (8, 9))  # any iterable
    assert _packed([[3, 8], [4, 9]]) == ((3, 4), (8, 9))
    assert _packed([8, 9], 3) == ([3], [8, 9])  # the refs of one domain
    assert _packed([]) == ([], [])
    assert _grant_refs((3,), (8, 9)) == (GrantRef(3, 8), GrantRef(3, 9))
    assert _grant_refs((3, 4), (8, 9)) == (GrantRef(3, 8), GrantRef(4, 9))


@pytest.mark.parametrize("refs", [[(3, 8, 1), (3, 9, 1)], [(3, 8), (3, 9, 1)], [(3,), (3,)], [3, 8]])
def test_sdk_refuses_what_is_no_grant_as_grant_ref_would(refs: list[object]) -> None:
    with pytest.raises(TypeError):
        _packed(refs)  # type: ignore[arg-type]
