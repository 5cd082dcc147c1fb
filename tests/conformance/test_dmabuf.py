"""gntdev dma-buf export and import (capabilities ``dmabuf_export`` / ``dmabuf_import``).

Each direction is tested where the backend says it works, and skipped with
the backend's own reason where it does not: a kernel without
CONFIG_XEN_GNTDEV_DMABUF (Debian's stock one) answers ENOTTY to both; a PV
domain (every PV dom0) has the ioctls but refuses export with EINVAL.  The
buffers imported are made by someone else (``_dmabuf_source``: the emulated
backend's own export, vgem on a real Xen).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

import pytest

from grant_broker.backend.contract import PAGE_SIZE, GrantRef
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi.gntdev import GNTDEV_DMA_FLAG_COHERENT, GNTDEV_DMA_FLAG_WC

from ._dmabuf_source import foreign_dmabuf
from ._grant_helpers import granted_pages, granter_view, grantee_view


@pytest.fixture
def dmabuf_domains(domains):
    """The domains, where the local one can export grants as a dma-buf."""
    caps = domains.local.capabilities
    if not caps.dmabuf_export:
        pytest.skip(f"dma-buf export unavailable on this backend: {caps.dmabuf_export_missing}")
    return domains


@pytest.fixture
def import_domains(domains):
    """The domains, where the local one can grant a dma-buf's pages."""
    caps = domains.local.capabilities
    if not caps.dmabuf_import:
        pytest.skip(f"dma-buf import unavailable on this backend: {caps.dmabuf_import_missing}")
    return domains


def test_dmabuf_unsupported_is_enotty(domains) -> None:
    if domains.local.capabilities.dmabuf:
        pytest.skip("this backend has the dma-buf ioctls")
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs)
        assert caught.value.errno == errno.ENOTTY


def test_dmabuf_import_unsupported_is_enotty(domains) -> None:
    if domains.local.capabilities.dmabuf:
        pytest.skip("this backend has the dma-buf ioctls")
    read_end, write_end = os.pipe()
    try:
        with domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_import_to_refs(read_end, domains.peer.domid, 1)
        assert caught.value.errno == errno.ENOTTY
    finally:
        os.close(read_end)
        os.close(write_end)


def test_export_where_the_domain_refuses_it_is_einval(domains) -> None:
    """A PV domain has the ioctls but cannot export: EINVAL, whatever the grant."""
    caps = domains.local.capabilities
    if not caps.dmabuf or caps.dmabuf_export:
        pytest.skip("only where the ioctls exist and export is refused (a PV domain)")
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs)
        assert caught.value.errno == errno.EINVAL


# --------------------------------------------------------------------------- export


def test_export_gives_a_buffer_of_the_granted_pages(dmabuf_domains) -> None:
    domains = dmabuf_domains
    with (
        granted_pages(domains.peer, domains.local.domid, 2) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
        gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs) as buffer,
        mmap.mmap(buffer.fileno(), 2 * PAGE_SIZE) as memory,
    ):
        granter[PAGE_SIZE : PAGE_SIZE + 3] = b"abc"
        assert memory[PAGE_SIZE : PAGE_SIZE + 3] == b"abc"
        memory[0:3] = b"xyz"
        assert bytes(granter[0:3]) == b"xyz"


def test_export_of_no_refs_is_einval(dmabuf_domains) -> None:
    with dmabuf_domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.dmabuf_export_from_refs(dmabuf_domains.peer.domid, [])
    assert caught.value.errno == errno.EINVAL


def test_export_with_unknown_flags_is_einval(dmabuf_domains) -> None:
    domains = dmabuf_domains
    unknown = ~(GNTDEV_DMA_FLAG_WC | GNTDEV_DMA_FLAG_COHERENT) & 0xFFFF_FFFF
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs, unknown)
        assert caught.value.errno == errno.EINVAL


def test_export_of_ungranted_ref_is_einval(dmabuf_domains) -> None:
    domains = dmabuf_domains
    with granted_pages(domains.peer, domains.unknown_domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs)
        assert caught.value.errno == errno.EINVAL


def test_wait_released_times_out_while_the_buffer_is_open(dmabuf_domains) -> None:
    domains = dmabuf_domains
    with (
        granted_pages(domains.peer, domains.local.domid) as (_, allocation),
        domains.local.open_gntdev() as gntdev,
        gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs) as buffer,
    ):
        for timeout_ms in (0, 20):
            with pytest.raises(BrokerError) as caught:
                gntdev.dmabuf_export_wait_released(buffer.fileno(), timeout_ms)
            assert caught.value.errno == errno.ETIMEDOUT


def test_wait_released_of_a_buffer_never_exported_is_enoent(dmabuf_domains) -> None:
    with dmabuf_domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
        gntdev.dmabuf_export_wait_released(gntdev.fileno(), 0)
    assert caught.value.errno == errno.ENOENT


def test_wait_released_of_another_instances_buffer_is_enoent(dmabuf_domains) -> None:
    domains = dmabuf_domains
    with (
        granted_pages(domains.peer, domains.local.domid) as (_, allocation),
        domains.local.open_gntdev() as exporter,
        domains.local.open_gntdev() as other,
        exporter.dmabuf_export_from_refs(domains.peer.domid, allocation.refs) as buffer,
    ):
        with pytest.raises(BrokerError) as caught:
            other.dmabuf_export_wait_released(buffer.fileno(), 0)
        assert caught.value.errno == errno.ENOENT


def test_wait_released_returns_when_the_buffer_is_closed(dmabuf_domains) -> None:
    domains = dmabuf_domains
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        buffer = gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs)
        number = buffer.fileno()
        closer = threading.Timer(0.05, buffer.close)
        closer.start()
        try:
            gntdev.dmabuf_export_wait_released(number, 5000)
        finally:
            closer.join()


def test_wait_released_after_release_is_enoent(dmabuf_domains) -> None:
    # Linux forgets a buffer once it is released; ENOENT then means "released".
    domains = dmabuf_domains
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        buffer = gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs)
        number = buffer.fileno()
        buffer.close()
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_export_wait_released(number, 0)
        assert caught.value.errno == errno.ENOENT


def test_an_mmap_keeps_the_buffer_in_use(dmabuf_domains) -> None:
    domains = dmabuf_domains
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        buffer = gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs)
        number = buffer.fileno()
        with mmap.mmap(buffer.fileno(), PAGE_SIZE):
            buffer.close()
            with pytest.raises(BrokerError) as caught:
                gntdev.dmabuf_export_wait_released(number, 0)
            assert caught.value.errno == errno.ETIMEDOUT
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_export_wait_released(number, 0)
        assert caught.value.errno == errno.ENOENT


def test_a_duplicate_descriptor_keeps_the_buffer_in_use(dmabuf_domains) -> None:
    domains = dmabuf_domains
    with granted_pages(domains.peer, domains.local.domid) as (_, allocation), domains.local.open_gntdev() as gntdev:
        buffer = gntdev.dmabuf_export_from_refs(domains.peer.domid, allocation.refs)
        number = buffer.fileno()
        with buffer.dup():
            buffer.close()
            with pytest.raises(BrokerError) as caught:
                gntdev.dmabuf_export_wait_released(number, 0)
            assert caught.value.errno == errno.ETIMEDOUT


# --------------------------------------------------------------------------- import


def test_import_grants_the_buffer_pages(import_domains) -> None:
    domains = import_domains
    with (
        foreign_dmabuf(domains.local, domains.peer, 2) as buffer,
        mmap.mmap(buffer, 2 * PAGE_SIZE) as source,
        domains.local.open_gntdev() as importer,
        domains.peer.open_gntdev() as peer_gntdev,
    ):
        source[PAGE_SIZE : PAGE_SIZE + 4] = b"buf!"
        refs = importer.dmabuf_import_to_refs(buffer, domains.peer.domid, 2)
        assert len(set(refs)) == 2
        with grantee_view(peer_gntdev, [GrantRef(domains.local.domid, ref) for ref in refs]) as (_, memory):
            assert bytes(memory.view[PAGE_SIZE : PAGE_SIZE + 4]) == b"buf!"
            memory.view[0:5] = b"peer!"
            assert source[0:5] == b"peer!"
        importer.dmabuf_import_release(buffer)


def test_import_with_wrong_page_count_is_einval(import_domains) -> None:
    domains = import_domains
    with foreign_dmabuf(domains.local, domains.peer, 1) as buffer, domains.local.open_gntdev() as gntdev:
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_import_to_refs(buffer, domains.peer.domid, 2)
        assert caught.value.errno == errno.EINVAL


def test_import_of_a_pipe_is_einval(import_domains) -> None:
    read_end, write_end = os.pipe()
    try:
        with import_domains.local.open_gntdev() as gntdev, pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_import_to_refs(read_end, import_domains.peer.domid, 1)
        assert caught.value.errno == errno.EINVAL
    finally:
        os.close(read_end)
        os.close(write_end)


def test_import_release_of_a_buffer_not_imported_is_enoent(import_domains) -> None:
    domains = import_domains
    with foreign_dmabuf(domains.local, domains.peer, 1) as buffer, domains.local.open_gntdev() as gntdev:
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_import_release(buffer)
        assert caught.value.errno == errno.ENOENT


def test_import_released_twice_is_enoent(import_domains) -> None:
    domains = import_domains
    with foreign_dmabuf(domains.local, domains.peer, 1) as buffer, domains.local.open_gntdev() as gntdev:
        gntdev.dmabuf_import_to_refs(buffer, domains.peer.domid, 1)
        gntdev.dmabuf_import_release(buffer)
        with pytest.raises(BrokerError) as caught:
            gntdev.dmabuf_import_release(buffer)
        assert caught.value.errno == errno.ENOENT


def test_import_release_ends_the_grants(import_domains) -> None:
    domains = import_domains
    with (
        foreign_dmabuf(domains.local, domains.peer, 1) as buffer,
        domains.local.open_gntdev() as importer,
        domains.peer.open_gntdev() as peer_gntdev,
    ):
        refs = importer.dmabuf_import_to_refs(buffer, domains.peer.domid, 1)
        importer.dmabuf_import_release(buffer)
        index = peer_gntdev.map_grant_refs([GrantRef(domains.local.domid, refs[0])])
        with pytest.raises(BrokerError) as caught:
            peer_gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        peer_gntdev.unmap_grant_ref(index, 1)


def test_an_import_not_released_is_cleaned_up_when_the_instance_closes(import_domains) -> None:
    domains = import_domains
    with foreign_dmabuf(domains.local, domains.peer, 1) as buffer, domains.peer.open_gntdev() as peer_gntdev:
        with domains.local.open_gntdev() as importer:
            refs = importer.dmabuf_import_to_refs(buffer, domains.peer.domid, 1)
        index = peer_gntdev.map_grant_refs([GrantRef(domains.local.domid, refs[0])])
        with pytest.raises(BrokerError) as caught:
            peer_gntdev.map_memory(index, 1, writable=False)
        assert caught.value.errno == errno.EINVAL
        peer_gntdev.unmap_grant_ref(index, 1)
