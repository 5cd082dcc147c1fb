#!/usr/bin/env python3
"""Smoke test for the real Xen devices, meant to run in dom0:

    tests/xen/run-in-dom0 -- python3 tests/xen/smoke_dom0.py

Standalone (stdlib only).  With /dev/xen/gntalloc it grants one page of its
own to domid 0, writes a pattern into it, maps that grant back through
/dev/xen/gntdev and checks the pattern (both ways); then it checks that an
event channel notification crosses two /dev/xen/evtchn handles.  Prints OK and
exits 0 on success; any failure raises (exit status 1).

The ioctl numbers are computed here with the kernel's _IOC formula from the
ctypes mirror of each uapi struct (include/uapi/xen/{gntalloc,gntdev,evtchn}.h).
"""

import ctypes
import fcntl
import mmap
import os
import select
import struct
import sys

PAGE = mmap.PAGESIZE

# asm-generic/ioctl.h
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE = 0


def _IOC(direction, typ, nr, size):
    return ((direction << _IOC_DIRSHIFT) | (ord(typ) << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


# --- include/uapi/xen/gntalloc.h ---------------------------------------------
class GntallocAllocGref(ctypes.Structure):
    _fields_ = [("domid", ctypes.c_uint16),
                ("flags", ctypes.c_uint16),
                ("count", ctypes.c_uint32),
                ("index", ctypes.c_uint64),            # out
                ("gref_ids", ctypes.c_uint32 * 1)]     # out, flexible in C


class GntallocDeallocGref(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint64),
                ("count", ctypes.c_uint32)]


GNTALLOC_FLAG_WRITABLE = 1
IOCTL_GNTALLOC_ALLOC_GREF = _IOC(_IOC_NONE, "G", 5, ctypes.sizeof(GntallocAllocGref))
IOCTL_GNTALLOC_DEALLOC_GREF = _IOC(_IOC_NONE, "G", 6, ctypes.sizeof(GntallocDeallocGref))


# --- include/uapi/xen/gntdev.h -----------------------------------------------
class GntdevGrantRef(ctypes.Structure):
    _fields_ = [("domid", ctypes.c_uint32),
                ("ref", ctypes.c_uint32)]


class GntdevMapGrantRef(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32),
                ("pad", ctypes.c_uint32),
                ("index", ctypes.c_uint64),            # out
                ("refs", GntdevGrantRef * 1)]          # flexible in C


class GntdevUnmapGrantRef(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint64),
                ("count", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


IOCTL_GNTDEV_MAP_GRANT_REF = _IOC(_IOC_NONE, "G", 0, ctypes.sizeof(GntdevMapGrantRef))
IOCTL_GNTDEV_UNMAP_GRANT_REF = _IOC(_IOC_NONE, "G", 1, ctypes.sizeof(GntdevUnmapGrantRef))


# --- include/uapi/xen/evtchn.h -----------------------------------------------
class EvtchnBindInterdomain(ctypes.Structure):
    _fields_ = [("remote_domain", ctypes.c_uint32),
                ("remote_port", ctypes.c_uint32)]


class EvtchnBindUnboundPort(ctypes.Structure):
    _fields_ = [("remote_domain", ctypes.c_uint32)]


class EvtchnNotify(ctypes.Structure):
    _fields_ = [("port", ctypes.c_uint32)]


IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(_IOC_NONE, "E", 1, ctypes.sizeof(EvtchnBindInterdomain))
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(_IOC_NONE, "E", 2, ctypes.sizeof(EvtchnBindUnboundPort))
IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, "E", 4, ctypes.sizeof(EvtchnNotify))

DOMID_SELF_AS_PEER = 0   # dom0 grants to, and binds with, itself


def ioctl(fd, request, struct_obj):
    """ioctl with a ctypes struct as in/out buffer; returns the C result."""
    buf = bytearray(bytes(struct_obj))
    ret = fcntl.ioctl(fd, request, buf, True)
    ctypes.memmove(ctypes.addressof(struct_obj), bytes(buf), len(buf))
    return ret


def check_grants():
    assert ctypes.sizeof(GntallocAllocGref) == 24, ctypes.sizeof(GntallocAllocGref)
    assert ctypes.sizeof(GntdevMapGrantRef) == 24, ctypes.sizeof(GntdevMapGrantRef)

    alloc_fd = os.open("/dev/xen/gntalloc", os.O_RDWR | os.O_CLOEXEC)
    dev_fd = os.open("/dev/xen/gntdev", os.O_RDWR | os.O_CLOEXEC)
    try:
        # 1. grant one page of ours to domid 0
        req = GntallocAllocGref(domid=DOMID_SELF_AS_PEER, flags=GNTALLOC_FLAG_WRITABLE, count=1)
        ioctl(alloc_fd, IOCTL_GNTALLOC_ALLOC_GREF, req)
        gref, alloc_index = req.gref_ids[0], req.index
        print(f"gntalloc: gref {gref} at offset {alloc_index:#x}")

        src = mmap.mmap(alloc_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=alloc_index)
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(PAGE))
        src[:] = pattern

        # 2. map that grant back through gntdev
        mreq = GntdevMapGrantRef(count=1)
        mreq.refs[0].domid = DOMID_SELF_AS_PEER
        mreq.refs[0].ref = gref
        ioctl(dev_fd, IOCTL_GNTDEV_MAP_GRANT_REF, mreq)
        print(f"gntdev: map index {mreq.index:#x}")
        dst = mmap.mmap(dev_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=mreq.index)

        if dst[:] != pattern:
            raise AssertionError("pattern read through gntdev differs from the one written")
        dst[0:8] = b"backward"          # and the other way round
        if src[0:8] != b"backward":
            raise AssertionError("write through gntdev not seen in the gntalloc page")
        print("grant round trip: pattern matches both ways")

        # 3. tear down
        dst.close()
        ioctl(dev_fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, GntdevUnmapGrantRef(index=mreq.index, count=1))
        src.close()
        ioctl(alloc_fd, IOCTL_GNTALLOC_DEALLOC_GREF, GntallocDeallocGref(index=alloc_index, count=1))
    finally:
        os.close(dev_fd)
        os.close(alloc_fd)


def read_port(fd, timeout=5.0):
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        raise AssertionError("no event channel notification within %.0fs" % timeout)
    (port,) = struct.unpack("=I", os.read(fd, 4))
    os.write(fd, struct.pack("=I", port))   # unmask
    return port


def check_evtchn():
    a = os.open("/dev/xen/evtchn", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    b = os.open("/dev/xen/evtchn", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        port_a = ioctl(a, IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                       EvtchnBindUnboundPort(remote_domain=DOMID_SELF_AS_PEER))
        port_b = ioctl(b, IOCTL_EVTCHN_BIND_INTERDOMAIN,
                       EvtchnBindInterdomain(remote_domain=DOMID_SELF_AS_PEER, remote_port=port_a))
        print(f"evtchn: unbound port {port_a} bound to interdomain port {port_b}")
        # Xen marks the new interdomain port pending once: drain it first.
        assert read_port(b) == port_b
        ioctl(a, IOCTL_EVTCHN_NOTIFY, EvtchnNotify(port=port_a))
        got = read_port(b)
        if got != port_b:
            raise AssertionError(f"notification on port {got}, expected {port_b}")
        try:
            os.read(b, 4)
            raise AssertionError("unexpected second notification")
        except BlockingIOError:
            pass
        print("evtchn: notification received")
    finally:
        os.close(b)
        os.close(a)


def main():
    for dev in ("gntalloc", "gntdev", "evtchn"):
        if not os.path.exists("/dev/xen/" + dev):
            print(f"/dev/xen/{dev} missing (not in dom0, or module not loaded)", file=sys.stderr)
            return 1
    check_grants()
    check_evtchn()
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
