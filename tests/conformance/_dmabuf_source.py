"""Real dma-bufs for the import tests: where one comes from depends on the backend.

gntdev import grants the pages of *any* dma-buf, so the import tests need a
buffer made by someone else:

* on the emulated hypervisor, a buffer the backend exports itself (the only
  kind of dma-buf it knows);
* on a real Xen, a buffer of **vgem** (Linux's virtual GEM driver: Debian's
  kernel has no udmabuf but ships vgem as a module): a dumb buffer
  (``DRM_IOCTL_MODE_CREATE_DUMB``) exported with ``DRM_IOCTL_PRIME_HANDLE_TO_FD``.
  It can be mmapped, so a test can write and read it directly.  A PV dom0
  cannot export grants as a dma-buf at all, so this is the only way to test
  import there.

Without a vgem device the Xen import tests skip with that reason, unless
``GRANT_BROKER_TEST_REQUIRE_VGEM=1`` (the real-Xen CI suite sets it after
``modprobe vgem``): then they fail, so a CI run cannot pass without testing import.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import struct
from collections.abc import Iterator

import pytest

from grant_broker.backend.contract import PAGE_SIZE, Backend

# <drm/drm.h>: DRM_IOWR(nr, type) with DRM_IOCTL_BASE 'd'.
_IOC_WRITE, _IOC_READ = 1, 2


def _drm_iowr(number: int, size: int) -> int:
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (ord("d") << 8) | number


def _drm_iow(number: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (ord("d") << 8) | number


# struct drm_mode_create_dumb { u32 height, width, bpp, flags; u32 handle, pitch; u64 size; }
_CREATE_DUMB = struct.Struct("=IIIIIIQ")
DRM_IOCTL_MODE_CREATE_DUMB = _drm_iowr(0xB2, _CREATE_DUMB.size)
# struct drm_prime_handle { u32 handle; u32 flags; s32 fd; }
_PRIME_HANDLE = struct.Struct("=IIi")
DRM_IOCTL_PRIME_HANDLE_TO_FD = _drm_iowr(0x2D, _PRIME_HANDLE.size)
# struct drm_gem_close { u32 handle; u32 pad; }
_GEM_CLOSE = struct.Struct("=II")
DRM_IOCTL_GEM_CLOSE = _drm_iow(0x09, _GEM_CLOSE.size)

REQUIRE_VGEM = os.environ.get("GRANT_BROKER_TEST_REQUIRE_VGEM") == "1"


def vgem_card() -> str | None:
    """The /dev/dri node of the vgem device, or None (``modprobe vgem`` makes one)."""
    for device in sorted(glob.glob("/sys/class/drm/card*/device")):
        if "vgem" in os.path.realpath(device):
            node = os.path.join("/dev/dri", os.path.basename(os.path.dirname(device)))
            if os.path.exists(node):
                return node
    return None


@contextlib.contextmanager
def vgem_dmabuf(pages: int) -> Iterator[int]:
    """A dma-buf of *pages* pages made by vgem; yields its descriptor (closed afterwards)."""
    card = vgem_card()
    if card is None:
        message = "no vgem device for a real dma-buf to import (modprobe vgem)"
        if REQUIRE_VGEM:
            pytest.fail(message + "; GRANT_BROKER_TEST_REQUIRE_VGEM=1 requires one")
        pytest.skip(message)
    card_fd = os.open(card, os.O_RDWR | os.O_CLOEXEC)
    try:
        # 32 bits per pixel, 1024 pixels a row: one page per row.
        request = bytearray(_CREATE_DUMB.pack(pages, PAGE_SIZE // 4, 32, 0, 0, 0, 0))
        fcntl.ioctl(card_fd, DRM_IOCTL_MODE_CREATE_DUMB, request)
        handle, size = _CREATE_DUMB.unpack(request)[4], _CREATE_DUMB.unpack(request)[6]
        assert size == pages * PAGE_SIZE, f"vgem made {size} bytes for {pages} pages"
        try:
            prime = bytearray(_PRIME_HANDLE.pack(handle, os.O_RDWR | os.O_CLOEXEC, -1))
            fcntl.ioctl(card_fd, DRM_IOCTL_PRIME_HANDLE_TO_FD, prime)
            buffer_fd = _PRIME_HANDLE.unpack(prime)[2]
        finally:
            # The dma-buf holds the object; the handle is no longer needed.
            fcntl.ioctl(card_fd, DRM_IOCTL_GEM_CLOSE, _GEM_CLOSE.pack(handle, 0))
    finally:
        os.close(card_fd)
    try:
        yield buffer_fd
    finally:
        os.close(buffer_fd)


@contextlib.contextmanager
def foreign_dmabuf(local: Backend, peer: Backend, pages: int) -> Iterator[int]:
    """A mmappable dma-buf of *pages* pages that *local* did not make; yields its descriptor."""
    if local.capabilities.backend == "xen":
        with vgem_dmabuf(pages) as fd:
            yield fd
        return
    # The emulated hypervisor: the peer grants pages, a separate gntdev
    # instance of the local domain exports them.
    from ._grant_helpers import granted_pages

    with (
        granted_pages(peer, local.domid, pages) as (_, allocation),
        local.open_gntdev() as exporter,
        exporter.dmabuf_export_from_refs(peer.domid, allocation.refs) as buffer,
    ):
        yield buffer.fileno()
