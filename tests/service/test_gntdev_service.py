"""The Gntdev service through real sockets: maps, fds at offset 0, grant copy, dma-bufs, release.

Domain 1 shares pages (gntalloc) and domain 2 maps them (gntdev), each in its
own session of an in-process broker on the emulated hypervisor.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE
from grant_broker_protocol.fds import OwnedFd, open_fd_count
from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker.core.policy import Limits
from grant_broker.uapi.grant_table import GNTST_bad_domain, GNTST_general_error, GNTST_okay
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.gntdev import (
    GrantRef,
    UNMAP_NOTIFY_CLEAR_BYTE,
    UNMAP_NOTIFY_SEND_EVENT,
    CopySegment,
    Foreign,
    Local,
)

from .conftest import InProcessBroker

SHARER, MAPPER = 1, 2


@pytest.fixture
async def sharer(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=SHARER, client_name="sharer") as session:
        yield session


@pytest.fixture
async def mapper(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(broker.socket_path, domid=MAPPER, client_name="mapper") as session:
        yield session


async def test_mapping_sees_the_sharers_writes_and_back(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages:
        async with await mapper.gntdev.map([(SHARER, ref) for ref in pages.refs]) as mapping:
            assert mapping.count == 2 and len(mapping.view) == 2 * PAGE_SIZE
            pages.view[PAGE_SIZE : PAGE_SIZE + 5] = b"hello"
            assert bytes(mapping.view[PAGE_SIZE : PAGE_SIZE + 5]) == b"hello"
            mapping.view[0:5] = b"world"
            assert bytes(pages.view[0:5]) == b"world"
            info = await mapper.describe()
            assert (info.usage.mappings, info.usage.mapped_grants) == (1, 2)
        info = await mapper.describe()
        assert (info.usage.mappings, info.usage.mapped_grants) == (0, 0)


async def test_map_takes_pairs_grant_refs_or_refs_of_one_domain(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 3) as pages:
        for page in range(3):
            pages.view[page * PAGE_SIZE] = ord("a") + page
        expected = tuple(GrantRef(SHARER, ref) for ref in pages.refs)
        for refs, domid in (
            ([(SHARER, ref) for ref in pages.refs], None),
            (list(expected), None),
            ([(SHARER, pages.refs[0]), *expected[1:]], None),
            (list(pages.refs), SHARER),
        ):
            async with await mapper.gntdev.map(refs, writable=False, domid=domid) as mapping:
                assert mapping.count == 3 and mapping.refs == expected
                assert bytes(mapping.view[0 : 3 * PAGE_SIZE : PAGE_SIZE]) == b"abc"
        with pytest.raises(TypeError):
            await mapper.gntdev.map([(SHARER, pages.refs[0], 0)])
        assert (await mapper.describe()).usage.mappings == 0


async def test_read_only_mapping_gives_a_read_only_view(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1, writable=False) as pages:
        pages.view[0:3] = b"abc"
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.map([(SHARER, pages.refs[0])], writable=True)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.errno == errno.EINVAL
        assert raised.value.gntst == GNTST_general_error
        async with await mapper.gntdev.map([(SHARER, pages.refs[0])], writable=False) as mapping:
            assert mapping.view.readonly
            assert bytes(mapping.view[0:3]) == b"abc"
            with pytest.raises(TypeError):
                mapping.view[0:1] = b"x"


async def test_mapping_an_ungranted_ref_fails_at_map_time_with_einval(mapper: Session) -> None:
    with pytest.raises(BrokerClientError) as raised:
        await mapper.gntdev.map([(SHARER, 4000)])
    assert raised.value.errno == errno.EINVAL and raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "4000" in raised.value.detail
    # The half-made mapping was given back.
    assert (await mapper.describe()).usage.mappings == 0


async def test_map_is_one_call_and_a_refused_one_leaves_nothing_reserved(
    broker: InProcessBroker, sharer: Session, mapper: Session
) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages:
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.map([(SHARER, pages.refs[0]), (SHARER, 4000)])
        assert raised.value.errno == errno.EINVAL and "4000" in raised.value.detail
        # Nothing stayed reserved in the session's gntdev instance: the next
        # reservation starts at index 0 again, as on a fresh instance.
        assert await mapper.gntdev.map_grant_refs([(SHARER, pages.refs[0])]) == 0
        await mapper.gntdev.unmap_grant_ref(0, 1)
        # Refs of several domains in one call: one domid per ref.
        async with await sharer.gntalloc.share(MAPPER, 1) as more, await mapper.gntdev.map(
            [(SHARER, pages.refs[1]), (SHARER, more.refs[0])]
        ) as mapping:
            more.view[0:4] = b"more"
            assert bytes(mapping.view[PAGE_SIZE : PAGE_SIZE + 4]) == b"more"
            (session,) = [s for s in broker.registry.sessions if s.client_name == "mapper"]
            assert session.usage.mappings == 1 and session.usage.mapped_grants == 2


async def test_map_falls_back_to_two_calls_on_a_broker_without_map(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grant_broker.core import routes
    from grant_broker.daemon import server

    # A broker from before the Map call answers it UNIMPLEMENTED.
    def routes_without_map(*args: object, **kwargs: object) -> tuple[routes.Route, ...]:
        return tuple(route for route in routes.build_routes(*args, **kwargs) if route.method != "Map")  # type: ignore[arg-type]

    monkeypatch.setattr(server, "build_routes", routes_without_map)
    config = ServerConfig(socket_path=str(short_tmp / "old.sock"), backend="emulated", grace_seconds=0)
    async with BrokerServer(config):
        async with await grant_broker_client.connect(config.socket_path, domid=SHARER) as sharer, \
                await grant_broker_client.connect(config.socket_path, domid=MAPPER) as mapper:
            async with await sharer.gntalloc.share(MAPPER, 1) as pages:
                pages.view[0:3] = b"old"
                for _ in range(2):
                    async with await mapper.gntdev.map([(SHARER, pages.refs[0])]) as mapping:
                        assert bytes(mapping.view[0:3]) == b"old"


async def test_map_to_fd_gives_one_descriptor_from_offset_0(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 3) as pages:
        pages.view[2 * PAGE_SIZE : 2 * PAGE_SIZE + 4] = b"tail"
        async with await mapper.gntdev.map_to_fd([(SHARER, ref) for ref in pages.refs], writable=True) as grant_fd:
            assert (grant_fd.offset, grant_fd.length) == (0, 3 * PAGE_SIZE)
            # What an X server does with it: mmap the fd itself, at offset 0.
            with mmap.mmap(grant_fd.fd.fileno(), grant_fd.length, mmap.MAP_SHARED) as memory:
                assert memory[2 * PAGE_SIZE : 2 * PAGE_SIZE + 4] == b"tail"
                memory[0:2] = b"hi"
            assert bytes(pages.view[0:2]) == b"hi"
        assert grant_fd.fd.closed


async def test_map_to_fd_refuses_grants_that_are_not_one_piece_from_offset_0(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages:
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.map_to_fd([(SHARER, pages.refs[1])])
        assert raised.value.errno == errno.EINVAL
        assert "offset 0" in raised.value.detail
        assert (await mapper.describe()).usage.mappings == 0


async def test_unmap_notify_clear_byte_reaches_the_sharer(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages:
        pages.view[100] = 1
        mapping = await mapper.gntdev.map([(SHARER, pages.refs[0])])
        await mapping.set_unmap_notify(100, UNMAP_NOTIFY_CLEAR_BYTE)
        assert pages.view[100] == 1
        await mapping.aclose()
        assert pages.view[100] == 0


async def test_unmap_notify_send_event_needs_a_port_of_this_session(
    broker: InProcessBroker, sharer: Session, mapper: Session
) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages:
        offered = await sharer.evtchn.bind_unbound_port(remote_domain=MAPPER)
        async with await mapper.gntdev.map([(SHARER, pages.refs[0])]) as mapping:
            # Ports are the domain's; a port another session of the domain bound is refused.
            async with await grant_broker_client.connect(broker.socket_path, domid=MAPPER) as neighbour:
                neighbours_port = await neighbour.evtchn.bind_unbound_port(remote_domain=SHARER)
                with pytest.raises(BrokerClientError) as raised:
                    await mapping.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, neighbours_port)
                assert raised.value.errno == errno.EINVAL
                assert "not bound by this session" in raised.value.detail
            port = await mapper.evtchn.bind_interdomain(remote_domain=SHARER, remote_port=offered)
            async with sharer.evtchn.subscribe(ports=[offered]) as events:
                await mapping.set_unmap_notify(0, UNMAP_NOTIFY_SEND_EVENT, port)
                await mapping.aclose()
                event = await asyncio.wait_for(anext(events), 5)
                assert event.port == offered  # type: ignore[union-attr]


async def test_offset_for_vaddr_is_answered_from_the_sdks_mappings(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages:
        async with await mapper.gntdev.map([(SHARER, pages.refs[0])]) as first, await mapper.gntdev.map(
            [(SHARER, pages.refs[1])]
        ) as second:
            assert mapper.gntdev.offset_for_vaddr(first.address) == (first.index, 1)
            assert mapper.gntdev.offset_for_vaddr(second.address) == (second.index, 1)
            assert first.index != second.index
            with pytest.raises(BrokerClientError) as raised:
                mapper.gntdev.offset_for_vaddr(first.address + 1)
            assert raised.value.errno == errno.EINVAL


async def test_set_max_grants_is_enforced_by_the_broker(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 3) as pages:
        await mapper.gntdev.set_max_grants(2)
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.map_grant_refs([(SHARER, ref) for ref in pages.refs])
        assert raised.value.errno == errno.EINVAL
        async with await mapper.gntdev.map([(SHARER, pages.refs[0])]):
            async with await mapper.gntdev.map([(SHARER, pages.refs[1])]):
                with pytest.raises(BrokerClientError) as raised:
                    await mapper.gntdev.map_grant_refs([(SHARER, pages.refs[2])])
                assert raised.value.errno == errno.ENOMEM
                assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


class TestQuota:
    @pytest.fixture
    def broker_limits(self) -> Limits:
        return Limits(max_grants_per_session=4)

    async def test_grants_per_session_count_maps_and_shares(self, sharer: Session, mapper: Session) -> None:
        async with await sharer.gntalloc.share(MAPPER, 3) as pages:
            with pytest.raises(BrokerClientError) as raised:
                await sharer.gntalloc.share(MAPPER, 2)
            assert raised.value.errno == errno.EDQUOT and raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            async with await mapper.gntdev.map([(SHARER, ref) for ref in pages.refs]):
                with pytest.raises(BrokerClientError) as raised:
                    await mapper.gntdev.map([(SHARER, pages.refs[0]), (SHARER, pages.refs[1])])
                assert raised.value.errno == errno.EDQUOT
                assert "limit is 4" in raised.value.detail


class TestMemoryHandouts:
    @pytest.fixture
    def broker_limits(self) -> Limits:
        return Limits(max_map_memory_per_mapping=2)

    async def test_memory_of_one_mapping_is_handed_out_a_bounded_number_of_times(
        self, sharer: Session, mapper: Session
    ) -> None:
        # The Xen backend keeps a descriptor per hand-out until the unmap: unbounded
        # MapMemory calls on one mapping would grow the broker without limit.
        async with await sharer.gntalloc.share(MAPPER, 1) as pages:
            index = await mapper.gntdev.map_grant_refs([(SHARER, pages.refs[0])])
            for _ in range(2):
                for span in await mapper.gntdev.map_memory(index, 1, writable=True):
                    span.close()
            with pytest.raises(BrokerClientError) as raised:
                await mapper.gntdev.map_memory(index, 1, writable=True)
            assert (raised.value.errno, raised.value.code) == (errno.EDQUOT, grpc.StatusCode.RESOURCE_EXHAUSTED)
            await mapper.gntdev.unmap_grant_ref(index, 1)


# --------------------------------------------------------------------------- grant copy


async def test_grant_copy_reports_a_status_per_segment(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages, await sharer.gntalloc.share(
        MAPPER, 1, writable=False
    ) as read_only:
        pages.view[10:15] = b"grant"
        results = await mapper.gntdev.grant_copy(
            [
                CopySegment(Foreign(SHARER, pages.refs[0], 10), None, 5),  # foreign -> inline
                CopySegment(b"copy!", Foreign(SHARER, pages.refs[0], 100)),  # inline -> foreign
                CopySegment(Foreign(SHARER, 3999), None, 4),  # not granted
                CopySegment(Foreign(77, pages.refs[0]), None, 4),  # no such domain
                CopySegment(b"no", Foreign(SHARER, read_only.refs[0])),  # read-only dest
            ]
        )
        assert [r.status for r in results] == [
            GNTST_okay,
            GNTST_okay,
            GNTST_general_error,
            GNTST_bad_domain,
            GNTST_general_error,
        ]
        assert results[0].data == b"grant"
        assert results[2].data is None and results[2].status_name == "GNTST_general_error"
        assert bytes(pages.view[100:105]) == b"copy!"


async def test_grant_copy_through_a_registered_copy_buffer(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages, await mapper.gntdev.copy_buffer(2 * PAGE_SIZE) as buffer:
        pages.view[0:PAGE_SIZE] = b"a" * PAGE_SIZE
        buffer.view[PAGE_SIZE : 2 * PAGE_SIZE] = b"b" * PAGE_SIZE
        results = await mapper.gntdev.grant_copy(
            [
                CopySegment(Foreign(SHARER, pages.refs[0]), Local(buffer, 0), PAGE_SIZE),
                CopySegment(Local(buffer, PAGE_SIZE), Foreign(SHARER, pages.refs[1]), PAGE_SIZE),
            ]
        )
        assert all(result.ok for result in results)
        assert bytes(buffer.view[0:PAGE_SIZE]) == b"a" * PAGE_SIZE
        assert bytes(pages.view[PAGE_SIZE:]) == b"b" * PAGE_SIZE
        # A local side outside the buffer is malformed: the whole call fails.
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.grant_copy([CopySegment(Foreign(SHARER, pages.refs[0]), Local(buffer, 2 * PAGE_SIZE - 2), 4)])
        assert raised.value.errno == errno.EINVAL


async def test_unsealed_copy_buffer_is_refused(broker: InProcessBroker, mapper: Session) -> None:
    # A shrinkable file mapped by the broker could crash it with SIGBUS.
    with OwnedFd(os.memfd_create("unsealed", os.MFD_CLOEXEC)) as fd:
        os.ftruncate(fd.fileno(), PAGE_SIZE)
        from grant_broker_protocol.v1 import common_pb2, gntdev_pb2

        transfer = await mapper.send_fds([fd.fileno()])
        with pytest.raises(BrokerClientError) as raised:
            await mapper.call(
                mapper.gntdev._stub.RegisterCopyBuffer,
                gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=transfer, fd=common_pb2.FdRef(index=0), length=PAGE_SIZE),
            )
    assert raised.value.errno == errno.EINVAL and "F_SEAL_SHRINK" in raised.value.detail


# --------------------------------------------------------------------------- dma-buf


async def test_dmabuf_export_gives_a_real_fd_that_maps_the_granted_data(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 2) as pages:
        pages.view[PAGE_SIZE : PAGE_SIZE + 6] = b"dmabuf"
        exported = await mapper.gntdev.dmabuf_export(SHARER, pages.refs)
        assert os.fstat(exported.fd.fileno()).st_size >= 2 * PAGE_SIZE
        with mmap.mmap(exported.fd.fileno(), 2 * PAGE_SIZE, mmap.MAP_SHARED) as memory:
            assert memory[PAGE_SIZE : PAGE_SIZE + 6] == b"dmabuf"
            # Still in use (our fd and our mmap): the wait times out.
            with pytest.raises(BrokerClientError) as raised:
                await exported.wait_released(0)
            assert raised.value.errno == errno.ETIMEDOUT and raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            exported.close()
            with pytest.raises(BrokerClientError):
                await exported.wait_released(20)  # the mmap still holds it
        # The wait polls without blocking the broker: other calls go on meanwhile.
        await exported.wait_released(2000)
        assert (await mapper.describe()).usage.dmabufs == 0
        with pytest.raises(BrokerClientError) as raised:
            await exported.wait_released(0)
        assert raised.value.errno == errno.ENOENT and raised.value.code == grpc.StatusCode.NOT_FOUND


async def test_dmabuf_wait_released_does_not_block_the_broker(sharer: Session, mapper: Session) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages:
        exported = await mapper.gntdev.dmabuf_export(SHARER, pages.refs)
        waiting = asyncio.create_task(exported.wait_released(5000))
        await asyncio.sleep(0.05)
        # The broker answers others while the wait is on.
        assert (await sharer.describe()).domid == SHARER
        assert not waiting.done()
        exported.close()
        await asyncio.wait_for(waiting, 5)


async def test_dmabuf_import_grants_a_dma_buf_the_broker_exported(sharer: Session, mapper: Session) -> None:
    # A dma-buf import takes a dma-buf, as on Linux: on the emulated backend one
    # the broker made; a client's own memfd is refused (tests/test_emulated_security.py).
    async with await mapper.gntalloc.share(SHARER, 2) as pages:
        pages.view[PAGE_SIZE : PAGE_SIZE + 8] = b"imported"
        buffer = await sharer.gntdev.dmabuf_export(MAPPER, pages.refs)
        imported = await sharer.gntdev.dmabuf_import(buffer.fd, MAPPER, 2)
        assert len(imported.refs) == 2
        assert (await sharer.describe()).usage.granted_pages == 2
        async with await mapper.gntdev.map([(SHARER, ref) for ref in imported.refs]) as mapping:
            assert bytes(mapping.view[PAGE_SIZE : PAGE_SIZE + 8]) == b"imported"
        await imported.release()
        with pytest.raises(BrokerClientError) as raised:
            await mapper.gntdev.map([(SHARER, imported.refs[0])])
        assert raised.value.errno == errno.EINVAL
        with pytest.raises(BrokerClientError) as raised:
            await imported.release()
        assert raised.value.errno == errno.ENOENT
        buffer.close()


# --------------------------------------------------------------------------- release


async def test_session_release_returns_the_brokers_descriptors(broker: InProcessBroker) -> None:
    async def settle() -> int:
        for _ in range(100):
            await asyncio.sleep(0.01)
            gc.collect()
            if not broker.registry.sessions:
                break
        return open_fd_count()

    baseline = await settle()
    sharer = await grant_broker_client.connect(broker.socket_path, domid=SHARER)
    mapper = await grant_broker_client.connect(broker.socket_path, domid=MAPPER)
    pages = await sharer.gntalloc.share(MAPPER, 2)
    mapping = await mapper.gntdev.map([(SHARER, ref) for ref in pages.refs])
    grant_fd = await mapper.gntdev.map_to_fd([(SHARER, ref) for ref in pages.refs])
    buffer = await mapper.gntdev.copy_buffer(PAGE_SIZE)
    exported = await mapper.gntdev.dmabuf_export(SHARER, pages.refs)
    await mapper.gntdev.dmabuf_import(exported.fd, SHARER, len(pages.refs))
    with OwnedFd(os.memfd_create("imp", os.MFD_CLOEXEC)) as memfd:
        os.ftruncate(memfd.fileno(), PAGE_SIZE)
        parcel = await sharer.membuf.export(memfd, [(1, 3)])
    lent = await sharer.membuf.alloc(PAGE_SIZE, [(0, 3)])
    assert open_fd_count() > baseline
    # Drop everything without giving it back one by one: the sessions end.
    await mapping.aclose()
    await buffer.aclose()
    grant_fd.fd.close()
    exported.close()
    parcel.export_fd.close()
    lent.close()
    await mapper.close()
    await pages.aclose()
    await sharer.close()
    assert await settle() == baseline


async def test_sdk_calls_on_a_closed_session_fail_fast(broker: InProcessBroker) -> None:
    session = await grant_broker_client.connect(broker.socket_path, domid=MAPPER)
    await session.close()
    calls = (
        lambda: session.gntdev.map_grant_refs([(SHARER, 8)]),
        lambda: session.gntalloc.share(SHARER, 1),
        lambda: session.membuf.import_(1, [(1, 3)]),
    )
    for call in calls:
        with pytest.raises(BrokerClientError) as raised:
            await asyncio.wait_for(call(), 5)
        assert raised.value.errno == errno.EPIPE and raised.value.code == grpc.StatusCode.UNAVAILABLE


async def test_closing_a_mapping_after_its_session_unmaps_locally(sharer: Session, broker: InProcessBroker) -> None:
    async with await sharer.gntalloc.share(MAPPER, 1) as pages:
        mapper = await grant_broker_client.connect(broker.socket_path, domid=MAPPER)
        mapping = await mapper.gntdev.map([(SHARER, pages.refs[0])])
        await mapper.close()  # the broker gives the mapping back
        await mapping.aclose()  # nothing left to tell the broker
        assert mapping.closed


def docstring_example(module: object, function: str) -> object:
    """The example program of *module*'s docstring (the ``::`` block), compiled."""
    import textwrap

    doc = module.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n    # asyncio.run", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(textwrap.dedent(block), f"<{module.__name__} docstring>", "exec"), namespace)  # type: ignore[attr-defined]
    return namespace[function]


async def test_the_sdk_docstring_examples_run(broker: InProcessBroker) -> None:
    import grant_broker_client.gntdev
    import grant_broker_client.membuf

    await docstring_example(grant_broker_client.gntdev, "share_and_map")(broker.socket_path)  # type: ignore[operator]
    await docstring_example(grant_broker_client.membuf, "lend_and_borrow")(broker.socket_path)  # type: ignore[operator]
