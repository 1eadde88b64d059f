"""Zip archives as any extractor may read them: every byte that could be a member is one.

Python's zipfile reads members through the central directory at the end; other extractors
(streaming ones, some scanners) walk the local headers from the start.  A zip on which the
two readings disagree hides content from one of them, so such a zip is unscannable:

- a local entry (``PK\\x03\\x04``) outside every member the central directory lists -- in
  a gap, before the first member, after the last;
- a member whose local header names it differently (``invoice.exe`` locally,
  ``invoice.ex/`` centrally: a directory to one reader, a program to another);
- a directory entry that holds data;
- members that overlap (the flat zip bomb's trick).

A zip behind other bytes (a self-extractor's program stub) is read as well: zipfile
finds its end record at the end whatever comes first.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

LOCAL = b"PK\x03\x04"
END = b"PK\x05\x06"
_END_SEARCH = 65557         # the end record (22 bytes) and the longest comment (65535)


class Inconsistent(Exception):
    """The central directory and the local headers tell different stories."""


def is_zip_at_end(data: bytes) -> bool:
    """A zip whose end record is where it must be, whatever precedes it (a stub)."""
    return data.rfind(END, max(0, len(data) - _END_SEARCH)) >= 0 and LOCAL in data


def declared_entries(data: bytes) -> int | None:
    """The entry count of the zip's end record (zip64's if there is one), before parsing."""
    end = data.rfind(END, max(0, len(data) - _END_SEARCH))
    if end < 0 or len(data) - end < 22:
        return None
    total = struct.unpack_from("<H", data, end + 10)[0]
    if total != 0xFFFF:
        return total
    end64 = data.rfind(b"PK\x06\x06", max(0, end - 1024), end)
    return struct.unpack_from("<Q", data, end64 + 32)[0] if end64 >= 0 and end - end64 >= 56 else None


def open_zip(data: bytes):
    """The zipfile reader over ``data``, its entries checked as the module docstring says."""
    import zipfile

    archive = zipfile.ZipFile(io.BytesIO(data))
    try:
        check_layout(data, archive.infolist(), getattr(archive, "start_dir", len(data)))
    except BaseException:
        archive.close()
        raise
    return archive


def check_layout(data: bytes, entries: list, central: int) -> None:
    """Raise Inconsistent unless the members, read by their local headers, cover the bytes
    up to the central directory with nothing that looks like another local entry between."""
    position = None
    for entry in sorted(entries, key=lambda e: e.header_offset):
        start = entry.header_offset
        if position is not None and start < position:
            raise Inconsistent("overlapping or misplaced members (zip bomb construction)")
        _no_local_entry(data, 0 if position is None else position, start)
        position = _member_end(data, entry)
        if position > central:
            raise Inconsistent("overlapping or misplaced members (zip bomb construction)")
    _no_local_entry(data, 0 if position is None else position, central)


def _no_local_entry(data: bytes, start: int, end: int) -> None:
    if data.find(LOCAL, start, end) >= 0:
        raise Inconsistent("a local entry outside the central directory (content some extractors "
                           "take and this one does not)")


def _member_end(data: bytes, entry) -> int:
    """Where the member whose local header is at ``entry.header_offset`` ends (its data
    descriptor not counted: the gap check allows it), after checking that header."""
    start = entry.header_offset
    if data[start:start + 4] != LOCAL or len(data) < start + 30:
        raise Inconsistent("a member without its local header")
    flags, = struct.unpack_from("<H", data, start + 6)
    name_length, extra_length = struct.unpack_from("<HH", data, start + 26)
    name = data[start + 30:start + 30 + name_length]
    if name.decode("utf-8" if flags & 0x800 else "cp437", "replace") != entry.orig_filename:
        raise Inconsistent("a member named differently in its local header and in the central directory")
    if entry.is_dir() and (entry.compress_size or entry.file_size):
        raise Inconsistent("a directory entry that holds data")
    return start + 30 + name_length + extra_length + entry.compress_size


def members(data: bytes, most: int) -> Iterator:
    """The entries of the zip in ``data``; more than ``most`` declared is refused first."""
    declared = declared_entries(data)
    if declared is not None and declared > most:
        raise Inconsistent(f"{declared} members, more than max_members ({most})")
    with open_zip(data) as archive:
        entries = archive.infolist()
        if len(entries) > most:
            raise Inconsistent(f"{len(entries)} members, more than max_members ({most})")
        for entry in entries:
            yield archive, entry
