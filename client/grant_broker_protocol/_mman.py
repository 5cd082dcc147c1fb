"""``sys/mman.h``: the one libc call Python's mmap module lacks — mmap at a fixed address."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MAP_FIXED = 0x10  # sys/mman.h (Linux, all architectures this project runs on)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value


def libc_mmap(address: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """``mmap(2)``; raises OSError with the errno on failure."""
    result: int | None = _libc.mmap(address, length, prot, flags, fd, offset)  # restype c_void_p: NULL is None
    if result == _MAP_FAILED or result is None:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
