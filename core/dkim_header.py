"""The header block dkimpy is handed, looked at first: what it costs dkimpy, and whether it
reads the block as the receivers will.

dkimpy's work on a header block grows with the product of two counts: the h= names of a
signature times the fields it searches for each (``select_headers``), and the fold of an
h= tag that lists every instance of a signed field.  A block past :data:`MAX_FIELDS`
fields is never handed to it.

Readers disagree about odd header blocks, and a signature is only worth what the reader
the receiver shows takes it to cover.  dkimpy skips an mbox ``From `` line between fields
that ends the gate's header block, and keeps a bare CR inside a field where Python's
email starts a new one: ``From: a@example.com\\rFrom: b@bank.test`` is one From: to
dkimpy and to the gate, two to a mail reader.  Such a block is not signed at all.
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_FIELDS = 1000           # header fields dkimpy is handed (legitimate mail has some dozens)
MAX_SIGNED_NAMES = 200      # h= names of a signature the gate verifies (RFC 6376 5.4 lists ~30)
_LINE = re.compile(rb"[^\n]*\n?")
_FIELD = re.compile(rb"([\x21-\x7e]+?):")       # dkimpy's field name: up to the first colon


class Block(NamedTuple):
    """A wire form's header block as dkimpy reads it."""
    fields: int                 # header fields
    from_fields: int            # of them named From (any case), as dkimpy counts
    odd: str                    # why readers may disagree about it, or ""


def read_block(wire: bytes) -> Block:
    """Count and check the header block of a CRLF wire form, stopping at MAX_FIELDS + 1
    fields: the cost is linear in the block however it is built."""
    fields = from_fields = 0
    odd = ""
    for match in _LINE.finditer(wire):
        line = match.group(0).removesuffix(b"\n").removesuffix(b"\r")
        if not line or fields > MAX_FIELDS:
            break
        if b"\r" in line:
            odd = odd or "a bare CR in the header block (readers split fields there, dkimpy does not)"
        elif line[0] in (0x09, 0x20):
            odd = odd or ("" if fields else "a continuation line before the first header field")
        elif (name := _FIELD.match(line)) is not None:
            fields += 1
            from_fields += name.group(1).lower() == b"from"
        else:
            odd = odd or ("a line that is neither a header field nor a continuation "
                          f"({_shown(line)}): readers end the header there, dkimpy skips it")
    return Block(fields, from_fields, odd)


def _shown(line: bytes) -> str:
    text = line[:40].decode("ascii", "replace")
    return "".join(c if c.isprintable() else "?" for c in text) + ("..." if len(line) > 40 else "")
