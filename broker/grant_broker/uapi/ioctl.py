"""Ioctl request numbers, mirroring include/uapi/asm-generic/ioctl.h.

Every ioctl number in :mod:`grant_broker.uapi` is built here from the
direction, the type character, the sequence number and the ``ctypes.sizeof``
of its argument struct, exactly as the C macros do, so nothing is a copied hex
constant.  The generic layout (8-bit nr, 8-bit type, 14-bit size, 2-bit dir)
is the one used by x86, arm and arm64, the architectures Xen and mem-buf run on.
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING, TypeAlias, cast

__all__ = [
    "_IOC_NRBITS", "_IOC_TYPEBITS", "_IOC_SIZEBITS", "_IOC_DIRBITS",
    "_IOC_NRSHIFT", "_IOC_TYPESHIFT", "_IOC_SIZESHIFT", "_IOC_DIRSHIFT",
    "_IOC_NONE", "_IOC_WRITE", "_IOC_READ",
    "_IOC", "_IO", "_IOR", "_IOW", "_IOWR",
    "_IOC_DIR", "_IOC_TYPE", "_IOC_NR", "_IOC_SIZE",
    "flexible",
]

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

if TYPE_CHECKING:
    # A ctypes type, sized with ctypes.sizeof; the alias keeps the builtin
    # ``type`` usable even though the C macros name a parameter ``type``.
    CType: TypeAlias = type[ctypes._CData]


def _size_of(size: CType | int) -> int:
    return size if isinstance(size, int) else ctypes.sizeof(size)


def _type_of(type_: str | int) -> int:
    # The C macros take a character literal such as 'G'; accept that or an int.
    return ord(type_) if isinstance(type_, str) else type_


def _IOC(dir: int, type: str | int, nr: int, size: CType | int) -> int:  # noqa: A002 - C names
    """Compose a request number like the C ``_IOC(dir, type, nr, size)`` macro.

    Args:
        dir: ``_IOC_NONE``, ``_IOC_READ``, ``_IOC_WRITE`` or ``_IOC_READ | _IOC_WRITE``.
        type: the driver's magic, a one-character string (``'G'``) or an int.
        nr: the command's sequence number.
        size: the argument's ctypes type (sized with ``ctypes.sizeof``) or a byte count.

    Raises:
        ValueError: a field does not fit in its bit width (the C macro would
            silently corrupt the neighbouring field instead).
    """
    t = _type_of(type)
    s = _size_of(size)
    for name, value, mask in (("dir", dir, _IOC_DIRMASK), ("type", t, _IOC_TYPEMASK),
                              ("nr", nr, _IOC_NRMASK), ("size", s, _IOC_SIZEMASK)):
        if not 0 <= value <= mask:
            raise ValueError(f"_IOC {name}={value} does not fit in its field")
    return (dir << _IOC_DIRSHIFT) | (t << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (s << _IOC_SIZESHIFT)


def _IO(type: str | int, nr: int) -> int:  # noqa: A002
    """``_IO(type, nr)``: a command without an argument."""
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: str | int, nr: int, argtype: CType) -> int:  # noqa: A002
    """``_IOR(type, nr, argtype)``: the kernel writes ``argtype`` back to userspace."""
    return _IOC(_IOC_READ, type, nr, argtype)


def _IOW(type: str | int, nr: int, argtype: CType) -> int:  # noqa: A002
    """``_IOW(type, nr, argtype)``: userspace passes ``argtype`` in."""
    return _IOC(_IOC_WRITE, type, nr, argtype)


def _IOWR(type: str | int, nr: int, argtype: CType) -> int:  # noqa: A002
    """``_IOWR(type, nr, argtype)``: ``argtype`` goes in and comes back."""
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, argtype)


def _IOC_DIR(nr: int) -> int:
    """The direction bits of a request number."""
    return (nr >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def _IOC_TYPE(nr: int) -> int:
    """The type (magic) byte of a request number."""
    return (nr >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def _IOC_NR(nr: int) -> int:
    """The sequence number of a request number."""
    return (nr >> _IOC_NRSHIFT) & _IOC_NRMASK


def _IOC_SIZE(nr: int) -> int:
    """The argument size encoded in a request number."""
    return (nr >> _IOC_SIZESHIFT) & _IOC_SIZEMASK


# -- variable-length arguments ------------------------------------------------
#
# Several ioctls end their argument struct with a one-element array that the
# caller really sizes to ``count`` (``refs[1]``, ``gref_ids[1]``).  The ioctl
# number still encodes sizeof the one-element struct; only the buffer passed
# to the kernel grows.  ``flexible`` builds a sibling ctypes type whose last
# array holds ``count`` elements: the array keeps its offset and the size is
# ``offsetof(array) + count * sizeof(element)`` rounded up to the struct's
# alignment.  That equals ``sizeof(base) + (count - 1) * sizeof(element)``
# unless the one-element struct has tail padding (ioctl_gntalloc_alloc_gref
# does: 24 bytes for 20 of fields).


def flexible(base: type[ctypes.Structure], count: int) -> type[ctypes.Structure]:
    """Return ``base`` with its trailing ``[1]`` array widened to ``count`` elements.

    ``count`` of 0 keeps the single element (the C struct can never be
    smaller than its declaration); the ``count`` field itself is the caller's
    to fill.  Layouts are cached, so repeated calls return the same class.

    Raises:
        ValueError: ``count`` is negative.
        TypeError: ``base`` does not end in a one-element array.
    """
    if count < 0:
        raise ValueError(f"negative element count {count}")
    return _flexible(base, max(count, 1))


# Bounded because counts come from clients; a few hundred layouts cover any
# realistic working set and each is only a small class.
@functools.lru_cache(maxsize=512)
def _flexible(base: type[ctypes.Structure], n: int) -> type[ctypes.Structure]:
    *head, last = base._fields_
    last_name, last_type = last[0], last[1]  # a third item (bit width) never goes with an array
    # typeshed declares Array's _length_ and _type_ as instance properties; on
    # an array type, where ctypes keeps them, they are the length and the element type.
    if not (isinstance(last_type, type) and issubclass(last_type, ctypes.Array)
            and cast(int, last_type._length_) == 1):
        raise TypeError(f"{base.__name__} does not end in a one-element array")
    element = cast("type[ctypes._CDataType]", last_type._type_)
    fields = [*head, (last_name, element * n)]
    return type(f"{base.__name__}_{n}", (ctypes.Structure,), {
        "_fields_": fields,
        "__module__": base.__module__,
        "__doc__": f"{base.__name__} with {last_name}[{n}].",
    })
