"""Values of the kernel and hypervisor interfaces that travel in the protocol.

Requests and replies carry flags and statuses with the values the C headers
give them (``GNTCOPY_*``, ``UNMAP_NOTIFY_*``, ``GNTST_*``, mem-buf VMIDs and
permissions), so both the SDK and the broker need them.  They are defined
here once; the broker's header mirrors (``grant_broker.uapi``) re-export
them under the headers' names, and ``tests/test_uapi_layout.py`` checks them
against the headers compiled with gcc.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- xen/gntdev.h, xen/gntalloc.h ------------------------------------------------
# ioctl_gntdev_unmap_notify.action / ioctl_gntalloc_unmap_notify.action bits
# (both headers define them, with the same values).
UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2

# ioctl_gntdev_dmabuf_exp_from_refs.flags: how the exported buffer is allocated.
GNTDEV_DMA_FLAG_WC = 1 << 0
GNTDEV_DMA_FLAG_COHERENT = 1 << 1

# ioctl_gntalloc_alloc_gref.flags: the grantee may write, not only read.
GNTALLOC_FLAG_WRITABLE = 1

# -- linux/mem-buf.h -----------------------------------------------------------
MEM_BUF_VMID_PRIMARY_VM = 0
MEM_BUF_VMID_TRUSTED_VM = 1

MEM_BUF_PERM_FLAG_READ = 1 << 0
MEM_BUF_PERM_FLAG_WRITE = 1 << 1
MEM_BUF_PERM_FLAG_EXEC = 1 << 2
MEM_BUF_PERM_VALID_FLAGS = MEM_BUF_PERM_FLAG_READ | MEM_BUF_PERM_FLAG_WRITE | MEM_BUF_PERM_FLAG_EXEC

# -- xen/include/public/grant_table.h ------------------------------------------
# -- GNTCOPY_*: which side of a copy segment is a grant reference -------------
# (The header defines only these two; there is no GNTCOPY_can_fail.)
_GNTCOPY_source_gref = 0
GNTCOPY_source_gref = 1 << _GNTCOPY_source_gref
_GNTCOPY_dest_gref = 1
GNTCOPY_dest_gref = 1 << _GNTCOPY_dest_gref

# -- GNTST_*: per-operation status, zero or negative -------------------------
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

GNTST_NAMES: dict[int, str] = {
    value: name for name, value in globals().copy().items()
    if name.startswith("GNTST_") and isinstance(value, int)
}
"""Every GNTST_* status mapped to its C name."""

# Our own wording of what each status means to a broker client.
_GNTST_MESSAGES: dict[int, str] = {
    GNTST_okay: "success",
    GNTST_general_error: "the hypervisor reported an unspecified failure",
    GNTST_bad_domain: "no such domain",
    GNTST_bad_gntref: "grant reference unknown or not usable for this operation",
    GNTST_bad_handle: "mapping handle unknown or not usable for this operation",
    GNTST_bad_virt_addr: "virtual address cannot receive this mapping",
    GNTST_bad_dev_addr: "device address does not match a mapping",
    GNTST_no_device_space: "the I/O MMU has no free translation slot",
    GNTST_permission_denied: "the granting domain does not allow this access",
    GNTST_bad_page: "the page is not valid for this operation",
    GNTST_bad_copy_arg: "copy range crosses a page boundary",
    GNTST_address_too_big: "page address too large for the transfer",
    GNTST_eagain: "operation not performed yet; retry it",
    GNTST_no_space: "the hypervisor ran out of space (handles or similar)",
}


def gntst_name(status: int) -> str:
    """C name of a GNTST_* status, e.g. ``"GNTST_bad_gntref"``; ``"GNTST(<n>)"`` if unknown."""
    return GNTST_NAMES.get(status, f"GNTST({status})")


def gntst_message(status: int) -> str:
    """Human-readable meaning of a GNTST_* status; ``"unknown grant status <n>"`` if unknown."""
    return _GNTST_MESSAGES.get(status, f"unknown grant status {status}")


# -- values named in requests ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class GrantRef:
    """One foreign grant: ``ref`` in the grant table of domain ``domid``
    (``struct ioctl_gntdev_grant_ref``)."""

    domid: int
    ref: int


@dataclass(frozen=True, slots=True)
class AclEntry:
    """``struct acl_entry`` of mem-buf: a VMID and its ``MEM_BUF_PERM_FLAG_*`` bits."""

    vmid: int
    perms: int
