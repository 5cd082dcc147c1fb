"""End to end across two real domains: the broker in dom0 and a PV guest.

``tests/xen/ci-suite`` boots one PV guest per run (``tests/xen/guest``:
Debian's kernel, a busybox initramfs and ``gb-peer``, the project's small
static peer program) while pytest starts in dom0.  The guest plays what the
broker's users serve: it shares pages with dom0, maps dom0's, binds event
channels and arms unmap notifications, on its own real ``/dev/xen`` devices.

The tests drive it through a control page the guest grants to dom0, mapped
through the broker like any other grant; commands are text (see
``guest/peer.c``).  Each check runs once per SDK transport: the fast path (the
SDK's default) and plain gRPC.

Runs only in dom0 with a guest started (``XEN_GUEST_STATE``); where the guest
failed to boot twice, the tests fail when ``GRANT_BROKER_TEST_REQUIRE_GUEST=1``
(the CI) and skip otherwise.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
from collections.abc import AsyncIterator

import pytest

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE
from grant_broker.uapi.gntdev import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from grant_broker_client import Session
from grant_broker_client.evtchn import PortFired
from grant_broker_client.gntdev import CopySegment, Foreign, Local
from dom0_helpers import QUIET_PERIOD, STEP_TIMEOUT, Broker, Child, GuestError, GuestInfo, Peer

pytestmark = [
    pytest.mark.xen,
    pytest.mark.skipif(not os.path.exists("/dev/xen/gntdev"), reason="needs a real Xen (dom0): no /dev/xen/gntdev here"),
]

GUEST_EVENT_TIMEOUT_MS = 60_000


@pytest.fixture(params=[True, False], ids=["fast-path", "grpc"])
async def session(request: pytest.FixtureRequest, broker: Broker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(
        broker.socket_path, client_name="guest tests", fast_path=request.param
    ) as opened:
        assert opened.fast_path is request.param
        yield opened


@pytest.fixture
async def peer(session: Session, guest_info: GuestInfo) -> AsyncIterator[Peer]:
    async with await session.gntdev.map([(guest_info.domid, guest_info.control_ref)]) as control:
        yield Peer(guest_info.domid, control)


async def own_domid(session: Session) -> int:
    return (await session.describe()).domid


async def test_the_guest_shares_pages_that_a_client_maps(session: Session, peer: Peer) -> None:
    region, refs = await peer.share(2)
    await peer.ask(f"poke {region} 0 guest-page-0")
    await peer.ask(f"poke {region} {PAGE_SIZE} guest-page-1")
    async with await session.gntdev.map([(peer.domid, ref) for ref in refs]) as mapping:
        assert bytes(mapping.view[0:12]) == b"guest-page-0"
        assert bytes(mapping.view[PAGE_SIZE : PAGE_SIZE + 12]) == b"guest-page-1"
        mapping.view[100:109] = b"from-dom0"
        assert await peer.ask(f"peek {region} 100 9") == "from-dom0"


async def test_a_client_shares_pages_that_the_guest_maps(session: Session, peer: Peer) -> None:
    async with await session.gntalloc.share(peer.domid, 1) as pages:
        pages.view[0:10] = b"dom0-page!"
        region = await peer.ask(f"map {await own_domid(session)} {pages.refs[0]}")
        try:
            assert await peer.ask(f"peek {region} 0 10") == "dom0-page!"
            await peer.ask(f"poke {region} 200 from-guest")
            assert bytes(pages.view[200:210]) == b"from-guest"
        finally:
            await peer.ask(f"unmap {region}")


async def test_event_channels_both_ways_between_a_session_and_the_guest(session: Session, peer: Peer) -> None:
    offered = await session.evtchn.bind_unbound_port(remote_domain=peer.domid)
    guest_port = await peer.ask(f"bind {offered}")
    async with session.evtchn.subscribe(ports=[offered]) as events:
        next_event = asyncio.ensure_future(anext(events))
        done, _ = await asyncio.wait({next_event}, timeout=QUIET_PERIOD)
        assert not done  # nothing before the guest notifies (no false pass)
        await peer.ask(f"notify {guest_port}")
        assert await asyncio.wait_for(next_event, STEP_TIMEOUT) == PortFired(offered)

    with pytest.raises(GuestError, match="timeout"):
        await peer.ask(f"wait {guest_port} 300")  # nothing before dom0 notifies (no false pass)
    await session.evtchn.notify(offered)
    assert await peer.ask(f"wait {guest_port} {GUEST_EVENT_TIMEOUT_MS}") == guest_port
    await session.evtchn.unbind(offered)


async def test_a_guest_process_dying_fires_its_unmap_notify_to_a_subscription(session: Session, peer: Peer) -> None:
    async with await session.gntalloc.share(peer.domid, 1) as pages:
        pages.view[200] = 0xEE
        offered = await session.evtchn.bind_unbound_port(remote_domain=peer.domid)
        # A child process in the guest maps the page, binds the port and arms
        # CLEAR_BYTE | SEND_EVENT at byte 200; then it is SIGKILLed.
        child = await peer.ask(f"child-map {await own_domid(session)} {pages.refs[0]} 200 {offered}")
        async with session.evtchn.subscribe(ports=[offered]) as events:
            next_event = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({next_event}, timeout=QUIET_PERIOD)
            assert not done and pages.view[200] == 0xEE  # nothing while the guest's process lives
            await peer.ask(f"kill {child}")
            assert await asyncio.wait_for(next_event, STEP_TIMEOUT) == PortFired(offered)
        assert pages.view[200] == 0  # cleared by the guest's kernel at the unmap


GUEST_MAPPER_SCRIPT = """
    import asyncio, sys
    import grant_broker_client

    async def main(socket_path, domid, ref, guest_port, fast_path):
        session = await grant_broker_client.connect(socket_path, client_name="guest mapper", fast_path=fast_path == "1")
        mapping = await session.gntdev.map([(domid, ref)])
        port = await session.evtchn.bind_interdomain(remote_domain=domid, remote_port=guest_port)
        await mapping.set_unmap_notify(200, 0x1 | 0x2, port)     # CLEAR_BYTE | SEND_EVENT
        print("ready", bytes(mapping.view[200:201]).decode(), flush=True)
        await asyncio.to_thread(sys.stdin.readline)              # wait to be killed

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
"""


async def test_a_broker_client_killed_fires_its_unmap_notify_to_the_guest(
    session: Session, peer: Peer, broker: Broker, children: list[Child]
) -> None:
    assert UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT == 0x3  # as the child script spells it
    region, (ref,) = await peer.share(1)
    await peer.ask(f"poke {region} 200 Z")
    guest_port = await peer.ask("unbound")
    mapper = await Child.start(
        GUEST_MAPPER_SCRIPT, broker.socket_path, str(peer.domid), str(ref), guest_port, "1" if session.fast_path else "0"
    )
    children.append(mapper)
    assert await mapper.expect("ready") == "Z"
    with pytest.raises(GuestError, match="timeout"):
        await peer.ask(f"wait {guest_port} 300")  # nothing while the client lives (no false pass)
    assert await peer.ask(f"byte {region} 200") == str(ord("Z"))
    mapper.process.send_signal(signal.SIGKILL)
    assert await mapper.finish() == -signal.SIGKILL
    # The broker ends the dead client's session: its mapping is unmapped and
    # the kernel clears the byte and signals the guest's port.
    assert await peer.ask(f"wait {guest_port} {GUEST_EVENT_TIMEOUT_MS}") == guest_port
    assert await peer.ask(f"byte {region} 200") == "0"


async def test_one_map_of_refs_from_two_domains(session: Session, peer: Peer) -> None:
    dom0 = await own_domid(session)
    region, (guest_ref,) = await peer.share(1)
    await peer.ask(f"poke {region} 0 guest-page")
    async with await session.gntalloc.share(dom0, 1) as own:
        own.view[0:9] = b"dom0-page"
        async with await session.gntdev.map([(dom0, own.refs[0]), (peer.domid, guest_ref)]) as mapping:
            assert bytes(mapping.view[0:9]) == b"dom0-page"
            assert bytes(mapping.view[PAGE_SIZE : PAGE_SIZE + 10]) == b"guest-page"
            mapping.view[PAGE_SIZE + 20 : PAGE_SIZE + 25] = b"both!"
            assert await peer.ask(f"peek {region} 20 5") == "both!"


async def test_grant_copy_between_the_guests_grants_and_a_sessions_buffer(session: Session, peer: Peer) -> None:
    region, (ref,) = await peer.share(1)
    await peer.ask(f"poke {region} 0 copy-from-guest")
    async with await session.gntdev.copy_buffer(PAGE_SIZE) as buffer:
        buffer.view[1000:1015] = b"copy-into-guest"
        results = await session.gntdev.grant_copy([
            CopySegment(Foreign(peer.domid, ref), Local(buffer, 0), 15),
            CopySegment(Local(buffer, 1000), Foreign(peer.domid, ref, 100), 15),
        ])
        assert [result.status_name for result in results] == ["GNTST_okay", "GNTST_okay"]
        assert bytes(buffer.view[0:15]) == b"copy-from-guest"
    assert await peer.ask(f"peek {region} 100 15") == "copy-into-guest"


async def test_the_guest_maps_a_dma_buf_that_dom0_imported(session: Session, peer: Peer) -> None:
    """A real dma-buf of dom0 (vgem) granted to the guest through the broker."""
    if not (await session.describe()).capabilities.dmabuf_import:
        pytest.skip("dma-buf import unavailable here (the stock gntdev module)")
    from conformance._dmabuf_source import vgem_dmabuf

    with vgem_dmabuf(1) as fd, mmap.mmap(fd, PAGE_SIZE) as source:
        source[0:12] = b"vgem-in-dom0"
        imported = await session.gntdev.dmabuf_import(fd, peer.domid, 1)
        region = await peer.ask(f"map {await own_domid(session)} {imported.refs[0]}")
        try:
            assert await peer.ask(f"peek {region} 0 12") == "vgem-in-dom0"
            await peer.ask(f"poke {region} 64 from-guest")
            assert source[64:74] == b"from-guest"
        finally:
            await peer.ask(f"unmap {region}")
        await imported.release()
