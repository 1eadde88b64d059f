"""How a part packed by this program looks on the wire, and how neg finds and reads it back.

The marker at the top of the message, the label of a packed part (its new Content-* fields,
``X-ispMailGate-Packed`` and the record ``X-ispMailGate-Packed-Fields`` of the fields it
replaced), the walk that finds packed parts in either form (this program's, or the
original's: ``original.py``), and the exact re-encoding of a restored body.
"""

from __future__ import annotations

import re

from ..mime import Headers, Part, decode_body, encode_body, format_param, printable
from .original import PACKER_TYPE, PENCODING, UUENCODE, uuencoded
from .packing import BUILTIN_CODECS, UnpackError

MARKER = "X-ispMailGate-Packer"
PACKED = "X-ispMailGate-Packed"
PACKED_FIELDS = "X-ispMailGate-Packed-Fields"
REPLACED = ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition")
# a part's fields that say it is packed, and the form each set of them means
_TOP_MARKS = frozenset({MARKER.lower(), PACKER_TYPE.lower()})
_OWN = frozenset({PACKED.lower(), PACKED_FIELDS.lower()})
_ORIGINAL = frozenset({PENCODING.lower()})
PROTECTED = frozenset({"multipart/signed", "multipart/encrypted",
                       "application/pkcs7-mime", "application/x-pkcs7-mime"})
def label(part: Part, top: bool, codec: str, summary: str, recorded: bytes, *,
          transfer_encoding: str | None = "base64") -> None:
    """This program's packed form: the part labelled as the codec's file, what it was recorded."""
    suffix, media_type = BUILTIN_CODECS.get(codec, (f".{codec}", "application/octet-stream"))
    filename = printable(part.filename or "part") + suffix
    fields = [("Content-Type", f"{media_type}; {format_param('name', filename)}"),
              ("Content-Transfer-Encoding", transfer_encoding),
              ("Content-Disposition", f"attachment; {format_param('filename', filename)}")]
    for name, value in fields + ([("MIME-Version", "1.0")] if top else []):
        if value is not None:
            part.headers.set(name, value)
    part.headers.add(PACKED, summary, top=False)
    part.headers.add(PACKED_FIELDS, _chunked(recorded), top=False)


# -- walking the tree ---------------------------------------------------------------------

def leaves_outside_protected(part: Part, top: bool = True):
    """(leaf, is the top part of a message) for every leaf not inside signed or encrypted content."""
    if part.content_type in PROTECTED:
        return
    if part.is_leaf:
        yield part, top
        return
    for child in part.children:
        yield from leaves_outside_protected(child, part.is_message)


def packed_form(headers: Headers, protected: bool = False) -> str | None:
    """How a part says it is packed: "ispmailgate", "original", "unknown" (fields of a
    packer neither form writes), or None.  Inside signed or encrypted content only the
    original's form counts: it packed every leaf, this program never packs there."""
    names = {name.lower() for name in headers.names() if name.lower().startswith("x-ispmailgate-pack")}
    names -= _TOP_MARKS             # a message's marks, in the header of its only part
    if not names:
        return None
    if names == _ORIGINAL:
        return "original"
    if protected:
        return None
    return "ispmailgate" if names == _OWN else "unknown"


class Found:
    """A packed leaf and what restoring it needs to know about where it stands.
    (A plain class: a NamedTuple costs a fifth of a millisecond at import.)"""

    __slots__ = ("parent", "index", "part", "top", "form", "packer", "delimiters")

    def __init__(self, parent: Part | None, index: int, part: Part, top: bool, form: str,
                 packer: list[str], delimiters: tuple[bytes, ...]) -> None:
        self.parent = parent            # None: the message's own top part
        self.index = index
        self.part = part
        self.top = top                  # the top part of a message (its MIME-Version was recorded too)
        self.form = form                # see packed_form
        self.packer = packer            # X-IspMailGate-Packer-Type of the message it belongs to
        self.delimiters = delimiters    # "--boundary" of each multipart around it


def packed_parts(root: Part) -> list[Found]:
    """Every leaf that says it is packed, in order."""
    found = []
    stack = [(root, None, 0, True, (), False, [])]
    while stack:
        current, above, at, top, marks, protected, packer = stack.pop()
        if top:         # a message's own packer name, else the one around it
            packer = current.headers.get_all(PACKER_TYPE) or packer
        protected = protected or current.content_type in PROTECTED
        if current.is_leaf:
            form = packed_form(current.headers, protected)
            if form:
                found.append(Found(above, at, current, top, form, packer, marks))
            continue
        boundary = current.param("boundary") if current.is_multipart else None
        if boundary:
            marks = (*marks, b"--" + boundary.encode("utf-8", "surrogateescape"))
        stack.extend((child, current, i, current.is_message, marks, protected, packer)
                     for i, child in reversed(list(enumerate(current.children))))
    return found


def restored_body(data: bytes, encoding: str, eol: bytes, *, final_eol: bool,
                  filename: str | None = None, lf_text: bool = False) -> bytes:
    """Unpacked ``data`` written in the transfer encoding the part had.  ``lf_text``: 7bit
    and 8bit text was decoded on a host with LF line ends (the original's MIME-tools turned
    CRLF into LF), and gets the message's own line ends back."""
    if encoding in ("base64", "quoted-printable"):
        return exact_encoding(data, encoding, eol, final_eol=final_eol)
    if encoding in UUENCODE:
        encoded = uuencoded(data, filename, eol)
        return encoded if final_eol else without_last_eol(encoded)
    if lf_text and encoding in ("", "7bit", "8bit") and eol == b"\r\n":
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data


def refuse_delimiters(body: bytes, delimiters: tuple[bytes, ...]) -> None:
    """A restored body must not hold a delimiter line of a multipart around it (a line the
    parser would cut at): the next reader would see parts there that no filter of this run saw."""
    if not delimiters:
        return
    # "--" spelled out ahead of the alternatives: the search then skips to each line that
    # starts with it in C, instead of trying every alternative at every byte
    boundaries = b"|".join(re.escape(mark[2:]) for mark in delimiters)
    line = rb"--(?:" + boundaries + rb")(?:--)?[ \t\r]*(?:\n|\Z)"
    if re.match(line, body) or re.search(b"\n" + line, body):
        raise UnpackError("the unpacked body holds a delimiter line of the multipart around it")


def exact_encoding(data: bytes, encoding: str, eol: bytes, *, final_eol: bool = True) -> bytes:
    """``data`` in base64 or quoted-printable such that decoding gives back every byte.

    Quoted-printable written as text turns CRLF inside the data into the message's line
    ends; where that would change the data, line breaks are encoded (=0D=0A) instead.
    Without ``final_eol`` the last line end goes (the boundary line brings its own) — unless
    it was the data's own, as in a body that is one line break, or a CR at the very end.
    """
    if encoding == "base64":        # decodes to ``data`` by construction: nothing to check
        return encode_body(data, encoding, eol, final_eol=final_eol)
    encoded = encode_body(data, encoding, eol)
    if not final_eol:
        encoded = without_last_eol(encoded)
    # a bare CR at the end would join the boundary line's LF into one line end
    if decode_body(encoded, encoding) != data or (not final_eol and encoded.endswith(b"\r")):
        import binascii

        encoded = binascii.b2a_qp(data, istext=False).replace(b"\n", eol)
        if not final_eol:
            encoded = without_last_eol(encoded)
    return encoded


def without_last_eol(encoded: bytes) -> bytes:
    return encoded[:-2] if encoded.endswith(b"\r\n") else encoded.removesuffix(b"\n")


# -- the recorded fields -------------------------------------------------------------------

def recorded_fields(part: Part, top: bool) -> list[tuple[str, bytes]]:
    """The original Content-* fields pos recorded, checked before a byte of them is used.

    The record is in the message, so anybody can write one: only the replaced fields are
    accepted, once each, with no bare CR or NUL, in this message's line ends.
    """
    import base64
    import binascii

    text = "".join((part.headers.get(PACKED_FIELDS) or "").split())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UnpackError(f"{PACKED_FIELDS} is not valid base64") from None
    eol = part.headers.eol
    raw = raw.replace(b"\r\n", b"\n")
    if b"\r" in raw or b"\0" in raw or (raw and not raw.endswith(b"\n")):
        raise UnpackError(f"{PACKED_FIELDS} holds control characters or a cut field")
    raw = raw.replace(b"\n", eol)
    holder = Part.from_bytes(raw + eol)
    fields = holder.headers.fields()
    allowed = {name.lower() for name in ((*REPLACED, "MIME-Version") if top else REPLACED)}
    names = [name.lower() for name, _ in fields]
    if holder.body or set(names) - allowed or len(names) != len(set(names)):
        raise UnpackError(f"{PACKED_FIELDS} holds fields other than {', '.join(sorted(allowed))}")
    if holder.content_type.startswith(("multipart/", "message/")):     # read as a strict parser does
        raise UnpackError(f"a packed part cannot restore to a {holder.content_type.split('/')[0]} "
                          "(pos never packs one)")
    return fields


def _chunked(data: bytes) -> str:
    """Base64 in words of 64, so the header folds into short lines."""
    import base64

    text = base64.b64encode(data).decode("ascii")
    return " ".join(text[i:i + 64] for i in range(0, len(text), 64))
