"""The mem-buf argument rules of the backend contract, shared by every mem-buf backend.

The legacy driver (``validate_ioctl_arg`` / ``mem_buf_acl_to_vmid_perms_list``)
takes 1..``MEM_BUF_MAX_NR_ACL_ENTS`` entries, VMIDs it knows and perms within
``MEM_BUF_PERM_VALID_FLAGS``; the contract also refuses perms of 0, which the
driver would pass on to the resource manager.  Every violation is EINVAL with
a detail naming the entry.

Each check takes the operation as its caller names it (``"mem-buf alloc"``,
``"mem-buf export"``, ``"mem-buf import"``) and raises with exactly that name:
the backends and the service share these rules, so none of them adds a prefix.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from grant_broker.backend.contract import PAGE_SIZE, AclEntry
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi.mem_buf import (
    MEM_BUF_MAX_MEM_TYPE,
    MEM_BUF_MAX_NR_ACL_ENTS,
    MEM_BUF_PERM_VALID_FLAGS,
    MEM_BUF_VMID_PRIMARY_VM,
    MEM_BUF_VMID_TRUSTED_VM,
)

VMID_NAMES = {MEM_BUF_VMID_PRIMARY_VM: "MEM_BUF_VMID_PRIMARY_VM", MEM_BUF_VMID_TRUSTED_VM: "MEM_BUF_VMID_TRUSTED_VM"}
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


def membuf_error(code: int, operation: str, detail: str) -> BrokerError:
    """The error of *operation*, named in full (``"mem-buf alloc"``)."""
    return BrokerError(code, operation, detail)


def vmid_name(vmid: int) -> str:
    return f"vmid {vmid} ({VMID_NAMES[vmid]})" if vmid in VMID_NAMES else f"vmid {vmid}"


def check_acl_count(acl: Sequence[AclEntry], operation: str) -> None:
    if not 1 <= len(acl) <= MEM_BUF_MAX_NR_ACL_ENTS:
        raise membuf_error(
            errno.EINVAL, operation, f"an ACL needs 1..{MEM_BUF_MAX_NR_ACL_ENTS} entries, got {len(acl)}"
        )


def check_acl_entries(acl: Sequence[AclEntry], operation: str) -> frozenset[tuple[int, int]]:
    """Check each entry; return the ACL as a set of ``(vmid, perms)``."""
    for index, entry in enumerate(acl):
        if entry.vmid not in VMID_NAMES:
            names = " or ".join(f"{name} ({vmid})" for vmid, name in VMID_NAMES.items())
            raise membuf_error(errno.EINVAL, operation, f"acl[{index}]: vmid {entry.vmid} is not {names}")
        if not 0 <= entry.perms <= U32_MAX or entry.perms & ~MEM_BUF_PERM_VALID_FLAGS:
            raise membuf_error(
                errno.EINVAL,
                operation,
                f"acl[{index}] ({vmid_name(entry.vmid)}): perms {entry.perms:#x} has bits outside "
                f"MEM_BUF_PERM_VALID_FLAGS ({MEM_BUF_PERM_VALID_FLAGS:#x})",
            )
        if entry.perms == 0:
            raise membuf_error(errno.EINVAL, operation, f"acl[{index}] ({vmid_name(entry.vmid)}): perms 0 grants nothing")
    return frozenset((entry.vmid, entry.perms) for entry in acl)


def check_alloc(
    operation: str,
    size: int,
    acl: Sequence[AclEntry],
    *,
    src_mem_type: int,
    src_heap_id: int,
    dst_mem_type: int,
    dst_heap_id: int,
) -> None:
    """The rules of ``MemBufDevice.alloc``, in the order the driver checks them.

    The contract refuses sizes that are not a page multiple; the driver would
    round them up.
    """
    if not 0 < size <= U64_MAX:
        raise membuf_error(errno.EINVAL, operation, f"size {size} must be positive and fit in a __u64")
    if size % PAGE_SIZE:
        raise membuf_error(errno.EINVAL, operation, f"size {size} is not a multiple of the page size ({PAGE_SIZE})")
    check_acl_count(acl, operation)
    for name, mem_type in (("src_mem_type", src_mem_type), ("dst_mem_type", dst_mem_type)):
        if not 0 <= mem_type < MEM_BUF_MAX_MEM_TYPE:
            raise membuf_error(
                errno.EINVAL, operation,
                f"{name} {mem_type} is not below MEM_BUF_MAX_MEM_TYPE ({int(MEM_BUF_MAX_MEM_TYPE)})",
            )
    for name, heap_id in (("src_heap_id", src_heap_id), ("dst_heap_id", dst_heap_id)):
        if not 0 <= heap_id <= U32_MAX:
            raise membuf_error(errno.EINVAL, operation, f"{name} {heap_id} does not fit in a __u32")
    check_acl_entries(acl, operation)
