"""Mirror of Xen's public grant_table.h (xen/include/public/grant_table.h).

Status codes, grant-entry flags, grant-copy and grant-map flags under their C
names, plus the grant-entry layouts.  The hypercall argument structs
(``gnttab_copy`` and friends) are not mirrored: userspace reaches them only
through gntdev, whose own structs live in :mod:`grant_broker.uapi.gntdev`.
"""

from __future__ import annotations

import ctypes

# -- scalar typedefs -------------------------------------------------------
grant_ref_t = ctypes.c_uint32
"""``typedef uint32_t grant_ref_t``: index into a domain's grant table."""
domid_t = ctypes.c_uint16
"""``typedef uint16_t domid_t`` (from xen.h)."""
grant_handle_t = ctypes.c_uint32
"""``typedef uint32_t grant_handle_t``: tracks one hypervisor mapping."""
grant_status_t = ctypes.c_uint16
"""``typedef uint16_t grant_status_t``: v2 status-frame entry."""

# -- grant entries -----------------------------------------------------------


class grant_entry_v1(ctypes.Structure):
    """xen/include/public/grant_table.h: struct grant_entry_v1.

    A version-1 grant-table slot: GTF_* flags, the grantee domain and the
    frame it may access (or receive, for transfers).
    """

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("domid", domid_t),
        ("frame", ctypes.c_uint32),
    ]


class grant_entry_header(ctypes.Structure):
    """xen/include/public/grant_table.h: struct grant_entry_header.

    The prefix that version-1 and version-2 entries have in common.
    """

    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("domid", domid_t),
    ]


class _grant_entry_v2_full_page(ctypes.Structure):
    """The ``full_page`` member of union grant_entry_v2: a whole-frame grant."""

    _fields_ = [
        ("hdr", grant_entry_header),
        ("pad0", ctypes.c_uint32),
        ("frame", ctypes.c_uint64),
    ]


class _grant_entry_v2_sub_page(ctypes.Structure):
    """The ``sub_page`` member of union grant_entry_v2: a byte range of a frame."""

    _fields_ = [
        ("hdr", grant_entry_header),
        ("page_off", ctypes.c_uint16),
        ("length", ctypes.c_uint16),
        ("frame", ctypes.c_uint64),
    ]


class _grant_entry_v2_transitive(ctypes.Structure):
    """The ``transitive`` member of union grant_entry_v2: a re-grant of another domain's grant."""

    _fields_ = [
        ("hdr", grant_entry_header),
        ("trans_domid", domid_t),
        ("pad0", ctypes.c_uint16),
        ("gref", grant_ref_t),
    ]


class grant_entry_v2(ctypes.Union):
    """xen/include/public/grant_table.h: union grant_entry_v2.

    A version-2 grant-table slot, padded to 16 bytes; which member is live
    depends on the GTF_* type in ``hdr.flags``.
    """

    _fields_ = [
        ("hdr", grant_entry_header),
        ("full_page", _grant_entry_v2_full_page),
        ("sub_page", _grant_entry_v2_sub_page),
        ("transitive", _grant_entry_v2_transitive),
        ("__spacer", ctypes.c_uint32 * 4),
    ]


# Slots the toolstack may pre-populate and that survive a version change.
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

# -- GTF_*: grant-entry type (low two bits of flags) -------------------------
GTF_invalid = 0 << 0
GTF_permit_access = 1 << 0
GTF_accept_transfer = 2 << 0
GTF_transitive = 3 << 0
GTF_type_mask = 3 << 0

# Subflags of GTF_permit_access / GTF_transitive.
_GTF_readonly = 2
GTF_readonly = 1 << _GTF_readonly
_GTF_reading = 3
GTF_reading = 1 << _GTF_reading
_GTF_writing = 4
GTF_writing = 1 << _GTF_writing
_GTF_PWT = 5
GTF_PWT = 1 << _GTF_PWT
_GTF_PCD = 6
GTF_PCD = 1 << _GTF_PCD
_GTF_PAT = 7
GTF_PAT = 1 << _GTF_PAT
_GTF_sub_page = 8
GTF_sub_page = 1 << _GTF_sub_page

# Subflags of GTF_accept_transfer (same bits as reading/writing, other meaning).
_GTF_transfer_committed = 2
GTF_transfer_committed = 1 << _GTF_transfer_committed
_GTF_transfer_completed = 3
GTF_transfer_completed = 1 << _GTF_transfer_completed

# -- GNTTABOP_*: grant_table_op hypercall commands ---------------------------
GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12

# -- GNTCOPY_*: which side of a copy segment is a grant reference (abi) ----
from grant_broker_protocol.abi import GNTCOPY_dest_gref as GNTCOPY_dest_gref
from grant_broker_protocol.abi import _GNTCOPY_dest_gref as _GNTCOPY_dest_gref
from grant_broker_protocol.abi import _GNTCOPY_source_gref as _GNTCOPY_source_gref
from grant_broker_protocol.abi import GNTCOPY_source_gref as GNTCOPY_source_gref

# -- GNTTAB_CACHE_*: gnttab_cache_flush.op ----------------------------------
GNTTAB_CACHE_CLEAN = 1 << 0
GNTTAB_CACHE_INVAL = 1 << 1
GNTTAB_CACHE_SOURCE_GREF = 1 << 31

# -- GNTMAP_*: gnttab_map_grant_ref.flags -------------------------------------
_GNTMAP_device_map = 0
GNTMAP_device_map = 1 << _GNTMAP_device_map
_GNTMAP_host_map = 1
GNTMAP_host_map = 1 << _GNTMAP_host_map
_GNTMAP_readonly = 2
GNTMAP_readonly = 1 << _GNTMAP_readonly
_GNTMAP_application_map = 3
GNTMAP_application_map = 1 << _GNTMAP_application_map
_GNTMAP_contains_pte = 4
GNTMAP_contains_pte = 1 << _GNTMAP_contains_pte
_GNTMAP_guest_avail0 = 16
# C computes this in uint32_t, so mask to 32 bits rather than letting Python grow.
GNTMAP_guest_avail_mask = (0xFFFFFFFF << _GNTMAP_guest_avail0) & 0xFFFFFFFF

# -- GNTST_*: per-operation status, zero or negative (defined in the protocol's abi,
# since clients read them in replies too) --------------------------------------
from grant_broker_protocol.abi import (  # noqa: E402 - re-exported under the header's names
    GNTST_okay as GNTST_okay,
    GNTST_general_error as GNTST_general_error,
    GNTST_bad_domain as GNTST_bad_domain,
    GNTST_bad_gntref as GNTST_bad_gntref,
    GNTST_bad_handle as GNTST_bad_handle,
    GNTST_bad_virt_addr as GNTST_bad_virt_addr,
    GNTST_bad_dev_addr as GNTST_bad_dev_addr,
    GNTST_no_device_space as GNTST_no_device_space,
    GNTST_permission_denied as GNTST_permission_denied,
    GNTST_bad_page as GNTST_bad_page,
    GNTST_bad_copy_arg as GNTST_bad_copy_arg,
    GNTST_address_too_big as GNTST_address_too_big,
    GNTST_eagain as GNTST_eagain,
    GNTST_no_space as GNTST_no_space,
    GNTST_NAMES as GNTST_NAMES,
    gntst_message as gntst_message,
    gntst_name as gntst_name,
)
