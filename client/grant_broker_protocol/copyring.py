"""The grant-copy ring's record: one layout, shared by the broker and the SDK.

A copy ring (``Gntdev.CreateCopyRing``, see ``gntdev.proto``) is a memfd the
broker makes and both sides map: ``entries`` records of :data:`RECORD_SIZE`
bytes, little-endian, one ``struct gntdev_grant_copy_segment`` each::

    offset size  field
     0     4     source        u32  grant ref (GNTCOPY_source_gref set), else a byte offset in the copy buffer
     4     4     dest          u32  grant ref (GNTCOPY_dest_gref set), else a byte offset in the copy buffer
     8     2     source_domid  u16  the granting domain of a foreign source; 0 for a local one
    10     2     dest_domid    u16  likewise for the dest
    12     2     source_offset u16  byte offset in the source's granted page; 0 for a local source
    14     2     dest_offset   u16  likewise for the dest
    16     2     len           u16  bytes to copy
    18     2     flags         u16  GNTCOPY_source_gref | GNTCOPY_dest_gref
    20     8     reserved      u64  0
    28     4     status        i32  GNTST_*, written by the broker when it performed the record

The client writes records, then rings the doorbell (``SubmitCopyRing{first,
count}``); the broker copies the records out of the ring once, checks the
copy, performs it and writes each record's ``status``; nothing else of the
ring is written by the broker, and ``status`` is never read by it.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

MAX_RING_ENTRIES = 4096
"""Records in one ring at most (and so in one doorbell): a doorbell's work is
bounded like a GrantCopy call's (4096 segments of at most a page each)."""

_REQUEST_FIELDS = "IIHHHHHHQ"  # source, dest, source_domid, dest_domid, source_offset, dest_offset, len, flags, reserved

RECORD = struct.Struct("<" + _REQUEST_FIELDS + "i")
"""A whole record, as the SDK writes it (its last field is ``status``)."""

REQUEST = struct.Struct("<" + _REQUEST_FIELDS + "4x")
"""A record as the broker reads it: the same layout, ``status`` skipped."""

RECORD_SIZE = RECORD.size
STATUS_OFFSET = RECORD.size - 4
"""Byte offset of ``status`` within a record."""

STATUS_PENDING = 1
"""What the SDK writes as a record's status: no ``GNTST_*`` value is positive,
so a record still carrying it was not performed."""

assert RECORD_SIZE == REQUEST.size == 32 and STATUS_OFFSET % 4 == 0

_WORDS = RECORD_SIZE // 4  # a record in 32-bit words
_STATUS_WORD = STATUS_OFFSET // 4
_SWAP = sys.byteorder != "little"


def ring_bytes(entries: int) -> int:
    """The size of a ring of *entries* records."""
    return entries * RECORD_SIZE


def write_statuses(words: memoryview, first: int, statuses: Sequence[int]) -> None:
    """Write *statuses* into records *first*, *first* + 1, ... of a ring.

    *words* is the ring as 32-bit words (``memoryview(ring).cast("i")``); one
    strided store writes them all and touches no other byte of the records."""
    values = array("i", statuses)
    if _SWAP:
        values.byteswap()
    start = first * _WORDS + _STATUS_WORD
    words[start : start + len(values) * _WORDS : _WORDS] = values


def read_statuses(words: memoryview, first: int, count: int) -> list[int]:
    """The statuses of records [*first*, *first* + *count*) of a ring (*words* as for :func:`write_statuses`)."""
    start = first * _WORDS + _STATUS_WORD
    strided = words[start : start + count * _WORDS : _WORDS]
    if not _SWAP:
        return strided.tolist()
    values = array("i", strided.tobytes())
    values.byteswap()
    return values.tolist()


__all__ = [
    "MAX_RING_ENTRIES",
    "RECORD",
    "RECORD_SIZE",
    "REQUEST",
    "STATUS_OFFSET",
    "STATUS_PENDING",
    "read_statuses",
    "ring_bytes",
    "write_statuses",
]
