"""Mirror of Qualcomm's uapi header include/uapi/linux/mem-buf.h (/dev/membuf).

mem-buf lends memory between VMs under a hypervisor: ALLOC borrows memory
from another VM, EXPORT shares a dma-buf with other VMs (yielding a memparcel
handle), IMPORT turns a memparcel handle back into a dma-buf.  Pointers
travel as ``__u64`` and every ``reserved*`` field must be zero.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Iterable

from .ioctl import _IOWR

DEVICE_PATH = "/dev/membuf"

MEM_BUF_IOC_MAGIC = "M"


class mem_buf_mem_type(enum.IntEnum):
    """include/uapi/linux/mem-buf.h: enum mem_buf_mem_type (where memory comes from / goes to)."""

    MEM_BUF_ION_MEM_TYPE = 0
    MEM_BUF_MAX_MEM_TYPE = 1


# The enumerators are plain C constants too; expose them at module level.
MEM_BUF_ION_MEM_TYPE = mem_buf_mem_type.MEM_BUF_ION_MEM_TYPE
MEM_BUF_MAX_MEM_TYPE = mem_buf_mem_type.MEM_BUF_MAX_MEM_TYPE

# Well-known VM identifiers for acl_entry.vmid, and acl_entry.perms bits:
# clients name them in requests, so they are defined in the protocol's abi.
from grant_broker_protocol.abi import MEM_BUF_PERM_FLAG_EXEC as MEM_BUF_PERM_FLAG_EXEC  # noqa: E402
from grant_broker_protocol.abi import MEM_BUF_PERM_FLAG_READ as MEM_BUF_PERM_FLAG_READ  # noqa: E402
from grant_broker_protocol.abi import MEM_BUF_PERM_FLAG_WRITE as MEM_BUF_PERM_FLAG_WRITE  # noqa: E402
from grant_broker_protocol.abi import MEM_BUF_PERM_VALID_FLAGS as MEM_BUF_PERM_VALID_FLAGS  # noqa: E402
from grant_broker_protocol.abi import MEM_BUF_VMID_PRIMARY_VM as MEM_BUF_VMID_PRIMARY_VM  # noqa: E402
from grant_broker_protocol.abi import MEM_BUF_VMID_TRUSTED_VM as MEM_BUF_VMID_TRUSTED_VM  # noqa: E402

# Upper bound on nr_acl_entries in every request.
MEM_BUF_MAX_NR_ACL_ENTS = 16


class acl_entry(ctypes.Structure):
    """include/uapi/linux/mem-buf.h: struct acl_entry.

    One VM (``vmid``) and the MEM_BUF_PERM_FLAG_* bits it gets.
    """

    _fields_ = [
        ("vmid", ctypes.c_uint32),
        ("perms", ctypes.c_uint32),
    ]


class mem_buf_ion_data(ctypes.Structure):
    """include/uapi/linux/mem-buf.h: struct mem_buf_ion_data.

    The per-type data for MEM_BUF_ION_MEM_TYPE: which ION heap to use.
    """

    _fields_ = [
        ("heap_id", ctypes.c_uint32),
    ]


class mem_buf_alloc_ioctl_arg(ctypes.Structure):
    """include/uapi/linux/mem-buf.h: struct mem_buf_alloc_ioctl_arg.

    Borrow ``size`` bytes from another VM for the VMs in ``acl_list``
    (a user pointer to ``nr_acl_entries`` acl_entry).  ``src_data`` and
    ``dst_data`` point at per-type data such as mem_buf_ion_data; the new
    memory comes back as ``mem_buf_fd``.
    """

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("acl_list", ctypes.c_uint64),
        ("nr_acl_entries", ctypes.c_uint32),
        ("src_mem_type", ctypes.c_uint32),
        ("src_data", ctypes.c_uint64),
        ("dst_mem_type", ctypes.c_uint32),
        ("mem_buf_fd", ctypes.c_uint32),
        ("dst_data", ctypes.c_uint64),
        ("reserved0", ctypes.c_uint64),
        ("reserved1", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint64),
    ]


MEM_BUF_IOC_ALLOC = _IOWR(MEM_BUF_IOC_MAGIC, 0, mem_buf_alloc_ioctl_arg)


class mem_buf_export_ioctl_arg(ctypes.Structure):
    """include/uapi/linux/mem-buf.h: struct mem_buf_export_ioctl_arg.

    Share dma-buf ``dma_buf_fd`` with the VMs in ``acl_list``.  The kernel
    returns ``export_fd`` (keep it open while shared) and the
    ``memparcel_hdl`` the other VMs import.  The buffer must not be mmap()ed.
    """

    _fields_ = [
        ("dma_buf_fd", ctypes.c_uint32),
        ("nr_acl_entries", ctypes.c_uint32),
        ("acl_list", ctypes.c_uint64),
        ("export_fd", ctypes.c_uint32),
        ("memparcel_hdl", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint64),
        ("reserved1", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint64),
    ]


MEM_BUF_IOC_EXPORT = _IOWR(MEM_BUF_IOC_MAGIC, 1, mem_buf_export_ioctl_arg)


class mem_buf_import_ioctl_arg(ctypes.Structure):
    """include/uapi/linux/mem-buf.h: struct mem_buf_import_ioctl_arg.

    Turn ``memparcel_hdl`` into a dma-buf (``dma_buf_import_fd``) with the
    permissions in ``acl_list``; closing the fd releases the memory.
    """

    _fields_ = [
        ("memparcel_hdl", ctypes.c_uint32),
        ("nr_acl_entries", ctypes.c_uint32),
        ("acl_list", ctypes.c_uint64),
        ("dma_buf_import_fd", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint32),
        ("reserved1", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint64),
        ("reserved3", ctypes.c_uint64),
    ]


MEM_BUF_IOC_IMPORT = _IOWR(MEM_BUF_IOC_MAGIC, 2, mem_buf_import_ioctl_arg)


def acl_list_for(entries: Iterable[tuple[int, int]]) -> ctypes.Array[acl_entry]:
    """An ``acl_entry`` array from ``(vmid, perms)`` pairs, for the ``acl_list`` fields.

    Pass ``ctypes.addressof(array)`` as ``acl_list`` and ``len(array)`` as
    ``nr_acl_entries``; keep the array alive until the ioctl returns.

    Raises:
        ValueError: no entries, more than MEM_BUF_MAX_NR_ACL_ENTS, or perms
            outside MEM_BUF_PERM_VALID_FLAGS (the kernel would say EINVAL).
    """
    pairs = list(entries)
    if not 0 < len(pairs) <= MEM_BUF_MAX_NR_ACL_ENTS:
        raise ValueError(f"need 1..{MEM_BUF_MAX_NR_ACL_ENTS} ACL entries, got {len(pairs)}")
    array = (acl_entry * len(pairs))()
    for slot, (vmid, perms) in zip(array, pairs):
        if perms & ~MEM_BUF_PERM_VALID_FLAGS:
            raise ValueError(f"invalid mem-buf permission bits {perms:#x} for vmid {vmid}")
        slot.vmid = vmid
        slot.perms = perms
    return array
