"""Bad requests to every RPC of Gntdev, Gntalloc and MemBuf: the precise status and errno, never UNKNOWN.

Each row sends one malformed request through a real session (requests that
carry a descriptor get a sealed one-page memfd sent ahead of them) and checks
the gRPC code, the errno in the status details, and a fragment of the sentence.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi.gntdev import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from grant_broker.uapi.grant_table import GNTCOPY_dest_gref, GNTCOPY_source_gref
from grant_broker.uapi.mem_buf import MEM_BUF_VMID_PRIMARY_VM, MEM_BUF_VMID_TRUSTED_VM
from grant_broker_protocol.v1 import (
    common_pb2,
    gntalloc_pb2,
    gntalloc_pb2_grpc,
    gntdev_pb2,
    gntdev_pb2_grpc,
    membuf_pb2,
    membuf_pb2_grpc,
)
from grant_broker_client import BrokerClientError, Session

from .conftest import InProcessBroker

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SELF = 1  # the session's own domain
PEER = 2


@dataclass(frozen=True)
class Case:
    id: str
    service: str
    method: str
    request: Callable[[int], Any]  # transfer id (0 when no fd is sent) -> request
    code: grpc.StatusCode
    errno: int
    fragment: str
    send_fd: bool = False


def ref(domid: int = PEER, number: int = 8) -> common_pb2.GrantRef:
    return common_pb2.GrantRef(domid=domid, ref=number)


def foreign(ref_: int = 8, offset: int = 0, domid: int = PEER) -> gntdev_pb2.GrantCopyPointer:
    return gntdev_pb2.GrantCopyPointer(foreign=gntdev_pb2.GrantCopyForeign(ref=ref_, offset=offset, domid=domid))


def local(buffer_id: int = 0, offset: int = 0, data: bytes = b"") -> gntdev_pb2.GrantCopyPointer:
    return gntdev_pb2.GrantCopyPointer(virt=gntdev_pb2.GrantCopyLocal(buffer_id=buffer_id, offset=offset, data=data))


def copy(*segments: gntdev_pb2.GrantCopySegment, count: int | None = None) -> gntdev_pb2.GrantCopyRequest:
    return gntdev_pb2.GrantCopyRequest(count=len(segments) if count is None else count, segments=segments)


def segment(source: Any, dest: Any, length: int = 4, flags: int | None = None) -> gntdev_pb2.GrantCopySegment:
    if flags is None:
        flags = (GNTCOPY_source_gref if source.WhichOneof("pointer") == "foreign" else 0) | (
            GNTCOPY_dest_gref if dest.WhichOneof("pointer") == "foreign" else 0
        )
    return gntdev_pb2.GrantCopySegment(source=source, dest=dest, len=length, flags=flags)


def acl(*entries: tuple[int, int], nr: int | None = None) -> dict[str, Any]:
    messages = [membuf_pb2.AclEntry(vmid=vmid, perms=perms) for vmid, perms in entries]
    return {"acl_list": messages, "nr_acl_entries": len(messages) if nr is None else nr}


RW = 3
GOOD_ACL = (MEM_BUF_VMID_TRUSTED_VM, RW)
FD0 = common_pb2.FdRef(index=0)

G, A, M = "gntdev", "gntalloc", "membuf"

CASES = [
    # ------------------------------------------------------------------ Gntdev
    Case("map-count-mismatch", G, "MapGrantRef", lambda t: gntdev_pb2.MapGrantRefRequest(count=2, refs=[ref()]),
         INVALID, errno.EINVAL, "count is 2 but 1 refs"),
    Case("map-no-refs", G, "MapGrantRef", lambda t: gntdev_pb2.MapGrantRefRequest(count=0),
         INVALID, errno.EINVAL, "count is 0"),
    Case("map-domid-over-16-bits", G, "MapGrantRef",
         lambda t: gntdev_pb2.MapGrantRefRequest(count=1, refs=[ref(domid=70000)]), INVALID, errno.EINVAL, "domid_t"),
    Case("map-in-one-call-no-refs", G, "Map", lambda t: gntdev_pb2.MapRequest(domids=[PEER]),
         INVALID, errno.EINVAL, "count is 0"),
    Case("map-in-one-call-domid-over-16-bits", G, "Map", lambda t: gntdev_pb2.MapRequest(domids=[70000], refs=[8]),
         INVALID, errno.EINVAL, "domid_t"),
    Case("map-in-one-call-domids-do-not-match-refs", G, "Map",
         lambda t: gntdev_pb2.MapRequest(domids=[PEER, PEER], refs=[8, 9, 10]), INVALID, errno.EINVAL, "2 domids for 3 refs"),
    Case("map-in-one-call-not-granted", G, "Map", lambda t: gntdev_pb2.MapRequest(domids=[PEER], refs=[8]),
         INVALID, errno.EINVAL, "ref 8 of domain 2"),
    Case("unmap-unknown-index", G, "UnmapGrantRef", lambda t: gntdev_pb2.UnmapGrantRefRequest(index=4096, count=1),
         NOT_FOUND, errno.ENOENT, "no mapping of 1 grants at index 0x1000"),  # gntdev_ioctl_unmap_grant_ref: ENOENT
    Case("map-memory-unknown-index", G, "MapMemory", lambda t: gntdev_pb2.MapMemoryRequest(index=0, count=1),
         INVALID, errno.EINVAL, "no mapping starts at index 0"),
    Case("map-memory-fresh-unknown-index", G, "MapMemory",
         lambda t: gntdev_pb2.MapMemoryRequest(index=0, count=1, fresh_instance=True),
         INVALID, errno.EINVAL, "no mapping starts at index 0"),
    Case("set-max-grants-above-the-broker-limit", G, "SetMaxGrants",
         lambda t: gntdev_pb2.SetMaxGrantsRequest(count=2**32 - 1), INVALID, errno.E2BIG, "limit"),
    Case("notify-unknown-action", G, "SetUnmapNotify", lambda t: gntdev_pb2.SetUnmapNotifyRequest(index=0, action=4),
         INVALID, errno.EINVAL, "action 0x4"),
    Case("notify-port-not-of-this-session", G, "SetUnmapNotify",
         lambda t: gntdev_pb2.SetUnmapNotifyRequest(index=0, action=UNMAP_NOTIFY_SEND_EVENT, event_channel_port=5),
         INVALID, errno.EINVAL, "port 5 is not bound by this session"),
    Case("notify-offset-in-no-mapping", G, "SetUnmapNotify",
         lambda t: gntdev_pb2.SetUnmapNotifyRequest(index=0, action=UNMAP_NOTIFY_CLEAR_BYTE),
         NOT_FOUND, errno.ENOENT, "in no mapping"),  # gntdev_ioctl_notify answers ENOENT
    Case("copy-buffer-without-fd", G, "RegisterCopyBuffer",
         lambda t: gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=0, fd=FD0, length=PAGE_SIZE),
         INVALID, errno.EBADF, "fd_transfer is 0"),
    Case("copy-buffer-fd-index-not-sent", G, "RegisterCopyBuffer",
         lambda t: gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=t, fd=common_pb2.FdRef(index=3), length=PAGE_SIZE),
         INVALID, errno.EBADF, "fd index 3", send_fd=True),
    Case("copy-buffer-length-0", G, "RegisterCopyBuffer",
         lambda t: gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=t, fd=FD0, length=0),
         INVALID, errno.EINVAL, "length 0", send_fd=True),
    Case("copy-buffer-longer-than-its-file", G, "RegisterCopyBuffer",
         lambda t: gntdev_pb2.RegisterCopyBufferRequest(fd_transfer=t, fd=FD0, length=2 * PAGE_SIZE),
         INVALID, errno.EINVAL, "less than the", send_fd=True),
    Case("unregister-unknown-copy-buffer", G, "UnregisterCopyBuffer",
         lambda t: gntdev_pb2.UnregisterCopyBufferRequest(buffer_id=9), NOT_FOUND, errno.ENOENT, "no copy buffer 9"),
    Case("copy-ring-of-an-unknown-buffer", G, "CreateCopyRing",
         lambda t: gntdev_pb2.CreateCopyRingRequest(buffer_id=9, entries=8), NOT_FOUND, errno.ENOENT, "no copy buffer 9"),
    Case("submit-to-an-unknown-copy-ring", G, "SubmitCopyRing",
         lambda t: gntdev_pb2.SubmitCopyRingRequest(ring_id=9, first=0, count=1), NOT_FOUND, errno.ENOENT, "no copy ring 9"),
    Case("destroy-an-unknown-copy-ring", G, "DestroyCopyRing",
         lambda t: gntdev_pb2.DestroyCopyRingRequest(ring_id=9), NOT_FOUND, errno.ENOENT, "no copy ring 9"),
    Case("copy-count-mismatch", G, "GrantCopy", lambda t: copy(segment(foreign(), local()), count=3),
         INVALID, errno.EINVAL, "count is 3 but 1 segments"),
    Case("copy-both-local", G, "GrantCopy", lambda t: copy(segment(local(data=b"abcd"), local())),
         INVALID, errno.EINVAL, "both sides are local"),
    Case("copy-flags-do-not-match", G, "GrantCopy", lambda t: copy(segment(foreign(), local(), flags=GNTCOPY_dest_gref)),
         INVALID, errno.EINVAL, "GNTCOPY_source_gref is clear"),
    Case("copy-unknown-flag", G, "GrantCopy", lambda t: copy(segment(foreign(), local(), flags=GNTCOPY_source_gref | 8)),
         INVALID, errno.EINVAL, "flags 0x9"),
    Case("copy-len-over-16-bits", G, "GrantCopy", lambda t: copy(segment(foreign(), local(), length=70000)),
         INVALID, errno.EINVAL, "does not fit 16 bits"),
    Case("copy-offset-over-16-bits", G, "GrantCopy", lambda t: copy(segment(foreign(offset=70000), local())),
         INVALID, errno.EINVAL, "offset 70000"),
    Case("copy-domid-over-16-bits", G, "GrantCopy", lambda t: copy(segment(foreign(domid=70000), local())),
         INVALID, errno.EINVAL, "domid_t"),
    Case("copy-crosses-the-page", G, "GrantCopy", lambda t: copy(segment(foreign(offset=PAGE_SIZE - 2), local())),
         INVALID, errno.EINVAL, "cross the page boundary"),
    Case("copy-missing-side", G, "GrantCopy",
         lambda t: copy(gntdev_pb2.GrantCopySegment(source=foreign(), len=4, flags=GNTCOPY_source_gref)),
         INVALID, errno.EINVAL, "both source and dest must be set"),
    Case("copy-unknown-buffer", G, "GrantCopy", lambda t: copy(segment(foreign(), local(buffer_id=42))),
         INVALID, errno.EINVAL, "no copy buffer 42"),
    Case("copy-inline-dest-with-data", G, "GrantCopy", lambda t: copy(segment(foreign(), local(data=b"xx")))
         , INVALID, errno.EINVAL, "inline dest"),
    Case("copy-inline-source-too-short", G, "GrantCopy", lambda t: copy(segment(local(data=b"ab"), foreign())),
         INVALID, errno.EINVAL, "outside its"),
    Case("dmabuf-export-count-mismatch", G, "DmabufExportFromRefs",
         lambda t: gntdev_pb2.DmabufExportFromRefsRequest(count=2, domid=PEER, refs=[8]),
         INVALID, errno.EINVAL, "count is 2 but 1 refs"),
    Case("dmabuf-export-no-refs", G, "DmabufExportFromRefs",
         lambda t: gntdev_pb2.DmabufExportFromRefsRequest(count=0, domid=PEER), INVALID, errno.EINVAL, "count is 0"),
    Case("dmabuf-export-unknown-flag", G, "DmabufExportFromRefs",
         lambda t: gntdev_pb2.DmabufExportFromRefsRequest(flags=4, count=1, domid=PEER, refs=[8]),
         INVALID, errno.EINVAL, "flags 0x4"),
    Case("dmabuf-export-domid-over-16-bits", G, "DmabufExportFromRefs",
         lambda t: gntdev_pb2.DmabufExportFromRefsRequest(count=1, domid=70000, refs=[8]),
         INVALID, errno.EINVAL, "domid_t"),
    Case("dmabuf-export-ungranted-ref", G, "DmabufExportFromRefs",
         lambda t: gntdev_pb2.DmabufExportFromRefsRequest(count=1, domid=PEER, refs=[3000]),
         INVALID, errno.EINVAL, "3000"),
    Case("dmabuf-wait-unknown-id", G, "DmabufExportWaitReleased",
         lambda t: gntdev_pb2.DmabufExportWaitReleasedRequest(dmabuf_id=5), NOT_FOUND, errno.ENOENT, "no dma-buf 5"),
    Case("dmabuf-import-without-fd", G, "DmabufImportToRefs",
         lambda t: gntdev_pb2.DmabufImportToRefsRequest(fd_transfer=0, fd=FD0, count=1, domid=PEER),
         INVALID, errno.EBADF, "fd_transfer is 0"),
    Case("dmabuf-import-reserved", G, "DmabufImportToRefs",
         lambda t: gntdev_pb2.DmabufImportToRefsRequest(fd_transfer=t, fd=FD0, count=1, domid=PEER, reserved=1),
         INVALID, errno.EINVAL, "reserved is 1", send_fd=True),
    Case("dmabuf-import-count-0", G, "DmabufImportToRefs",
         lambda t: gntdev_pb2.DmabufImportToRefsRequest(fd_transfer=t, fd=FD0, count=0, domid=PEER),
         INVALID, errno.EINVAL, "count is 0", send_fd=True),
    # A client's memfd is no dma-buf (dma_buf_get: EINVAL); a wrong page count
    # of a real one is the conformance suite's test_import_with_wrong_page_count_is_einval.
    Case("dmabuf-import-of-a-memfd", G, "DmabufImportToRefs",
         lambda t: gntdev_pb2.DmabufImportToRefsRequest(fd_transfer=t, fd=FD0, count=1, domid=PEER),
         INVALID, errno.EINVAL, "not a dma-buf", send_fd=True),
    Case("dmabuf-import-release-reserved", G, "DmabufImportRelease",
         lambda t: gntdev_pb2.DmabufImportReleaseRequest(dmabuf_id=1, reserved=7), INVALID, errno.EINVAL, "reserved is 7"),
    Case("dmabuf-import-release-unknown-id", G, "DmabufImportRelease",
         lambda t: gntdev_pb2.DmabufImportReleaseRequest(dmabuf_id=3), NOT_FOUND, errno.ENOENT, "no dma-buf 3"),
    # ------------------------------------------------------------------ Gntalloc
    Case("alloc-count-0", A, "AllocGref", lambda t: gntalloc_pb2.AllocGrefRequest(domid=PEER, flags=1, count=0),
         INVALID, errno.EINVAL, "count is 0"),
    Case("alloc-domid-over-16-bits", A, "AllocGref", lambda t: gntalloc_pb2.AllocGrefRequest(domid=65536, count=1),
         INVALID, errno.EINVAL, "domid_t"),
    Case("alloc-unknown-flag", A, "AllocGref", lambda t: gntalloc_pb2.AllocGrefRequest(domid=PEER, flags=2, count=1),
         INVALID, errno.EINVAL, "flags 0x2"),
    Case("alloc-beyond-the-session-quota", A, "AllocGref",
         lambda t: gntalloc_pb2.AllocGrefRequest(domid=PEER, flags=1, count=2**32 - 1),
         grpc.StatusCode.RESOURCE_EXHAUSTED, errno.EDQUOT, "the limit is"),
    Case("dealloc-unknown-index", A, "DeallocGref", lambda t: gntalloc_pb2.DeallocGrefRequest(index=0, count=1),
         INVALID, errno.EINVAL, "no allocation starts at index 0"),
    Case("alloc-notify-unknown-action", A, "SetUnmapNotify",
         lambda t: gntalloc_pb2.GntallocUnmapNotifyRequest(index=0, action=8), INVALID, errno.EINVAL, "action 0x8"),
    Case("alloc-notify-port-not-of-this-session", A, "SetUnmapNotify",
         lambda t: gntalloc_pb2.GntallocUnmapNotifyRequest(index=0, action=UNMAP_NOTIFY_SEND_EVENT, event_channel_port=9),
         INVALID, errno.EINVAL, "port 9 is not bound by this session"),
    Case("alloc-notify-offset-in-no-allocation", A, "SetUnmapNotify",
         lambda t: gntalloc_pb2.GntallocUnmapNotifyRequest(index=0, action=UNMAP_NOTIFY_CLEAR_BYTE),
         NOT_FOUND, errno.ENOENT, "in no allocated page"),  # gntalloc_ioctl_unmap_notify answers ENOENT
    # ------------------------------------------------------------------ MemBuf
    Case("membuf-alloc-nr-acl-mismatch", M, "Alloc",
         lambda t: membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE, **acl(GOOD_ACL, nr=2)),
         INVALID, errno.EINVAL, "nr_acl_entries is 2 but 1"),
    Case("membuf-alloc-empty-acl", M, "Alloc", lambda t: membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE),
         INVALID, errno.EINVAL, "1..16 entries, got 0"),
    Case("membuf-alloc-17-acl-entries", M, "Alloc",
         lambda t: membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE, **acl(*[GOOD_ACL] * 17)),
         INVALID, errno.EINVAL, "1..16 entries, got 17"),
    Case("membuf-alloc-reserved", M, "Alloc",
         lambda t: membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE, reserved1=1, **acl(GOOD_ACL)),
         INVALID, errno.EINVAL, "reserved1 is 1"),
    Case("membuf-alloc-size-0", M, "Alloc", lambda t: membuf_pb2.MemBufAllocRequest(size=0, **acl(GOOD_ACL)),
         INVALID, errno.EINVAL, "size 0"),
    Case("membuf-alloc-size-absurd", M, "Alloc", lambda t: membuf_pb2.MemBufAllocRequest(size=2**62, **acl(GOOD_ACL)),
         INVALID, errno.EINVAL, "is not between 1 and"),
    Case("membuf-alloc-unknown-vmid", M, "Alloc", lambda t: membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE, **acl((7, RW))),
         INVALID, errno.EINVAL, "vmid 7"),
    Case("membuf-alloc-bad-perms", M, "Alloc",
         lambda t: membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE, **acl((MEM_BUF_VMID_TRUSTED_VM, 8))),
         INVALID, errno.EINVAL, "perms 0x8"),
    Case("membuf-alloc-bad-mem-type", M, "Alloc",
         lambda t: membuf_pb2.MemBufAllocRequest(size=PAGE_SIZE, src_mem_type=5, **acl(GOOD_ACL)),
         INVALID, errno.EINVAL, "src_mem_type 5"),
    Case("membuf-export-without-fd", M, "Export", lambda t: membuf_pb2.MemBufExportRequest(dma_buf_fd=FD0, **acl(GOOD_ACL)),
         INVALID, errno.EBADF, "fd_transfer is 0"),
    Case("membuf-export-reserved", M, "Export",
         lambda t: membuf_pb2.MemBufExportRequest(fd_transfer=t, dma_buf_fd=FD0, reserved2=3, **acl(GOOD_ACL)),
         INVALID, errno.EINVAL, "reserved2 is 3", send_fd=True),
    Case("membuf-export-nr-acl-mismatch", M, "Export",
         lambda t: membuf_pb2.MemBufExportRequest(fd_transfer=t, dma_buf_fd=FD0, **acl(GOOD_ACL, nr=0)),
         INVALID, errno.EINVAL, "nr_acl_entries is 0 but 1", send_fd=True),
    Case("membuf-import-unknown-handle", M, "Import",
         lambda t: membuf_pb2.MemBufImportRequest(memparcel_hdl=1234, **acl(GOOD_ACL)),
         INVALID, errno.EINVAL, "unknown or revoked"),
    Case("membuf-import-reserved", M, "Import",
         lambda t: membuf_pb2.MemBufImportRequest(memparcel_hdl=1, reserved3=1, **acl(GOOD_ACL)),
         INVALID, errno.EINVAL, "reserved3 is 1"),
    Case("membuf-import-nr-acl-mismatch", M, "Import",
         lambda t: membuf_pb2.MemBufImportRequest(memparcel_hdl=1, **acl(GOOD_ACL, nr=5)),
         INVALID, errno.EINVAL, "nr_acl_entries is 5 but 1"),
]

STUBS = {G: gntdev_pb2_grpc.GntdevStub, A: gntalloc_pb2_grpc.GntallocStub, M: membuf_pb2_grpc.MemBufStub}


@pytest.fixture
async def session(broker: InProcessBroker) -> AsyncIterator[Session]:
    async with await grant_broker_client.connect(
        broker.socket_path, domid=SELF, vmid=MEM_BUF_VMID_PRIMARY_VM, client_name="bad input"
    ) as session:
        yield session


def sealed_page() -> OwnedFd:
    fd = OwnedFd(os.memfd_create("bad-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    os.ftruncate(fd.fileno(), PAGE_SIZE)
    fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_bad_request_gets_the_precise_status_and_errno(session: Session, case: Case) -> None:
    transfer = 0
    if case.send_fd:
        with sealed_page() as fd:
            transfer = await session.send_fds([fd.fileno()])
    method = getattr(STUBS[case.service](session.grpc_channel), case.method)
    with pytest.raises(BrokerClientError) as raised:
        await session.call(method, case.request(transfer))
    error = raised.value
    assert (error.code, error.errno) == (case.code, case.errno), str(error)
    assert case.fragment in error.detail, str(error)


@pytest.mark.parametrize("case", [c for c in CASES if c.send_fd], ids=[c.id for c in CASES if c.send_fd])
async def test_refused_requests_still_consume_their_descriptors(broker: InProcessBroker, session: Session, case: Case) -> None:
    # A refused request must not leave its fd frame pending in the broker
    # (pending frames are limited, and each holds descriptors).
    method = getattr(STUBS[case.service](session.grpc_channel), case.method)
    for _ in range(broker.registry.limits.max_pending_fd_frames + 2):
        with sealed_page() as fd:
            transfer = await session.send_fds([fd.fileno()])
        with pytest.raises(BrokerClientError):
            await session.call(method, case.request(transfer))
    (state,) = broker.registry.sessions
    assert len(state.incoming) == 0


def test_every_rpc_of_the_three_services_has_a_bad_input_case() -> None:
    from grant_broker_protocol.v1 import gntalloc_pb2 as a, gntdev_pb2 as g, membuf_pb2 as m

    methods = {
        (service, method.name)
        for service, module, name in ((G, g, "Gntdev"), (A, a, "Gntalloc"), (M, m, "MemBuf"))
        for method in module.DESCRIPTOR.services_by_name[name].methods
    }
    assert methods == {(case.service, case.method) for case in CASES}


async def test_calls_without_a_session_are_permission_denied(broker: InProcessBroker) -> None:
    async with grpc.aio.insecure_channel(f"unix:{broker.socket_path}") as channel:
        for stub, call, request in (
            (gntdev_pb2_grpc.GntdevStub, "MapGrantRef", gntdev_pb2.MapGrantRefRequest(count=1, refs=[ref()])),
            (gntalloc_pb2_grpc.GntallocStub, "AllocGref", gntalloc_pb2.AllocGrefRequest(domid=PEER, count=1)),
            (membuf_pb2_grpc.MemBufStub, "Import", membuf_pb2.MemBufImportRequest(memparcel_hdl=1)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await getattr(stub(channel), call)(request)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
