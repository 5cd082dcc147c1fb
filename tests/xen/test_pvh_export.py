"""gntdev dma-buf export where Linux allows it: a PVH guest (``make xen-pvh-export``; not in CI).

A PV domain (every PV dom0) refuses export by design, so the conformance
suite's export tests skip in dom0 with that reason.  This module runs only
when ``tests/xen/pvh-export`` booted Xen with HVM + HAP (QEMU ``-cpu
qemu64,+svm,+npt``) and started the guest as PVH, with the dma-buf gntdev
module built by ``build-gntdev-dmabuf --pvh-export`` (without
``GNTMAP_device_map``, which Xen 4.17 refuses for auto-translated guests).

dom0's broker session grants pages to the guest; gb-peer, in the guest,
exports them as a dma-buf with the guest's own gntdev and reports what the
kernel answers.  (The broker itself runs in dom0: running it inside a PVH
guest needs Python and the project there, which this guest does not have.
The guest grants nothing to itself: self-grants corrupt memory in a PVH guest.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

import grant_broker_client
from grant_broker_client import Session
from grant_broker.uapi.gntdev import GNTDEV_DMA_FLAG_COHERENT, GNTDEV_DMA_FLAG_WC
from dom0_helpers import Broker, GuestError, GuestInfo, Peer

pytestmark = [
    pytest.mark.xen,
    pytest.mark.skipif(os.environ.get("XEN_GUEST_TYPE") != "pvh", reason="needs the PVH guest of make xen-pvh-export"),
]


@pytest.fixture
async def session(broker: Broker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, client_name="pvh export tests") as opened:
        yield opened


@pytest.fixture
async def peer(session: Session, guest_info: GuestInfo) -> AsyncIterator[Peer]:
    async with await session.gntdev.map([(guest_info.domid, guest_info.control_ref)]) as control:
        yield Peer(guest_info.domid, control)


async def test_a_pvh_guest_exports_grants_as_a_dma_buf_released_at_its_last_close(session: Session, peer: Peer) -> None:
    dom0 = (await session.describe()).domid
    async with await session.gntalloc.share(peer.domid, 2) as pages:
        buffer = await peer.ask(f"export 0 {dom0} {pages.refs[0]} {pages.refs[1]}")
        with pytest.raises(GuestError, match="timed out"):
            await peer.ask(f"wait-released {buffer} 0")  # ETIMEDOUT while the buffer is open
        # The release happens within the last close: a waiter already blocked sees it (0).
        await peer.ask(f"wait-close {buffer} 10000")
        with pytest.raises(GuestError, match="No such file"):
            await peer.ask(f"wait-released {buffer} 0")  # ENOENT: released and forgotten


async def test_a_pvh_guest_imports_its_own_export_and_releases_it(session: Session, peer: Peer) -> None:
    dom0 = (await session.describe()).domid
    async with await session.gntalloc.share(peer.domid, 1) as pages:
        buffer = await peer.ask(f"export 0 {dom0} {pages.refs[0]}")
        refs = (await peer.ask(f"import {buffer} 1 {dom0}")).split()
        assert len(refs) == 1
        await peer.ask(f"import-release {buffer}")
        with pytest.raises(GuestError, match="No such file"):
            await peer.ask(f"import-release {buffer}")
        await peer.ask(f"close {buffer}")


@pytest.mark.parametrize(
    ("flags", "accepted"),
    [(GNTDEV_DMA_FLAG_WC, True), (GNTDEV_DMA_FLAG_COHERENT, True), (GNTDEV_DMA_FLAG_WC | GNTDEV_DMA_FLAG_COHERENT, False)],
    ids=["wc", "coherent", "wc+coherent"],
)
async def test_export_flags_allocate_dma_memory_one_kind_at_a_time(
    session: Session, peer: Peer, flags: int, accepted: bool
) -> None:
    """WC and COHERENT go through gnttab_dma_alloc_pages (compiled into the module); both at once is EINVAL."""
    dom0 = (await session.describe()).domid
    async with await session.gntalloc.share(peer.domid, 1) as pages:
        if accepted:
            buffer = await peer.ask(f"export {flags} {dom0} {pages.refs[0]}")
            await peer.ask(f"wait-close {buffer} 10000")
        else:
            with pytest.raises(GuestError, match="Invalid argument"):
                await peer.ask(f"export {flags} {dom0} {pages.refs[0]}")
