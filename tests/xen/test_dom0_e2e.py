"""End to end on a real Xen: ``grant-broker serve --backend xen`` and SDK clients in dom0.

Runs only where ``/dev/xen/gntdev`` exists (``tests/xen/ci-suite`` boots a
real Xen 4.17 under QEMU and runs it in dom0); skips elsewhere.

The broker is its own process, the test process is one client (the sharer)
and a child Python process the other (the mapper), so the page, the span
descriptors and the event channel really cross three processes, and the
mapper can really be SIGKILLed.  In dom0 there is one domain: the sharer
grants to domain 0, the mapper maps domain 0's grant, and the event channel
is a loopback in domain 0 — the same hypercalls as between two domains.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import grant_broker_client
from grant_broker.uapi.gntdev import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from grant_broker_protocol.v1 import broker_pb2
from grant_broker_client.evtchn import PortFired
from grant_broker_client.gntdev import CopySegment, Foreign, Local
from dom0_helpers import QUIET_PERIOD, STEP_TIMEOUT, Broker, Child

pytestmark = [
    pytest.mark.xen,
    pytest.mark.skipif(not os.path.exists("/dev/xen/gntdev"), reason="needs a real Xen (dom0): no /dev/xen/gntdev here"),
]

MAPPER_SCRIPT = """
    import asyncio, sys
    import grant_broker_client

    async def main(socket_path, ref, offered):
        session = await grant_broker_client.connect(socket_path, client_name="mapper child")
        info = await session.describe()
        domid = info.domid
        mapping = await session.gntdev.map([(domid, ref)])
        print("saw", bytes(mapping.view[0:11]).decode(), flush=True)
        mapping.view[100:111] = b"from mapper"
        port = await session.evtchn.bind_interdomain(remote_domain=domid, remote_port=offered)
        await mapping.set_unmap_notify(200, 0x1 | 0x2, port)     # CLEAR_BYTE | SEND_EVENT
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        print("saw", bytes(mapping.view[300:306]).decode(), flush=True)
        await asyncio.to_thread(sys.stdin.readline)              # wait to be killed

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_two_processes_share_a_page_and_the_unmap_notify_arrives_on_a_stream(
    broker: Broker, children: list[Child]
) -> None:
    assert UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT == 0x3  # as the child script spells it
    async with await grant_broker_client.connect(broker.socket_path, client_name="sharer") as sharer:
        info = await sharer.describe()
        assert info.capabilities.backend == "xen"
        caps = info.capabilities
        # A PV dom0 never exports a dma-buf, and the broker says why (with the
        # stock module because the kernel has no support, else because it is PV).
        assert not caps.dmabuf_export and caps.dmabuf_export_missing
        assert caps.dmabuf_import == caps.dmabuf
        if os.environ.get("GRANT_BROKER_TEST_GNTDEV_DMABUF") == "1":  # tests/xen/dom0-suite loaded the dma-buf module
            assert caps.dmabuf_import and caps.dmabuf_import_missing == ""
            assert "PV domain" in caps.dmabuf_export_missing
        domid = info.domid  # the broker's own domain: 0 in dom0
        async with await sharer.gntalloc.share(domid, 1) as pages:
            pages.view[0:11] = b"from sharer"
            pages.view[200] = 0xEE  # the byte the mapper's notification clears
            offered = await sharer.evtchn.bind_unbound_port(remote_domain=domid)
            mapper = await Child.start(MAPPER_SCRIPT, broker.socket_path, str(pages.refs[0]), str(offered))
            children.append(mapper)

            # The mapper's mmap of its span is the real grant mapping: each side sees the other's writes.
            assert await mapper.expect("saw") == "from sharer"
            await mapper.expect("ready")
            assert bytes(pages.view[100:111]) == b"from mapper"
            pages.view[300:306] = b"second"
            await mapper.say("check")
            assert await mapper.expect("saw") == "second"

            status = await sharer.call(sharer.broker.Status, broker_pb2.StatusRequest())
            (held,) = [s for s in status.sessions if s.client_name == "mapper child"]
            assert (held.usage.mappings, held.usage.mapped_grants, held.usage.event_channels) == (1, 1, 1)
            assert pages.view[200] == 0xEE

            async with sharer.evtchn.subscribe(ports=[offered]) as events:
                next_event = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({next_event}, timeout=QUIET_PERIOD)
                assert not done  # nothing fires while the mapper lives (no false pass)
                mapper.process.send_signal(signal.SIGKILL)
                assert await mapper.finish() == -signal.SIGKILL
                # The mapper's memory went with it, and the broker released its
                # session: the real gntdev notification fires to the sharer's port.
                event = await asyncio.wait_for(next_event, STEP_TIMEOUT)
                assert event == PortFired(offered)
            assert pages.view[200] == 0  # CLEAR_BYTE, done by the kernel at the mapper's munmap


CONSUMER_SCRIPT = """
    import mmap, sys
    fd, length = int(sys.argv[1]), int(sys.argv[2])
    with mmap.mmap(fd, length, mmap.MAP_SHARED) as memory:   # offset 0, as an X server would
        print("saw", memory[length - 6:].decode(), flush=True)
        memory[0:8] = b"consumer"
    print("done", flush=True)
"""


async def test_map_to_fd_gives_a_fresh_instance_mappable_at_offset_0(broker: Broker, children: list[Child]) -> None:
    async with await grant_broker_client.connect(broker.socket_path, client_name="sharer") as sharer, \
            await grant_broker_client.connect(broker.socket_path, client_name="compositor") as compositor:
        domid = (await sharer.describe()).domid
        async with await sharer.gntalloc.share(domid, 2) as pages:
            pages.view[-6:] = b"window"
            async with await compositor.gntdev.map_to_fd([(domid, ref) for ref in pages.refs]) as grant_fd:
                fd = grant_fd.fd.fileno()
                consumer = await Child.start(CONSUMER_SCRIPT, str(fd), str(grant_fd.length), pass_fds=(fd,))
                children.append(consumer)
                assert await consumer.expect("saw") == "window"
                await consumer.expect("done")
                assert await consumer.finish() == 0
            assert bytes(pages.view[0:8]) == b"consumer"


async def test_the_fast_path_maps_and_copies_on_real_xen(broker: Broker) -> None:
    """The SDK's default transport on the real hypervisor: a map, a grant copy
    and a copy ring, all as frames on the session's fd channel."""
    async with await grant_broker_client.connect(broker.socket_path, client_name="fast path") as session:
        assert session.fast_path
        domid = (await session.describe()).domid
        async with await session.gntalloc.share(domid, 2) as pages:
            pages.view[0:5] = b"hello"
            async with await session.gntdev.map([(domid, ref) for ref in pages.refs]) as mapping:
                assert bytes(mapping.view[0:5]) == b"hello"
            (copied,) = await session.gntdev.grant_copy([CopySegment(Foreign(domid, pages.refs[0]), None, 5)])
            assert copied.ok and copied.data == b"hello"
            async with await session.gntdev.copy_buffer(4096) as buffer, \
                    await session.gntdev.copy_ring(buffer, entries=8) as ring:
                statuses = await ring.submit([
                    CopySegment(Foreign(domid, pages.refs[0]), Local(buffer, 0), 4096),
                    CopySegment(Local(buffer, 0), Foreign(domid, pages.refs[1]), 4096),
                ])
                assert statuses == [0, 0]
                assert bytes(buffer.view[0:5]) == b"hello"
            assert bytes(pages.view[4096 : 4096 + 5]) == b"hello"
