"""What a mail reader takes out of a part besides its decoded body.

Scanning part by part must add to what a scanner sees of a message, never replace it: a
reader shows uuencoded files inside a text part as attachments (Thunderbird, Outlook),
and a part with two Content-Transfer-Encoding fields is decoded by some readers with the
first and by others with the last.  Each such view is handed to the scanner as an object
of its own, found in one pass over the part (linear in its size).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ..mime import Part, bare_head, decode_body, printable

# "begin MODE NAME" (RFC-less, as uuencode(1) writes it) and the "end" line after the data.
_BEGIN = re.compile(rb"^begin [0-7]{3,4} ([^\r\n]*?)[ \t]*\r?$", re.M)
_END = re.compile(rb"^end[ \t]*\r?$", re.M)
_DECODINGS = frozenset({"base64", "quoted-printable", "x-uuencode", "uuencode", "x-uue", "uue"})


def reader_views(part: Part, data: bytes) -> Iterator[tuple[str, bytes]]:
    """(label suffix, bytes) of what a reader may extract from ``part`` beyond ``data``, its
    body decoded as the parser reads it."""
    yield from _other_decodings(part)
    if part.content_type.startswith("text/"):
        yield from uuencoded(data)


def uuencoded(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Every uuencoded file in ``data``: (' > uuencoded "NAME"', its bytes)."""
    position = 0
    while (begin := _BEGIN.search(data, position)) is not None:
        end = _END.search(data, begin.end())
        stop = len(data) if end is None else end.end()
        name = printable(begin.group(1).decode("latin-1"), 120) or "(no name)"
        yield f' > uuencoded "{name}"', decode_body(data[begin.start():stop], "x-uuencode")
        position = stop


def _other_decodings(part: Part) -> Iterator[tuple[str, bytes]]:
    """The body decoded with each further Content-Transfer-Encoding field the part has."""
    seen = {part.transfer_encoding}
    for value in part.headers.get_all("Content-Transfer-Encoding")[1:]:
        encoding = bare_head(value).lower()
        if encoding in _DECODINGS and encoding not in seen:
            seen.add(encoding)
            yield f" (read as {encoding})", decode_body(part.body, encoding)
