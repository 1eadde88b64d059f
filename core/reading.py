"""Reading the message: all of stdin, the mbox From_ line, where the top header block
ends, and the Message-ID for the log line -- each a linear scan, nothing parsed."""

from __future__ import annotations

import re
from typing import BinaryIO

from .status import EX_UNAVAILABLE, LOCAL_TROUBLE, TOO_BIG, TOO_BIG_FOR_GOOD, Stop, tempfail
from .text import one_line


def read_message(stream: BinaryIO, limit: int, on_oversize: str) -> bytearray:
    """All of stdin, in one buffer grown in place (no second copy of a large message)."""
    data = bytearray()
    try:
        while chunk := stream.read(1 << 20):
            data += chunk
            if len(data) > limit:
                if on_oversize == "reject":
                    raise Stop(EX_UNAVAILABLE, TOO_BIG_FOR_GOOD, f"message larger than {limit} bytes")
                raise tempfail(TOO_BIG, f"message larger than max_message_size ({limit} bytes)")
    except OSError as error:
        raise tempfail(LOCAL_TROUBLE, f"cannot read the message: {error}") from None
    return data


def split_from_line(data: bytearray) -> str | None:
    """Remove a leading mbox ``From sender date`` line; return it, or None if there is none."""
    if not data.startswith(b"From "):
        return None
    end = data.find(b"\n")
    end = len(data) if end < 0 else end + 1
    line = bytes(data[:end]).decode("utf-8", "surrogateescape")
    del data[:end]
    return line


def header_block_end(data: bytes | bytearray) -> int:
    """Where the top header block ends (after its blank line), by a linear scan."""
    ends = [found + len(blank) for blank in (b"\n\n", b"\n\r\n") if (found := data.find(blank)) >= 0]
    return min(ends, default=len(data))


_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(?:\r?\n[ \t]+)?([^\r\n]{0,200})", re.I | re.M)


def message_id_of(data: bytes | bytearray) -> str:
    """The Message-ID for the log line: one linear scan of the top header block, done as
    the message is read, so that no log line ever parses a header (after delivery, a slow
    parse would be work the time limit no longer bounds)."""
    match = _MESSAGE_ID.search(data, 0, header_block_end(data))
    return one_line(match.group(1).decode("utf-8", "surrogateescape"))[:200] or "-" if match else "-"
