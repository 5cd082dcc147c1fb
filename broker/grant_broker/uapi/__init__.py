"""Python mirrors of the kernel and hypervisor interfaces the broker drives.

One module per C header, structs and constants under their C names, ioctl
numbers computed by :mod:`.ioctl` from the struct sizes.  This package is the
only place in the project that uses :mod:`ctypes`; ``tests/test_uapi_layout.py``
compiles the real headers with gcc and checks every size, offset and constant.

Modules:
    ioctl        asm-generic/ioctl.h: ``_IOC`` and friends
    grant_table  xen/include/public/grant_table.h: GNTST_*, GTF_*, GNTMAP_*
    gntdev       include/uapi/xen/gntdev.h (/dev/xen/gntdev)
    gntalloc     include/uapi/xen/gntalloc.h (/dev/xen/gntalloc)
    evtchn       include/uapi/xen/evtchn.h (/dev/xen/evtchn)
    mem_buf      include/uapi/linux/mem-buf.h (/dev/membuf)
"""
