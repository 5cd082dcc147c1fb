"""A client process for the reliability tests: busy with the broker until it is killed.

Run as ``python worker.py '<json config>'``.  It connects as its domain, maps
the page the sharer gave it, arms that mapping's unmap notification
(clear a byte + send an event), says ``armed``, then runs its activities
concurrently, forever, reporting on stdout what the test must later find
released (``granted <domid> <ref>`` for each page it shares).

Activities (``config["activities"]``):

* ``map``: map / map_to_fd / unmap the sharer's page in a loop (killed mid-map);
* ``copy``: grant copies, inline and through a registered copy buffer (mid-copy);
* ``stream``: several Subscribe streams open, notifications flowing on a ping port;
* ``fds``: descriptors in flight on the fd channel: frames sent ahead of the
  call that names them, copy buffers registered and unregistered;
* ``share``: pages of its own granted to the sharer, some held, some ended;
* ``dmabuf``: the sharer's page exported as a dma-buf, held or waited for;
* ``burst``: many small calls in flight at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import random
import sys

import grant_broker_client
from grant_broker_protocol.v1 import broker_pb2
from grant_broker_client.gntdev import CopySegment, Foreign, Local

CLEAR_BYTE, SEND_EVENT = 0x1, 0x2


def say(*words: object) -> None:
    print(*words, flush=True)


async def activity_map(session, config, rng) -> None:  # type: ignore[no-untyped-def]
    ref = (config["sharer_domid"], config["ref"])
    while True:
        if rng.random() < 0.2:
            grant_fd = await session.gntdev.map_to_fd([ref], writable=False)
            await grant_fd.aclose()
        else:
            mapping = await session.gntdev.map([ref], writable=rng.random() < 0.5)
            _ = bytes(mapping.view[2048:2056])
            await mapping.aclose()


async def activity_copy(session, config, rng) -> None:  # type: ignore[no-untyped-def]
    sharer, ref = config["sharer_domid"], config["ref"]
    buffer = await session.gntdev.copy_buffer(4096)
    while True:
        offset = 2048 + rng.randrange(1024)
        segments = [
            CopySegment(Foreign(sharer, ref, offset), None, 16),
            CopySegment(Foreign(sharer, ref, 2048), Local(buffer, rng.randrange(2048)), 64),
            CopySegment(b"worker", Foreign(sharer, ref, 3072 + rng.randrange(512))),
        ]
        for result in await session.gntdev.grant_copy(segments):
            result.raise_for_status()


async def activity_stream(session, config, rng) -> None:  # type: ignore[no-untyped-def]
    port = await session.evtchn.bind_interdomain(config["sharer_domid"], config["ping_port"])
    streams = [await session.evtchn.subscribe([port]) for _ in range(3)]
    streams.append(await session.evtchn.subscribe())

    async def drain(stream) -> None:  # type: ignore[no-untyped-def]
        async for _ in stream:
            pass

    readers = [asyncio.ensure_future(drain(stream)) for stream in streams]
    try:
        while True:
            await session.evtchn.notify(port)
            await asyncio.sleep(rng.random() * 0.005)
    finally:
        for reader in readers:
            reader.cancel()


def _sealed_memfd(length: int) -> int:
    fd = os.memfd_create("worker", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, length)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


async def activity_fds(session, config, rng) -> None:  # type: ignore[no-untyped-def]
    from grant_broker_protocol.v1 import common_pb2, gntdev_pb2, gntdev_pb2_grpc

    stub = gntdev_pb2_grpc.GntdevStub(session.grpc_channel)
    while True:
        fds = [_sealed_memfd(4096) for _ in range(rng.randrange(1, 8))]
        try:
            transfer = await session.send_fds(fds)
        finally:
            for fd in fds:
                os.close(fd)
        # Let the frame sit in the broker for a moment: killed now, its
        # descriptors are in flight or pending there.
        await asyncio.sleep(rng.random() * 0.01)
        response = await session.call(
            stub.RegisterCopyBuffer,
            gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer, fd=common_pb2.FdRef(index=0), length=4096),
        )
        if rng.random() < 0.7:
            await session.call(stub.UnregisterCopyBuffer, gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=response.buffer_id))


async def activity_share(session, config, rng) -> None:  # type: ignore[no-untyped-def]
    held = []
    while True:
        pages = await session.gntalloc.share(config["sharer_domid"], rng.randrange(1, 4))
        for ref in pages.refs:
            say("granted", session.domid, ref)
        pages.view[0:6] = b"worker"
        if rng.random() < 0.5 and len(held) < 8:
            held.append(pages)
        else:
            await pages.aclose()
        await asyncio.sleep(0.001)


async def activity_dmabuf(session, config, rng) -> None:  # type: ignore[no-untyped-def]
    held = []
    while True:
        exported = await session.gntdev.dmabuf_export(config["sharer_domid"], [config["ref"]])
        if rng.random() < 0.5 and len(held) < 4:
            held.append(exported)  # the broker keeps its number reserved
        else:
            exported.close()
            await exported.wait_released(1000)


async def activity_burst(session, config, rng) -> None:  # type: ignore[no-untyped-def]
    while True:
        await asyncio.gather(*(session.call(session.broker.DescribeSession, broker_pb2.DescribeSessionRequest())
                               for _ in range(rng.randrange(10, 200))))


ACTIVITIES = {
    "map": activity_map,
    "copy": activity_copy,
    "stream": activity_stream,
    "fds": activity_fds,
    "share": activity_share,
    "dmabuf": activity_dmabuf,
    "burst": activity_burst,
}


async def main(config: dict) -> None:  # type: ignore[type-arg]
    rng = random.Random(config["seed"])
    session = await grant_broker_client.connect(config["socket"], domid=config["domid"], client_name=config["name"])
    mapping = await session.gntdev.map([(config["sharer_domid"], config["ref"])])
    port = await session.evtchn.bind_interdomain(config["sharer_domid"], config["notify_port"])
    await mapping.set_unmap_notify(config["clear_offset"], CLEAR_BYTE | SEND_EVENT, port)
    say("armed", session.session_id)
    tasks = [asyncio.ensure_future(ACTIVITIES[name](session, config, random.Random(rng.random()))) for name in config["activities"]]
    say("running")
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()  # an activity failed before the kill: the test sees the traceback


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
