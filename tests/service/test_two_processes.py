"""Clients in separate processes sharing memory through a broker daemon process.

The broker runs as ``grant-broker serve`` (``broker_process``); the test
process is one client and a child Python process the other, so descriptors
really cross process boundaries and a client can really be SIGKILLed.  The
child is driven over its stdin/stdout, one line per step.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator

import grpc
import pytest

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.gntdev import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from grant_broker.uapi.mem_buf import MEM_BUF_PERM_FLAG_READ, MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM
from grant_broker_protocol.v1 import broker_pb2
from grant_broker_client import BrokerClientError
from grant_broker_client.evtchn import PortFired
from grant_broker_client.membuf import PERM_RW

from .conftest import BrokerProcess

SHARER, MAPPER = 1, 2
STEP_TIMEOUT = 30


class Child:
    """A client process running *script*; ``say``/``expect`` exchange lines with it."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, script: str, *args: str, pass_fds: tuple[int, ...] = ()) -> "Child":
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(script), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=pass_fds,
        )
        return cls(process)

    async def expect(self, prefix: str) -> str:
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), STEP_TIMEOUT)).decode().strip()
        if not line.startswith(prefix):
            await self.finish()
            raise AssertionError(f"child said {line!r}, expected {prefix!r}; exit status {self.process.returncode}")
        return line[len(prefix) :].strip()

    async def say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    async def finish(self) -> int:
        if self.process.returncode is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), STEP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode  # type: ignore[return-value]


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        if child.process.returncode is None:
            child.process.kill()
        await child.process.wait()
        # The pipes' transports close with the process; let the loop run their callbacks.
    await asyncio.sleep(0)


MAPPER_SCRIPT = """
    import asyncio, sys
    import grant_broker_client

    async def main(socket_path, ref, offered):
        session = await grant_broker_client.connect(socket_path, domid=2, client_name="mapper child")
        mapping = await session.gntdev.map([(1, ref)])
        print("saw", bytes(mapping.view[0:11]).decode(), flush=True)
        mapping.view[100:111] = b"from mapper"
        port = await session.evtchn.bind_interdomain(remote_domain=1, remote_port=offered)
        await mapping.set_unmap_notify(200, 0x1 | 0x2, port)     # CLEAR_BYTE | SEND_EVENT
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        print("saw", bytes(mapping.view[300:306]).decode(), flush=True)
        await asyncio.to_thread(sys.stdin.readline)              # wait to be killed

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_mapper_process_killed_releases_its_grants_and_notifies_the_sharer(
    broker_process: BrokerProcess, children: list[Child]
) -> None:
    assert UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT == 0x3  # as the child script spells it
    async with await grant_broker_client.connect(broker_process.socket_path, domid=SHARER) as sharer:
        async with await sharer.gntalloc.share(MAPPER, 1) as pages:
            pages.view[0:11] = b"from sharer"
            pages.view[200] = 0xEE  # the byte the mapper's notification clears
            offered = await sharer.evtchn.bind_unbound_port(remote_domain=MAPPER)
            mapper = await Child.start(MAPPER_SCRIPT, broker_process.socket_path, str(pages.refs[0]), str(offered))
            children.append(mapper)

            # Each side sees the other's writes.
            assert await mapper.expect("saw") == "from sharer"
            await mapper.expect("ready")
            assert bytes(pages.view[100:111]) == b"from mapper"
            pages.view[300:306] = b"second"
            await mapper.say("check")
            assert await mapper.expect("saw") == "second"

            status = await sharer.call(sharer.broker.Status, broker_pb2.StatusRequest())
            (held,) = [s for s in status.sessions if s.domid == MAPPER]
            assert (held.usage.mappings, held.usage.mapped_grants, held.usage.event_channels) == (1, 1, 1)
            assert pages.view[200] == 0xEE

            async with sharer.evtchn.subscribe(ports=[offered]) as events:
                next_event = asyncio.ensure_future(anext(events))
                # Nothing fires while the mapper lives (no false pass).
                done, _ = await asyncio.wait({next_event}, timeout=0.3)
                assert not done
                mapper.kill()
                assert await mapper.finish() == -signal.SIGKILL
                # The broker notices the dead client's fd channel closing and
                # releases its session: the unmap notification fires.
                event = await asyncio.wait_for(next_event, STEP_TIMEOUT)
                assert event == PortFired(offered)
            assert pages.view[200] == 0
            status = await sharer.call(sharer.broker.Status, broker_pb2.StatusRequest())
            assert [s.domid for s in status.sessions] == [SHARER]
            ref = pages.refs[0]
        # The dead mapper no longer pins the grant: ending it frees the ref at
        # once, and the emulated grant table (LIFO, as Linux's free list) hands
        # the same ref out again.  A ref still mapped would stay in use.
        async with await sharer.gntalloc.share(MAPPER, 1) as again:
            assert again.refs == (ref,)


CONSUMER_SCRIPT = """
    import mmap, sys
    fd, length = int(sys.argv[1]), int(sys.argv[2])
    with mmap.mmap(fd, length, mmap.MAP_SHARED) as memory:   # offset 0, as an X server would
        print("saw", memory[length - 6:].decode(), flush=True)
        memory[0:8] = b"consumer"
    print("done", flush=True)
"""


async def test_map_to_fd_hands_another_process_an_fd_it_maps_at_offset_0(
    broker_process: BrokerProcess, children: list[Child]
) -> None:
    async with await grant_broker_client.connect(broker_process.socket_path, domid=SHARER) as sharer, \
            await grant_broker_client.connect(broker_process.socket_path, domid=MAPPER) as mapper:
        async with await sharer.gntalloc.share(MAPPER, 2) as pages:
            pages.view[-6:] = b"window"
            async with await mapper.gntdev.map_to_fd([(SHARER, ref) for ref in pages.refs]) as grant_fd:
                fd = grant_fd.fd.fileno()
                consumer = await Child.start(CONSUMER_SCRIPT, str(fd), str(grant_fd.length), pass_fds=(fd,))
                children.append(consumer)
                assert await consumer.expect("saw") == "window"
                await consumer.expect("done")
                assert await consumer.finish() == 0
            assert bytes(pages.view[0:8]) == b"consumer"


async def test_dmabuf_export_fd_from_a_broker_process_maps_the_granted_data(broker_process: BrokerProcess) -> None:
    async with await grant_broker_client.connect(broker_process.socket_path, domid=SHARER) as sharer, \
            await grant_broker_client.connect(broker_process.socket_path, domid=MAPPER) as mapper:
        async with await sharer.gntalloc.share(MAPPER, 1) as pages:
            pages.view[0:7] = b"granted"
            exported = await mapper.gntdev.dmabuf_export(SHARER, pages.refs)
            with exported.fd, mmap.mmap(exported.fd.fileno(), PAGE_SIZE, mmap.MAP_SHARED) as memory:
                assert memory[0:7] == b"granted"
                memory[7:9] = b"!!"
            assert bytes(pages.view[0:9]) == b"granted!!"
            await exported.wait_released(5000)


EXPORTER_SCRIPT = """
    import asyncio, os, sys
    import grant_broker_client

    async def main(socket_path):
        async with await grant_broker_client.connect(socket_path, domid=1, vmid=0, client_name="exporter") as session:
            buffer = os.memfd_create("dma-buf", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(buffer, 4096)
            os.pwrite(buffer, b"lent by vm 0", 0)
            parcel = await session.membuf.export(buffer, [(1, 3)])   # TRUSTED_VM, READ|WRITE
            os.close(buffer)
            print("handle", parcel.handle, flush=True)
            await asyncio.to_thread(sys.stdin.readline)              # keep the export fd open until told
            parcel.export_fd.close()
        print("done", flush=True)

    asyncio.run(main(sys.argv[1]))
"""


async def test_membuf_export_in_one_process_import_by_handle_in_another(
    broker_process: BrokerProcess, children: list[Child]
) -> None:
    assert (MEM_BUF_VMID_TRUSTED_VM, PERM_RW) == (1, 3)  # as the child script spells it
    exporter = await Child.start(EXPORTER_SCRIPT, broker_process.socket_path)
    children.append(exporter)
    handle = int(await exporter.expect("handle"))
    async with await grant_broker_client.connect(
        broker_process.socket_path, domid=MAPPER, vmid=MEM_BUF_VMID_TRUSTED_VM
    ) as importer:
        with pytest.raises(BrokerClientError) as raised:
            await importer.membuf.import_(handle, [(MEM_BUF_VMID_TRUSTED_VM, MEM_BUF_PERM_FLAG_READ)])
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.errno == errno.EINVAL
        with pytest.raises(BrokerClientError) as raised:
            await importer.membuf.import_(handle, [(MEM_BUF_VMID_PRIMARY_VM, PERM_RW)])
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.errno == errno.EINVAL

        imported: OwnedFd = await importer.membuf.import_(handle, [(MEM_BUF_VMID_TRUSTED_VM, PERM_RW)])
        with imported, mmap.mmap(imported.fileno(), PAGE_SIZE, mmap.MAP_SHARED) as memory:
            assert memory[0:12] == b"lent by vm 0"
        await exporter.say("done")
        await exporter.expect("done")
        assert await exporter.finish() == 0
        # The export fd is closed everywhere now: the memparcel is gone.
        for _ in range(100):
            try:
                (await importer.membuf.import_(handle, [(MEM_BUF_VMID_TRUSTED_VM, PERM_RW)])).close()
            except BrokerClientError as exc:
                assert exc.errno == errno.EINVAL
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the memparcel outlived its export fd")
    assert os.path.exists(broker_process.socket_path)
