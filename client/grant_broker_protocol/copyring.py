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

import itertools
import struct
import sys
from array import array
from collections.abc import Sequence
from typing import NamedTuple

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


class RecordColumns(NamedTuple):
    """Records as columns: each field of every record, in record order (lists of ints)."""

    source: list[int]
    dest: list[int]
    source_domid: list[int]
    dest_domid: list[int]
    source_offset: list[int]
    dest_offset: list[int]
    length: list[int]
    flags: list[int]
    reserved_low: list[int]  # the two 32-bit halves of ``reserved``: 0 both, in a well-formed record
    reserved_high: list[int]


def decode_records(records: bytes) -> RecordColumns:
    """The request fields of *records* (whole records, ``status`` skipped) as
    columns: two array conversions and strided slices, no Python per record."""
    words = array("I")
    halves = array("H")
    words.frombytes(records)
    halves.frombytes(records)
    if _SWAP:
        words.byteswap()
        halves.byteswap()
    h = _WORDS * 2  # a record in 16-bit halves
    return RecordColumns(
        words[0::_WORDS].tolist(),
        words[1::_WORDS].tolist(),
        halves[4::h].tolist(),
        halves[5::h].tolist(),
        halves[6::h].tolist(),
        halves[7::h].tolist(),
        halves[8::h].tolist(),
        halves[9::h].tolist(),
        words[5::_WORDS].tolist(),
        words[6::_WORDS].tolist(),
    )


_BATCH_FORMATS: dict[int, struct.Struct] = {}


def encode_records(
    source: Sequence[int],
    dest: Sequence[int],
    source_domid: Sequence[int],
    dest_domid: Sequence[int],
    source_offset: Sequence[int],
    dest_offset: Sequence[int],
    length: Sequence[int],
    flags: Sequence[int],
) -> bytes:
    """Records from columns (``reserved`` 0, ``status`` :data:`STATUS_PENDING`):
    one ``struct.pack`` for all of them.  Raises ``struct.error`` when a value
    does not fit its field (the caller finds which with :data:`RECORD`)."""
    count = len(source)
    batch = _BATCH_FORMATS.get(count)
    if batch is None:
        if len(_BATCH_FORMATS) >= 64:
            _BATCH_FORMATS.clear()
        batch = _BATCH_FORMATS[count] = struct.Struct("<" + ("IIHHHHHH8xi" * count))
    fields = zip(
        source, dest, source_domid, dest_domid, source_offset, dest_offset, length, flags, itertools.repeat(STATUS_PENDING)
    )
    return batch.pack(*itertools.chain.from_iterable(fields))


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
    "RecordColumns",
    "decode_records",
    "encode_records",
    "read_statuses",
    "ring_bytes",
    "write_statuses",
]
