"""The Xen backend without Xen: what goes into each ioctl, and what comes out.

``fcntl.ioctl`` is replaced by a recorder that keeps the bytes of every
argument (compared with the C layout written out by hand with ``struct``) and
answers as the kernel would (writing results into the argument, or raising
the errno).  The instances run on real descriptors (``/dev/null``, pipes,
socketpairs) so closing and EBADF are real too.

The last section needs the real devices (``/dev/xen/gntdev``) and skips
elsewhere; ``tests/xen/ci-suite`` runs it in dom0 of a real Xen.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from grant_broker.backend.contract import PAGE_SIZE, CopyForeign, CopyLocal, GrantCopySegment, GrantRef, GrantRefs
from grant_broker.backend.xen import XenBackend, XenDevices, XenEvtchn, XenGntalloc, XenGntdev
from grant_broker.backend.xen import backend as xen_backend
from grant_broker.backend.xen import evtchn as xen_evtchn
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd
from grant_broker.uapi import evtchn as E
from grant_broker.uapi import gntalloc as A
from grant_broker.uapi import gntdev as G
from grant_broker.uapi.grant_table import GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTST_bad_domain, GNTST_bad_gntref, GNTST_okay

SEGMENT = struct.Struct("=8s8sHHh2x")  # struct gntdev_grant_copy_segment on x86-64 / arm64
FOREIGN = struct.Struct("=IHH")  # the union's foreign member: ref, offset, domid
DOMID_SELF = 0x7FF0


# --------------------------------------------------------------------------- the fake kernel


@dataclass
class Call:
    fd: int
    request: int
    data: bytes  # the argument's bytes when the kernel saw it
    arg: object


@dataclass
class FakeKernel:
    """Records ioctls; ``answers[request]`` is called with the argument and may
    write into it, return the ioctl's value, or raise OSError."""

    calls: list[Call] = field(default_factory=list)
    answers: dict[int, Callable[[object], int | None]] = field(default_factory=dict)

    def ioctl(self, fd: int, request: int, arg: object = 0, mutate: bool = True) -> int:
        data = b"" if isinstance(arg, int) else bytes(arg)  # type: ignore[call-overload]
        self.calls.append(Call(fd, request, data, arg))
        answer = self.answers.get(request)
        result = answer(arg) if answer is not None else 0
        return 0 if result is None else result

    def requests(self) -> list[int]:
        return [call.request for call in self.calls]


def fails(code: int) -> Callable[[object], int]:
    def answer(arg: object) -> int:
        raise OSError(code, os.strerror(code))

    return answer


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    return fake


def null_fd() -> OwnedFd:
    return OwnedFd(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))


@pytest.fixture
def gntdev(fd_baseline: None) -> Iterator[XenGntdev]:
    with XenGntdev(os.devnull, fd=null_fd()) as instance:
        yield instance


@pytest.fixture
def gntalloc(fd_baseline: None) -> Iterator[XenGntalloc]:
    with XenGntalloc(os.devnull, fd=null_fd()) as instance:
        yield instance


@pytest.fixture
def evtchn_pair(fd_baseline: None) -> Iterator[tuple[XenEvtchn, socket.socket]]:
    """A handle over one end of a socketpair; the test plays the kernel on the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with XenEvtchn(os.devnull, fd=OwnedFd(ours.detach())) as handle, theirs:
        yield handle, theirs


# --------------------------------------------------------------------------- gntdev: encoding


def test_map_grant_refs_passes_the_flexible_struct_and_returns_the_index(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    def answer(arg: object) -> None:
        arg.index = 3 * PAGE_SIZE  # type: ignore[attr-defined]

    kernel.answers[G.IOCTL_GNTDEV_MAP_GRANT_REF] = answer
    index = gntdev.map_grant_refs([GrantRef(1, 8), GrantRef(2, 9)])
    assert index == 3 * PAGE_SIZE
    (call,) = kernel.calls
    assert call.fd == gntdev.fileno()
    assert call.request == G.IOCTL_GNTDEV_MAP_GRANT_REF
    # struct ioctl_gntdev_map_grant_ref { u32 count; u32 pad; u64 index; struct { u32 domid, ref; } refs[count]; }
    assert call.data == struct.pack("=IIQ4I", 2, 0, 0, 1, 8, 2, 9)


def test_packed_grant_refs_fill_the_same_struct(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    # The broker passes GrantRefs (one domid for all, or one each): the refs array is filled from them at once.
    gntdev.map_grant_refs(GrantRefs(7, [8, 9, 10]))
    gntdev.map_grant_refs(GrantRefs([1, 2], [8, 9]))
    first, second = kernel.calls
    assert first.data == struct.pack("=IIQ6I", 3, 0, 0, 7, 8, 7, 9, 7, 10)
    assert second.data == struct.pack("=IIQ4I", 2, 0, 0, 1, 8, 2, 9)


def test_unmap_grant_ref_encoding(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    gntdev.unmap_grant_ref(5 * PAGE_SIZE, 3)
    (call,) = kernel.calls
    assert call.request == G.IOCTL_GNTDEV_UNMAP_GRANT_REF
    assert call.data == struct.pack("=QII", 5 * PAGE_SIZE, 3, 0)


def test_unmap_notify_encoding(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    kernel.answers[G.IOCTL_GNTDEV_MAP_GRANT_REF] = lambda arg: None  # index 0
    gntdev.map_grant_refs([GrantRef(1, 8)])
    gntdev.set_unmap_notify(123, G.UNMAP_NOTIFY_CLEAR_BYTE | G.UNMAP_NOTIFY_SEND_EVENT, 7)
    call = kernel.calls[-1]
    assert call.request == G.IOCTL_GNTDEV_SET_UNMAP_NOTIFY
    assert call.data == struct.pack("=QII", 123, 3, 7)


def test_set_max_grants_enotty_reaches_the_caller(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    kernel.answers[G.IOCTL_GNTDEV_SET_MAX_GRANTS] = fails(errno.ENOTTY)
    with pytest.raises(BrokerError) as caught:
        gntdev.set_max_grants(16)
    assert caught.value.errno == errno.ENOTTY
    assert caught.value.operation == "gntdev set max grants"
    assert kernel.calls[0].data == struct.pack("=I", 16)


def test_kernel_einval_becomes_a_broker_error_naming_the_refs(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    kernel.answers[G.IOCTL_GNTDEV_MAP_GRANT_REF] = fails(errno.EINVAL)
    with pytest.raises(BrokerError) as caught:
        gntdev.map_grant_refs([GrantRef(3, 17)])
    assert caught.value.errno == errno.EINVAL
    assert caught.value.operation == "gntdev map grant refs"
    assert "ref 17 of domain 3" in caught.value.detail


def test_refused_before_any_ioctl(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: gntdev.map_grant_refs([]), errno.EINVAL),
        (lambda: gntdev.map_grant_refs([GrantRef(1 << 32, 8)]), errno.EINVAL),
        (lambda: gntdev.unmap_grant_ref(-PAGE_SIZE, 1), errno.ENOENT),
        (lambda: gntdev.map_memory(PAGE_SIZE + 1, 1, writable=True), errno.EINVAL),
        (lambda: gntdev.map_memory(0, 1, writable=True), errno.EINVAL),  # no such mapping (the broker's record)
        (lambda: gntdev.set_unmap_notify(0, 0x4, 0), errno.EINVAL),
        (lambda: gntdev.set_max_grants(-1), errno.EINVAL),
        (lambda: gntdev.get_offset_for_vaddr(ctypes.addressof(ctypes.create_string_buffer(8))), errno.EINVAL),
    ]
    for call, code in cases:
        with pytest.raises(BrokerError) as caught:
            call()
        assert caught.value.errno == code
    assert kernel.calls == []


def test_closed_instance_is_ebadf_without_an_ioctl(kernel: FakeKernel, fd_baseline: None) -> None:
    instance = XenGntdev(os.devnull, fd=null_fd())
    instance.close()
    instance.close()
    with pytest.raises(BrokerError) as caught:
        instance.map_grant_refs([GrantRef(0, 8)])
    assert caught.value.errno == errno.EBADF
    assert kernel.calls == []


# --------------------------------------------------------------------------- gntdev: grant copy


def _segments_seen(call: Call) -> list[tuple[bytes, bytes, int, int, int]]:
    """The segment array the ioctl's pointer refers to (read while the kernel "runs")."""
    count, pointer = struct.unpack("=I4xQ", call.data)
    raw = ctypes.string_at(pointer, count * SEGMENT.size)
    return [SEGMENT.unpack_from(raw, i * SEGMENT.size) for i in range(count)]


def test_grant_copy_builds_the_segment_array(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    destination = bytearray(16)
    source = b"..hello.."
    seen: list[list[tuple[bytes, bytes, int, int, int]]] = []

    def answer(arg: object) -> None:
        segments = _segments_seen(kernel.calls[-1])
        seen.append(segments)
        # Play Xen: copy "hello" into the local destination, refuse the second segment.
        (dest_address,) = struct.unpack("=Q", segments[0][1])
        ctypes.memmove(dest_address, b"HELLO", 5)
        array = ctypes.cast(arg.segments, ctypes.POINTER(G.gntdev_grant_copy_segment))  # type: ignore[attr-defined]
        array[1].status = GNTST_bad_gntref

    kernel.answers[G.IOCTL_GNTDEV_GRANT_COPY] = answer
    statuses = gntdev.grant_copy([
        GrantCopySegment(CopyForeign(ref=8, offset=100, domid=2), CopyLocal(memoryview(destination), 3), 5),
        GrantCopySegment(CopyLocal(memoryview(source), 2), CopyForeign(ref=9, offset=0, domid=DOMID_SELF), 5),
    ])
    assert statuses == [GNTST_okay, GNTST_bad_gntref]
    assert bytes(destination[3:8]) == b"HELLO"  # the kernel wrote into the caller's own buffer
    (call,) = kernel.calls
    assert call.request == G.IOCTL_GNTDEV_GRANT_COPY
    (first, second) = seen[0]
    assert first[0] == FOREIGN.pack(8, 100, 2)
    assert (first[2], first[3], first[4]) == (5, GNTCOPY_source_gref, 0)
    assert second[1] == FOREIGN.pack(9, 0, DOMID_SELF)
    assert (second[2], second[3]) == (5, GNTCOPY_dest_gref)
    # A read-only source is handed to the kernel as a private copy of the range.
    (source_address,) = struct.unpack("=Q", second[0])
    assert source_address != 0


def test_grant_copy_of_a_batch_sends_what_its_segments_send(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    # A copy ring's doorbell reaches the backend as a GrantCopyBatch (columns,
    # one local buffer): the Xen backend copies it as the list of its segments.
    from grant_broker.backend.contract import GrantCopyBatch

    buffer = bytearray(3 * 4096)
    seen: list[list[tuple[bytes, bytes, int, int, int]]] = []

    def answer(arg: object) -> None:
        seen.append(_segments_seen(kernel.calls[-1]))
        array = ctypes.cast(arg.segments, ctypes.POINTER(G.gntdev_grant_copy_segment))  # type: ignore[attr-defined]
        array[1].status = GNTST_bad_gntref

    kernel.answers[G.IOCTL_GNTDEV_GRANT_COPY] = answer
    view = memoryview(buffer)
    batch = GrantCopyBatch(view, [GNTCOPY_source_gref, GNTCOPY_source_gref, GNTCOPY_dest_gref], [8, 9, 4096], [0, 4096, 10],
                           [2, 2, 0], [0, 0, 3], [0, 100, 0], [0, 0, 7], [4096, 50, 5])
    assert gntdev.grant_copy(batch) == [GNTST_okay, GNTST_bad_gntref, GNTST_okay]
    assert gntdev.grant_copy(list(batch)) == [GNTST_okay, GNTST_bad_gntref, GNTST_okay]
    from_batch, from_list = seen
    assert from_batch == from_list
    assert from_batch[0][0] == FOREIGN.pack(8, 0, 2) and from_batch[1][0] == FOREIGN.pack(9, 100, 2)
    assert from_batch[2][1] == FOREIGN.pack(10, 7, 3) and (from_batch[2][2], from_batch[2][3]) == (5, GNTCOPY_dest_gref)
    base = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    assert struct.unpack("=Q", from_batch[0][1]) == (base,) and struct.unpack("=Q", from_batch[2][0]) == (base + 4096,)


def test_grant_copy_source_address_points_at_the_bytes(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    read: list[bytes] = []

    def answer(arg: object) -> None:
        segments = _segments_seen(kernel.calls[-1])
        for segment in segments:
            (address,) = struct.unpack("=Q", segment[0])
            read.append(ctypes.string_at(address, segment[2]))

    kernel.answers[G.IOCTL_GNTDEV_GRANT_COPY] = answer
    writable = bytearray(b"0123456789")
    gntdev.grant_copy([
        GrantCopySegment(CopyLocal(memoryview(b"abcdef"), 1), CopyForeign(8, 0, 1), 4),
        GrantCopySegment(CopyLocal(memoryview(writable), 6), CopyForeign(8, 0, 1), 3),
    ])
    assert read == [b"bcde", b"678"]


def test_grant_copy_releases_the_buffers_it_pinned(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    buffer = bytearray(8)
    view = memoryview(buffer)
    gntdev.grant_copy([GrantCopySegment(CopyForeign(8, 0, 1), CopyLocal(view), 8)])
    view.release()  # BufferError if an export were still held
    buffer.extend(b"resizable again")


@pytest.mark.parametrize(
    ("segment", "code"),
    [
        (GrantCopySegment(CopyLocal(memoryview(b"ab")), CopyLocal(memoryview(bytearray(2))), 2), errno.EINVAL),
        (GrantCopySegment(CopyForeign(8, PAGE_SIZE - 2, 1), CopyLocal(memoryview(bytearray(8))), 4), errno.EINVAL),
        (GrantCopySegment(CopyForeign(8, 0, 1), CopyLocal(memoryview(bytearray(8)), 6), 4), errno.EINVAL),
        (GrantCopySegment(CopyForeign(8, 0, 1), CopyLocal(memoryview(bytearray(8)), -1), 4), errno.EINVAL),
        (GrantCopySegment(CopyForeign(8, 0, 1), CopyLocal(memoryview(bytearray(1 << 17))), 1 << 16), errno.EINVAL),
        (GrantCopySegment(CopyForeign(1 << 32, 0, 1), CopyLocal(memoryview(bytearray(8))), 4), errno.EINVAL),
        (GrantCopySegment(CopyForeign(8, 0, 1), CopyLocal(memoryview(b"read-only")), 4), errno.EFAULT),
    ],
    ids=["both-local", "crosses-page", "beyond-buffer", "negative-offset", "length-16-bits", "ref-32-bits", "read-only-dest"],
)
def test_malformed_segment_refused_before_anything_is_copied(
    kernel: FakeKernel, gntdev: XenGntdev, segment: GrantCopySegment, code: int
) -> None:
    good = GrantCopySegment(CopyForeign(8, 0, 1), CopyLocal(memoryview(bytearray(4))), 4)
    with pytest.raises(BrokerError) as caught:
        gntdev.grant_copy([good, segment])
    assert caught.value.errno == code
    assert "segment 1" in caught.value.detail
    assert kernel.calls == []


def test_grant_copy_of_a_domain_beyond_domid_t_is_bad_domain_unsent(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    statuses = gntdev.grant_copy([
        GrantCopySegment(CopyForeign(8, 0, 0x1_0000), CopyLocal(memoryview(bytearray(4))), 4),
        GrantCopySegment(CopyForeign(8, 0, 0), CopyLocal(memoryview(bytearray(4))), 4),
    ])
    assert statuses == [GNTST_bad_domain, GNTST_okay]
    (call,) = kernel.calls
    assert struct.unpack_from("=I", call.data) == (1,)  # only the sendable segment reached the kernel


def test_grant_copy_of_nothing_issues_no_ioctl(kernel: FakeKernel, gntdev: XenGntdev) -> None:
    assert gntdev.grant_copy([]) == []
    assert kernel.calls == []


# --------------------------------------------------------------------------- gntalloc


def test_alloc_gref_encoding_and_result(kernel: FakeKernel, gntalloc: XenGntalloc) -> None:
    def answer(arg: object) -> None:
        arg.index = 2 * PAGE_SIZE  # type: ignore[attr-defined]
        arg.gref_ids[0], arg.gref_ids[1] = 20, 21  # type: ignore[attr-defined]

    kernel.answers[A.IOCTL_GNTALLOC_ALLOC_GREF] = answer
    allocation = gntalloc.alloc_gref(5, 2, writable=False)
    assert (allocation.index, allocation.domid, allocation.writable, allocation.refs) == (2 * PAGE_SIZE, 5, False, (20, 21))
    (call,) = kernel.calls
    assert call.request == A.IOCTL_GNTALLOC_ALLOC_GREF
    # struct ioctl_gntalloc_alloc_gref { u16 domid; u16 flags; u32 count; u64 index; u32 gref_ids[count]; }
    assert call.data == struct.pack("=HHIQ2I", 5, 0, 2, 0, 0, 0)


def test_alloc_gref_writable_flag(kernel: FakeKernel, gntalloc: XenGntalloc) -> None:
    gntalloc.alloc_gref(0, 1)
    assert kernel.calls[0].data[:8] == struct.pack("=HHI", 0, A.GNTALLOC_FLAG_WRITABLE, 1)


def test_alloc_of_zero_pages_is_einval_although_linux_accepts_it(kernel: FakeKernel, gntalloc: XenGntalloc) -> None:
    with pytest.raises(BrokerError) as caught:
        gntalloc.alloc_gref(0, 0)
    assert caught.value.errno == errno.EINVAL
    assert kernel.calls == []


def test_alloc_for_a_domain_beyond_domid_t_is_einval(kernel: FakeKernel, gntalloc: XenGntalloc) -> None:
    with pytest.raises(BrokerError) as caught:
        gntalloc.alloc_gref(0x1_0000, 1)  # ctypes would store it as domain 0
    assert caught.value.errno == errno.EINVAL
    assert kernel.calls == []


def test_dealloc_and_notify_encoding(kernel: FakeKernel, gntalloc: XenGntalloc) -> None:
    gntalloc.dealloc_gref(PAGE_SIZE, 2)
    gntalloc.set_unmap_notify(PAGE_SIZE + 9, A.UNMAP_NOTIFY_SEND_EVENT, 11)
    assert [(c.request, c.data) for c in kernel.calls] == [
        (A.IOCTL_GNTALLOC_DEALLOC_GREF, struct.pack("=QI4x", PAGE_SIZE, 2)),
        (A.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, struct.pack("=QII", PAGE_SIZE + 9, A.UNMAP_NOTIFY_SEND_EVENT, 11)),
    ]


def test_memory_spans_of_missing_pages_is_enoent(kernel: FakeKernel, gntalloc: XenGntalloc) -> None:
    with pytest.raises(BrokerError) as caught:
        gntalloc.memory_spans(PAGE_SIZE + 1, 1)  # not a page offset: no ioctl, no mmap
    assert caught.value.errno == errno.ENOENT


# --------------------------------------------------------------------------- evtchn


def test_bind_interdomain_encoding_and_port_from_the_return_value(kernel: FakeKernel, evtchn_pair) -> None:
    handle, _ = evtchn_pair
    kernel.answers[E.IOCTL_EVTCHN_BIND_INTERDOMAIN] = lambda arg: 42
    assert handle.bind_interdomain(3, 17) == 42
    (call,) = kernel.calls
    assert (call.request, call.data) == (E.IOCTL_EVTCHN_BIND_INTERDOMAIN, struct.pack("=II", 3, 17))


def test_domains_beyond_domid_t_are_refused_not_truncated(kernel: FakeKernel, evtchn_pair) -> None:
    handle, _ = evtchn_pair
    for call in (lambda: handle.bind_unbound_port(0x1_0000), lambda: handle.bind_interdomain(0x1_0000, 1),
                 lambda: handle.restrict_domid(0x1_0000), lambda: handle.restrict_domid(0)):
        with pytest.raises(BrokerError) as caught:
            call()
        assert caught.value.errno == errno.EINVAL
    assert kernel.calls == []


def test_errnos_of_the_evtchn_ioctls_reach_the_caller(kernel: FakeKernel, evtchn_pair) -> None:
    handle, _ = evtchn_pair
    kernel.answers[E.IOCTL_EVTCHN_UNBIND] = fails(errno.ENOTCONN)
    kernel.answers[E.IOCTL_EVTCHN_BIND_INTERDOMAIN] = fails(errno.ESRCH)
    with pytest.raises(BrokerError) as unbind:
        handle.unbind(5)
    with pytest.raises(BrokerError) as bind:
        handle.bind_interdomain(9, 1)
    assert (unbind.value.errno, unbind.value.operation) == (errno.ENOTCONN, "evtchn unbind")
    assert (bind.value.errno, "domain 9" in bind.value.detail) == (errno.ESRCH, True)


def test_restrict_twice_is_eacces(kernel: FakeKernel, evtchn_pair) -> None:
    handle, _ = evtchn_pair
    handle.restrict_domid(7)
    with pytest.raises(BrokerError) as caught:
        handle.restrict_domid(7)
    assert caught.value.errno == errno.EACCES
    assert [c.data for c in kernel.calls] == [struct.pack("=H", 7)]


def test_reset_passes_no_argument(kernel: FakeKernel, evtchn_pair) -> None:
    handle, _ = evtchn_pair
    handle.reset()
    (call,) = kernel.calls
    assert (call.request, call.arg) == (E.IOCTL_EVTCHN_RESET, 0)


def test_read_pending_parses_native_ports_without_blocking(evtchn_pair) -> None:
    handle, kernel_side = evtchn_pair
    assert handle.read_pending() == []  # EAGAIN: nothing fired
    kernel_side.sendall(struct.pack("=3I", 5, 6, 7))
    assert handle.read_pending(2) == [5, 6]
    assert handle.read_pending() == [7]
    assert handle.read_pending(0) == []


def test_unmask_writes_the_port(evtchn_pair) -> None:
    handle, kernel_side = evtchn_pair
    handle.unmask(9)
    assert kernel_side.recv(16) == struct.pack("=I", 9)


def test_read_of_an_overflowed_ring_is_efbig(monkeypatch: pytest.MonkeyPatch, evtchn_pair) -> None:
    handle, _ = evtchn_pair

    def overflowed(fd: int, count: int) -> bytes:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(xen_evtchn.os, "read", overflowed)
    with pytest.raises(BrokerError) as caught:
        handle.read_pending()
    assert caught.value.errno == errno.EFBIG


# --------------------------------------------------------------------------- domain id and capabilities


def _devices(tmp_path, *, control_d: bool, guest_type: str = "PV") -> XenDevices:
    caps = tmp_path / "capabilities"
    caps.write_text("control_d\n" if control_d else "\n")
    guest = tmp_path / "guest_type"
    guest.write_text(guest_type + "\n")
    return XenDevices(gntdev=os.devnull, gntalloc=os.devnull, evtchn=os.devnull,
                      membuf=str(tmp_path / "no-membuf"), xen_capabilities=str(caps), guest_type=str(guest))


def _domain(kernel: FakeKernel, own: int) -> None:
    """Xen's evtchn rule: a port offered to *own* binds from DOMID_SELF, others are EINVAL."""
    offered: dict[int, int] = {}

    def unbound(arg: object) -> int:
        port = 10 + len(offered)
        offered[port] = arg.remote_domain  # type: ignore[attr-defined]
        return port

    def interdomain(arg: object) -> int:
        assert arg.remote_domain == DOMID_SELF  # type: ignore[attr-defined]
        if offered[arg.remote_port] != own:  # type: ignore[attr-defined]
            raise OSError(errno.EINVAL, "not for us")
        return 99

    kernel.answers[E.IOCTL_EVTCHN_BIND_UNBOUND_PORT] = unbound
    kernel.answers[E.IOCTL_EVTCHN_BIND_INTERDOMAIN] = interdomain


def test_domid_of_the_initial_domain_is_verified(kernel: FakeKernel, tmp_path, fd_baseline: None) -> None:
    _domain(kernel, own=0)
    found = xen_backend.discover_domid(_devices(tmp_path, control_d=True))
    assert found.domid == 0 and "control_d" in found.how
    offered = [c for c in kernel.calls if c.request == E.IOCTL_EVTCHN_BIND_UNBOUND_PORT]
    assert len(offered) == 1
    unbinds = [c for c in kernel.calls if c.request == E.IOCTL_EVTCHN_UNBIND]
    assert len(unbinds) == 2  # nothing stays bound


@pytest.mark.parametrize("own", [0, 5])
def test_domid_without_control_d_is_found_by_the_loopback_test(kernel: FakeKernel, tmp_path, fd_baseline: None, own: int) -> None:
    _domain(kernel, own=own)
    found = xen_backend.discover_domid(_devices(tmp_path, control_d=False))
    assert found.domid == own
    offered = [c for c in kernel.calls if c.request == E.IOCTL_EVTCHN_BIND_UNBOUND_PORT]
    assert [struct.unpack("=I", c.data)[0] for c in offered] == list(range(own + 1))  # tried upwards from 0


def test_no_domid_found_is_esrch(kernel: FakeKernel, tmp_path, fd_baseline: None) -> None:
    _domain(kernel, own=100)
    with pytest.raises(BrokerError) as caught:
        xen_backend.discover_domid(_devices(tmp_path, control_d=False), scan_limit=20)
    assert caught.value.errno == errno.ESRCH


def test_capabilities_probed_from_the_kernels_answers(kernel: FakeKernel, tmp_path, fd_baseline: None) -> None:
    kernel.answers[G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED] = fails(errno.ENOTTY)
    kernel.answers[G.IOCTL_GNTDEV_SET_MAX_GRANTS] = fails(errno.ENOTTY)
    caps = xen_backend.probe_capabilities(_devices(tmp_path, control_d=True))
    assert (caps.backend, caps.dmabuf, caps.set_max_grants, caps.grant_copy) == ("xen", False, False, True)
    assert (caps.gntalloc, caps.evtchn, caps.membuf_abi, caps.any_domain) == (True, True, None, False)
    assert any("ENOTTY" in note for note in caps.notes)


def test_capabilities_when_the_ioctls_exist(kernel: FakeKernel, tmp_path, fd_baseline: None) -> None:
    kernel.answers[G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED] = fails(errno.ENOENT)  # no such export: supported
    caps = xen_backend.probe_capabilities(_devices(tmp_path, control_d=True))
    assert (caps.dmabuf, caps.set_max_grants, caps.grant_copy) == (True, True, True)
    wait = next(c for c in kernel.calls if c.request == G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED)
    assert wait.data == struct.pack("=II", 0xFFFF_FFFF, 0)


def test_dmabuf_without_kernel_support_is_unavailable_both_ways_with_the_reason(
    kernel: FakeKernel, tmp_path, fd_baseline: None
) -> None:
    kernel.answers[G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED] = fails(errno.ENOTTY)
    caps = xen_backend.probe_capabilities(_devices(tmp_path, control_d=True, guest_type="PVH"))
    assert (caps.dmabuf, caps.dmabuf_export, caps.dmabuf_import) == (False, False, False)
    assert caps.dmabuf_export_missing == caps.dmabuf_import_missing == xen_backend.DMABUF_NO_KERNEL_SUPPORT
    assert "CONFIG_XEN_GNTDEV_DMABUF" in caps.dmabuf_export_missing
    assert f"dma-buf export and import unavailable: {xen_backend.DMABUF_NO_KERNEL_SUPPORT}" in caps.notes


def test_dmabuf_in_a_pv_domain_imports_but_refuses_export_with_the_reason(
    kernel: FakeKernel, tmp_path, fd_baseline: None
) -> None:
    kernel.answers[G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED] = fails(errno.ENOENT)
    caps = xen_backend.probe_capabilities(_devices(tmp_path, control_d=True, guest_type="PV"))
    assert (caps.dmabuf, caps.dmabuf_export, caps.dmabuf_import) == (True, False, True)
    assert caps.dmabuf_export_missing == xen_backend.DMABUF_EXPORT_REFUSED_IN_PV
    assert caps.dmabuf_import_missing == ""
    assert f"dma-buf export unavailable: {xen_backend.DMABUF_EXPORT_REFUSED_IN_PV}" in caps.notes


@pytest.mark.parametrize("guest_type", ["PVH", "HVM"])
def test_dmabuf_in_an_auto_translated_domain_works_both_ways(
    kernel: FakeKernel, tmp_path, fd_baseline: None, guest_type: str
) -> None:
    kernel.answers[G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED] = fails(errno.ENOENT)
    caps = xen_backend.probe_capabilities(_devices(tmp_path, control_d=False, guest_type=guest_type))
    assert (caps.dmabuf_export, caps.dmabuf_import) == (True, True)
    assert (caps.dmabuf_export_missing, caps.dmabuf_import_missing) == ("", "")
    assert not any("dma-buf" in note for note in caps.notes)


def test_old_kernel_without_grant_copy(kernel: FakeKernel, tmp_path, fd_baseline: None) -> None:
    kernel.answers[G.IOCTL_GNTDEV_GRANT_COPY] = fails(errno.ENOTTY)
    assert xen_backend.probe_capabilities(_devices(tmp_path, control_d=True)).grant_copy is False


def test_backend_without_devices_is_enodev(tmp_path) -> None:
    with pytest.raises(BrokerError) as caught:
        XenBackend.open(XenDevices(gntdev=str(tmp_path / "gntdev")))
    assert caught.value.errno == errno.ENODEV


def test_backend_without_membuf_refuses_open_membuf(kernel: FakeKernel, tmp_path, fd_baseline: None) -> None:
    devices = _devices(tmp_path, control_d=True)
    backend = XenBackend(domid=xen_backend.DomainId(0, "test"), capabilities=xen_backend.probe_capabilities(devices),
                         devices=devices)
    with backend:
        assert (backend.name, backend.vmid) == ("xen", 0)
        with pytest.raises(BrokerError) as caught:
            backend.open_membuf()
        assert caught.value.errno == errno.ENODEV
        gntdev = backend.open_gntdev()
    assert gntdev.closed  # closed with the backend


# --------------------------------------------------------------------------- on a real Xen (dom0)

real_xen = pytest.mark.skipif(not os.path.exists(G.DEVICE_PATH), reason="needs a real Xen: no /dev/xen/gntdev here")


@pytest.fixture
def real(fd_baseline: None) -> Iterator[XenBackend]:
    with XenBackend.open() as backend:
        yield backend


@pytest.mark.xen
@real_xen
def test_real_domid_agrees_with_the_scan(real: XenBackend) -> None:
    scanned = xen_backend.discover_domid(XenDevices(xen_capabilities="/nonexistent"))
    assert scanned.domid == real.domid
    with open("/proc/xen/capabilities") as caps:
        if "control_d" in caps.read():
            assert real.domid == 0


@pytest.mark.xen
@real_xen
def test_real_capabilities_match_direct_ioctls(real: XenBackend) -> None:
    fd = os.open(G.DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, G.IOCTL_GNTDEV_SET_MAX_GRANTS, G.ioctl_gntdev_set_max_grants(count=1))
            has_max = True
        except OSError as exc:
            has_max = exc.errno != errno.ENOTTY
    finally:
        os.close(fd)
    assert real.capabilities.set_max_grants == has_max
    assert real.capabilities.any_domain is False


def _flags(fd: OwnedFd) -> int:
    return fcntl.fcntl(fd.fileno(), fcntl.F_GETFL) & os.O_ACCMODE


@pytest.mark.xen
@real_xen
def test_real_spans_are_fresh_instances(real: XenBackend) -> None:
    with real.open_gntalloc() as gntalloc, real.open_gntdev() as gntdev:
        allocation = gntalloc.alloc_gref(real.domid, 2)
        index = gntdev.map_grant_refs([GrantRef(real.domid, ref) for ref in allocation.refs])
        read_only = gntdev.map_memory(index, 2, writable=False)
        writable_refs = gntdev.map_grant_refs([GrantRef(real.domid, allocation.refs[0])])
        writable = gntdev.map_memory(writable_refs, 1, writable=True)
        try:
            (ro,), (rw,) = read_only, writable
            assert (ro.offset, ro.length, ro.writable, _flags(ro.fd)) == (0, 2 * PAGE_SIZE, False, os.O_RDONLY)
            assert (rw.offset, rw.writable, _flags(rw.fd)) == (0, True, os.O_RDWR)
            with pytest.raises(PermissionError):  # EACCES: an O_RDONLY file cannot be mapped shared-writable
                mmap.mmap(ro.fd.fileno(), ro.length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # The documented consequence: the holder of a span can map other grants on it.
            extra = G.map_grant_ref_for(1, [(real.domid, allocation.refs[1])])
            fcntl.ioctl(rw.fd.fileno(), G.IOCTL_GNTDEV_MAP_GRANT_REF, extra)
            assert extra.index == PAGE_SIZE
        finally:
            for span in read_only + writable:
                span.close()
        gntdev.unmap_grant_ref(writable_refs, 1)
        gntdev.unmap_grant_ref(index, 2)


@pytest.mark.xen
@real_xen
def test_real_span_is_unmappable_after_unmap_grant_ref(real: XenBackend) -> None:
    with real.open_gntalloc() as gntalloc, real.open_gntdev() as gntdev:
        allocation = gntalloc.alloc_gref(real.domid, 1)
        index = gntdev.map_grant_refs([GrantRef(real.domid, allocation.refs[0])])
        (span,) = gntdev.map_memory(index, 1, writable=True)
        with span.fd:
            gntdev.unmap_grant_ref(index, 1)
            with pytest.raises(OSError) as caught:  # the broker dropped the fresh instance's mapping too
                mmap.mmap(span.fd.fileno(), PAGE_SIZE, mmap.MAP_SHARED)
            assert caught.value.errno == errno.EINVAL


def test_the_capabilities_message_carries_each_dma_buf_direction_and_why_not(
    kernel: FakeKernel, tmp_path, fd_baseline: None
) -> None:
    from grant_broker.core.operations.broker import capabilities_message

    kernel.answers[G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED] = fails(errno.ENOENT)
    message = capabilities_message(xen_backend.probe_capabilities(_devices(tmp_path, control_d=True, guest_type="PV")))
    assert (message.dmabuf, message.dmabuf_export, message.dmabuf_import) == (True, False, True)
    assert (message.dmabuf_export_missing, message.dmabuf_import_missing) == (xen_backend.DMABUF_EXPORT_REFUSED_IN_PV, "")


def test_dmabuf_export_where_the_guest_type_is_unknown_is_reported_available(
    kernel: FakeKernel, tmp_path, fd_baseline: None
) -> None:
    # Linux publishes /sys/hypervisor/guest_type on every Xen guest it supports; without it the
    # broker cannot know, and lets the kernel answer each export (EINVAL in a PV domain).
    kernel.answers[G.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED] = fails(errno.ENOENT)
    devices = dataclasses.replace(_devices(tmp_path, control_d=True), guest_type=str(tmp_path / "no-guest-type"))
    caps = xen_backend.probe_capabilities(devices)
    assert (caps.dmabuf_export, caps.dmabuf_import) == (True, True)
