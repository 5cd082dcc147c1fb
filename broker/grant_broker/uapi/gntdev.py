"""Mirror of the Linux uapi header include/uapi/xen/gntdev.h (/dev/xen/gntdev).

gntdev maps pages other domains granted to us: grant refs are registered
with MAP_GRANT_REF, which returns an mmap offset (``index``); the pages appear
on ``mmap`` of that offset.  It also does hypervisor grant copies and dma-buf
export/import.  Every ioctl takes ``_IOC_NONE`` with the argument's size, as
the header does.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

from .grant_table import domid_t, grant_ref_t
from .ioctl import _IOC, _IOC_NONE, flexible

DEVICE_PATH = "/dev/xen/gntdev"

_GNTDEV_MAGIC = "G"


class ioctl_gntdev_grant_ref(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_grant_ref.

    One foreign page to map: the granting domain and its grant reference.
    """

    _fields_ = [
        ("domid", ctypes.c_uint32),
        ("ref", ctypes.c_uint32),
    ]


class ioctl_gntdev_map_grant_ref(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_map_grant_ref.

    Registers ``count`` refs and returns the mmap offset in ``index``.
    ``refs`` is declared with one element but really holds ``count``: build
    the argument with :func:`map_grant_ref_for`.  A count of 0 is rejected by
    the kernel; the first map on a fresh fd gets index 0.
    """

    _fields_ = [
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("index", ctypes.c_uint64),
        ("refs", ioctl_gntdev_grant_ref * 1),
    ]


IOCTL_GNTDEV_MAP_GRANT_REF = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 0, ioctl_gntdev_map_grant_ref)


class ioctl_gntdev_unmap_grant_ref(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_unmap_grant_ref.

    Drops ``count`` refs starting at mmap offset ``index``; the range must
    already be munmap()ed.
    """

    _fields_ = [
        ("index", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


IOCTL_GNTDEV_UNMAP_GRANT_REF = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 1, ioctl_gntdev_unmap_grant_ref)


class ioctl_gntdev_get_offset_for_vaddr(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_get_offset_for_vaddr.

    Looks up the mmap offset and page count behind the start address of a
    mapped range.
    """

    _fields_ = [
        ("vaddr", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 2, ioctl_gntdev_get_offset_for_vaddr)


class ioctl_gntdev_set_max_grants(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_set_max_grants.

    Caps how many grants this fd may map.  Modern Linux answers ENOTTY: the
    limit became a module parameter, so callers should tolerate that.
    """

    _fields_ = [
        ("count", ctypes.c_uint32),
    ]


IOCTL_GNTDEV_SET_MAX_GRANTS = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 3, ioctl_gntdev_set_max_grants)


class ioctl_gntdev_unmap_notify(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_unmap_notify.

    Arms what happens when a mapped page goes away (including on crash):
    clear the byte at ``index`` and/or signal ``event_channel_port``, chosen by
    the UNMAP_NOTIFY_* bits in ``action``.  One notification per page.
    """

    _fields_ = [
        ("index", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("event_channel_port", ctypes.c_uint32),
    ]


IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 7, ioctl_gntdev_unmap_notify)


class gntdev_grant_copy_foreign(ctypes.Structure):
    """include/uapi/xen/gntdev.h: the ``foreign`` member of a grant-copy endpoint.

    Anonymous in C; names a byte ``offset`` within grant ``ref`` of ``domid``.
    """

    _fields_ = [
        ("ref", grant_ref_t),
        ("offset", ctypes.c_uint16),
        ("domid", domid_t),
    ]


class gntdev_grant_copy_ptr(ctypes.Union):
    """include/uapi/xen/gntdev.h: the anonymous union behind ``source`` / ``dest``.

    Either a local buffer address (``virt``) or a foreign grant
    (``foreign``); GNTCOPY_source_gref / GNTCOPY_dest_gref in the segment's
    ``flags`` say which.
    """

    _fields_ = [
        ("virt", ctypes.c_void_p),
        ("foreign", gntdev_grant_copy_foreign),
    ]


class gntdev_grant_copy_segment(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct gntdev_grant_copy_segment.

    One copy of ``len`` bytes between a local buffer and a grant (or two
    grants).  ``flags`` holds GNTCOPY_*; the kernel writes a GNTST_* into
    ``status`` for each segment.
    """

    _fields_ = [
        ("source", gntdev_grant_copy_ptr),
        ("dest", gntdev_grant_copy_ptr),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class ioctl_gntdev_grant_copy(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_grant_copy.

    Points at an array of ``count`` segments.  The ioctl succeeds once all
    segments were processed; each segment's ``status`` then tells whether it
    copied.
    """

    _fields_ = [
        ("count", ctypes.c_uint),
        ("segments", ctypes.POINTER(gntdev_grant_copy_segment)),
    ]


IOCTL_GNTDEV_GRANT_COPY = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 8, ioctl_gntdev_grant_copy)

# ioctl_gntdev_unmap_notify.action bits and ioctl_gntdev_dmabuf_exp_from_refs.flags:
# values clients send, defined in the protocol's abi.
from grant_broker_protocol.abi import GNTDEV_DMA_FLAG_COHERENT as GNTDEV_DMA_FLAG_COHERENT  # noqa: E402
from grant_broker_protocol.abi import GNTDEV_DMA_FLAG_WC as GNTDEV_DMA_FLAG_WC  # noqa: E402
from grant_broker_protocol.abi import UNMAP_NOTIFY_CLEAR_BYTE as UNMAP_NOTIFY_CLEAR_BYTE  # noqa: E402
from grant_broker_protocol.abi import UNMAP_NOTIFY_SEND_EVENT as UNMAP_NOTIFY_SEND_EVENT  # noqa: E402


class ioctl_gntdev_dmabuf_exp_from_refs(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_dmabuf_exp_from_refs.

    Wraps ``count`` grants from ``domid`` in a new dma-buf whose fd comes back
    in ``fd``.  ``refs`` really holds ``count`` entries: see
    :func:`dmabuf_exp_from_refs_for`.
    """

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("domid", ctypes.c_uint32),
        ("refs", ctypes.c_uint32 * 1),
    ]


IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 9, ioctl_gntdev_dmabuf_exp_from_refs)


class ioctl_gntdev_dmabuf_exp_wait_released(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_dmabuf_exp_wait_released.

    Blocks up to ``wait_to_ms`` until an exported dma-buf is released
    (ETIMEDOUT if not; ENOENT if it already was).
    """

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("wait_to_ms", ctypes.c_uint32),
    ]


IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 10, ioctl_gntdev_dmabuf_exp_wait_released)


class ioctl_gntdev_dmabuf_imp_to_refs(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_dmabuf_imp_to_refs.

    Imports dma-buf ``fd`` and grants its pages to ``domid``; the kernel fills
    ``count`` refs.  Build it with :func:`dmabuf_imp_to_refs_for`.
    """

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("domid", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("refs", ctypes.c_uint32 * 1),
    ]


IOCTL_GNTDEV_DMABUF_IMP_TO_REFS = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 11, ioctl_gntdev_dmabuf_imp_to_refs)


class ioctl_gntdev_dmabuf_imp_release(ctypes.Structure):
    """include/uapi/xen/gntdev.h: struct ioctl_gntdev_dmabuf_imp_release.

    Ends the grants made by DMABUF_IMP_TO_REFS for ``fd`` so its owner can
    free it.
    """

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


IOCTL_GNTDEV_DMABUF_IMP_RELEASE = _IOC(_IOC_NONE, _GNTDEV_MAGIC, 12, ioctl_gntdev_dmabuf_imp_release)


# -- variable-length builders ---------------------------------------------------


def map_grant_ref_type(count: int) -> type[ctypes.Structure]:
    """The ioctl_gntdev_map_grant_ref layout with room for ``count`` refs."""
    return flexible(ioctl_gntdev_map_grant_ref, count)


def map_grant_ref_for(count: int, refs: Iterable[tuple[int, int]] = ()) -> ctypes.Structure:
    """A zeroed MAP_GRANT_REF argument for ``count`` refs, with ``count`` already set.

    Its size is ``sizeof(ioctl_gntdev_map_grant_ref) + (count - 1) *
    sizeof(ioctl_gntdev_grant_ref)``; pass it by reference with
    IOCTL_GNTDEV_MAP_GRANT_REF (whose number keeps the one-ref size).

    Args:
        count: number of grant refs (0 yields a one-slot struct; the kernel
            rejects it, which is the point of sending it).
        refs: optional ``(domid, ref)`` pairs to fill in, at most ``count``.

    Raises:
        ValueError: more refs than ``count``, or a negative ``count``.
    """
    arg = map_grant_ref_type(count)()
    arg.count = count
    for i, (domid, ref) in enumerate(refs):
        _check_room(i, count)
        arg.refs[i].domid = domid
        arg.refs[i].ref = ref
    return arg


def dmabuf_exp_from_refs_for(count: int, refs: Iterable[int] = ()) -> ctypes.Structure:
    """A zeroed DMABUF_EXP_FROM_REFS argument for ``count`` refs, ``count`` set, ``refs`` filled."""
    arg = flexible(ioctl_gntdev_dmabuf_exp_from_refs, count)()
    arg.count = count
    for i, ref in enumerate(refs):
        _check_room(i, count)
        arg.refs[i] = ref
    return arg


def dmabuf_imp_to_refs_for(count: int) -> ctypes.Structure:
    """A zeroed DMABUF_IMP_TO_REFS argument with room for the ``count`` refs the kernel returns."""
    arg = flexible(ioctl_gntdev_dmabuf_imp_to_refs, count)()
    arg.count = count
    return arg


def _check_room(i: int, count: int) -> None:
    # Writing past ``count`` would go unnoticed by ctypes for count 0 (one slot
    # exists) and would make ``count`` lie to the kernel otherwise.
    if i >= count:
        raise ValueError(f"more than {count} entries given")
