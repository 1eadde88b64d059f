"""The original's wire format: what Mail::IspMailGate's Packer (1.1013) wrote and restores.

Its ``pos`` named the packer in the message's top header (``X-IspMailGate-Packer-Type:
gzip``, the name of a packer in its configuration, run as ``gzip -c`` / ``gzip -cd``) and,
once done, marked it ``X-ispMailGate-Packer: pos``.  Every leaf part's decoded body was
replaced by the packer's output, sent as base64 under the part's own Content-Type; the
part's old Content-Transfer-Encoding went into ``X-ispMailGate-Packer-PEncoding`` (base64
when it had none).  Its ``neg`` unpacks every leaf of a message naming one of its packers,
puts the transfer encoding back (base64 when the record is missing), and removes the
three fields.  It spelled the names inconsistently: they compare case-insensitively.

Its parser could not take an embedded message (it died on message/rfc822), and its
``neg`` fails a message in which any leaf is not packed, so a message is written in this
form whole or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..mime import Headers, Part, bare_head, fold_field, printable
from .packing import UnpackError

PACKER_TYPE = "X-IspMailGate-Packer-Type"
PENCODING = "X-ispMailGate-Packer-PEncoding"
UUENCODE = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})      # as mime.decode_body reads it
RESTORABLE = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable"}) | UUENCODE


def packer_name(values: list[str]) -> str:
    """The packer a message names in its X-IspMailGate-Packer-Type field(s)."""
    names = {bare_head(value).split(";", 1)[0].strip().lower() for value in values}
    if not names:
        raise UnpackError(f"{PACKER_TYPE} is missing: which packer packed it is unknown")
    if len(names) > 1:
        raise UnpackError(f"{PACKER_TYPE} fields disagree: {', '.join(sorted(map(printable, names)))}")
    [name] = names
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", name):
        raise UnpackError(f"{PACKER_TYPE} {printable(name)!r} is not a packer name")
    return name


def recorded_encoding(headers: Headers) -> str:
    """The transfer encoding a packed part had, as written in its record (base64 when the
    record is empty, as the original assumed); an encoding that cannot be restored is refused."""
    values = headers.get_all(PENCODING)
    if len(values) != 1:
        raise UnpackError(f"{len(values)} {PENCODING} fields in one part")
    written = bare_head(values[0]).split(";", 1)[0].strip() or "base64"
    if written.lower() not in RESTORABLE:
        raise UnpackError(f"{PENCODING} {printable(written)!r} is not a transfer encoding it can restore")
    return written


def restored_header(part: Part) -> bytes:
    """The part's header with the recorded transfer encoding back in place and the record gone."""
    written = recorded_encoding(part.headers)
    if part.content_type.startswith(("multipart/", "message/")):   # its data would become structure
        raise UnpackError(f"a packed {part.content_type.split('/')[0]} part cannot be restored "
                          "(its unpacked body would be parsed as parts)")
    eol = part.headers.eol
    pieces, placed = [], False
    for name, raw in part.headers.fields():
        key = name.lower()
        if key == "content-transfer-encoding" and not placed:
            pieces.append(fold_field(name, written, eol))
            placed = True
        elif key not in ("content-transfer-encoding", PENCODING.lower()):
            pieces.append(raw if raw.endswith(b"\n") else raw + eol)
    if not placed:
        pieces.append(fold_field("Content-Transfer-Encoding", written, eol))
    return b"".join(pieces)


def recorded_fields(part: Part, top: bool) -> bytes:
    """The fields this program's own form records for a part still packed the original's
    way: its Content-Type and Content-Disposition as they stand, the recorded encoding."""
    values = part.headers.get_all(PENCODING)
    written = (bare_head(values[0]).split(";", 1)[0].strip() if values else "") or "base64"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,39}", written):
        written = "x-unknown"           # recorded as refused: a later neg refuses it again
    fields = [part.headers.raw("Content-Type"),
              fold_field("Content-Transfer-Encoding", written, part.headers.eol),
              part.headers.raw("Content-Disposition"), part.headers.raw("MIME-Version") if top else None]
    return b"".join(raw if raw.endswith(b"\n") else raw + part.headers.eol for raw in fields if raw)


# -- writing ---------------------------------------------------------------------------------

def cannot_pack(root: Part, *, encodings: frozenset[str], protected: frozenset[str],
                packed: Callable[[Part], bool]) -> str | None:
    """Why this message cannot be written whole in the original's form; None when it can.
    ``packed`` tells a part that is packed already (in either form)."""
    if root.headers.get(PACKER_TYPE) is not None:
        return "it is packed already"
    for part in root.walk():
        if re.search(rb"\r(?!\n)", part.headers.to_bytes()):
            return "its header has lines that end in a lone CR, which parsers cut differently"
        content_type = part.content_type
        if content_type.startswith("message/") or part.is_message:
            return "it holds an embedded message, which the original's parser cannot take"
        if content_type in protected:
            return "it holds signed or encrypted content, which the original's round trip would alter"
        if not part.is_leaf:
            continue
        if content_type.startswith("multipart/"):
            return "it holds a multipart that could not be taken apart (the original would read it otherwise)"
        encodings_written = len(part.headers.get_all("Content-Transfer-Encoding"))
        if part.transfer_encoding not in encodings or encodings_written > 1:
            return f"a part's transfer encoding ({printable(part.transfer_encoding, 40)}) cannot be restored"
        if packed(part):
            return "it is packed already"
    return None


def mark_part(part: Part) -> None:
    """Header changes of a part packed the original's way (its body is set by the caller):
    the old transfer encoding recorded, base64 in its place, fields where the original put them."""
    old = part.headers.get("Content-Transfer-Encoding")
    written = bare_head(old).split(";", 1)[0].strip() if old is not None else ""
    if old is not None:
        part.headers.set("Content-Transfer-Encoding", "base64")
        part.headers.add(PENCODING, written or "base64", top=False)
    else:
        part.headers.add(PENCODING, "base64", top=False)
        part.headers.add("Content-Transfer-Encoding", "base64", top=False)
    if not part.separator:          # a header that was never ended: the body needs its blank line
        part.separator = part.headers.eol


def uuencoded(data: bytes, filename: str | None, eol: bytes) -> bytes:
    """``data`` as the original's MIME-tools wrote x-uuencode: a begin line with the part's
    file name, lines of 45 bytes, a "`" line and "end"."""
    import binascii

    name = re.sub(r"[^!-~]", "_", filename or "")[:200] or "part"
    lines = [b"begin 644 " + name.encode("ascii")]
    lines += [binascii.b2a_uu(data[i:i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    return eol.join([*lines, b"`", b"end", b""])
