"""PGP/MIME (RFC 3156) and inline PGP as MIME structure: recognise, build, take apart.

No gpg here: this module recognises PGP/MIME and inline PGP and assembles
``multipart/encrypted`` and ``multipart/signed`` from bytes, so the entity a signature
covers is exactly the bytes between the boundaries.  What smime needs as well (what is
encrypted already, the entity that goes inside, canonical form) is in :mod:`.secure_mime`.
"""

from __future__ import annotations

import re

from collections.abc import Callable

from ..mime import Part, decode_body
# What pgp shares with smime, re-exported for pgp's modules:
from ..secure_mime import (ENCRYPTED_PROTOCOL, NOT_CONTENT, PGP_KINDS, Outer, already_encrypted,  # noqa: F401
                          canonical, decoded_head, encryption_kind, is_pgp_encrypted, may_render_as_markup,
                          merge_decrypted, native, outer_multipart, seven_bit, split_entity)

MARKER = "X-ispMailGate-PGP"                    # pos: a gateway encrypted it; neg: decrypted
RESULT = "X-ispMailGate-PGP-Result"             # decrypted / undecryptable, written on neg
SIGNATURE = "X-ispMailGate-PGP-Signature"       # one per signature checked on neg
SIGNED_PROTOCOL = "application/pgp-signature"
MESSAGE_ARMOR = re.compile(r"^-----BEGIN PGP MESSAGE-----[ \t]*\r?\n.*?"
                           r"^-----END PGP MESSAGE-----[ \t]*(?:\r?\n|\Z)", re.M | re.S)
SIGNED_ARMOR = re.compile(rb"^-----BEGIN PGP SIGNED MESSAGE-----[ \t]*\r?\n.*?"
                          rb"^-----END PGP SIGNATURE-----[ \t]*$", re.M | re.S)


class Malformed(ValueError):
    """A PGP/MIME structure that does not follow RFC 3156."""


_BINARY_NAME = re.compile(r"\.(pgp|gpg)$", re.I)


def is_binary_pgp_file(part: Part) -> bool:
    """An attachment named ``.pgp``/``.gpg`` that starts with an OpenPGP session key packet
    (public-key or symmetric): what ``gpg --encrypt`` writes without ``--armor``."""
    if not part.is_leaf or not _BINARY_NAME.search(part.filename or ""):
        return False
    head = decode_body(part.body[:128], part.transfer_encoding)
    return bool(head) and _packet_tag(head[0]) in (1, 3)


def _packet_tag(first: int) -> int | None:
    """RFC 4880 4.2: the tag of a packet from its first byte, old or new format."""
    if not first & 0x80:
        return None
    return first & 0x3F if first & 0x40 else (first >> 2) & 0x0F


def is_pgp_signed(part: Part) -> bool:
    return part.content_type == "multipart/signed" and (part.param("protocol") or "").lower() == SIGNED_PROTOCOL


def has_armor(part: Part) -> bool:
    """A text leaf with an inline PGP message or clearsigned text in it, or an armored file."""
    if not part.is_leaf or part.content_type in NOT_CONTENT:
        return False
    data = part.decoded() if part.content_type.startswith("text/") else decoded_head(part)
    return b"-----BEGIN PGP MESSAGE-----" in data or b"-----BEGIN PGP SIGNED MESSAGE-----" in data


# -- taking PGP/MIME apart ------------------------------------------------------------------

def encrypted_payload(part: Part) -> bytes:
    """The armored data of a multipart/encrypted, if its structure is what RFC 3156 says."""
    if len(part.children) != 2:
        raise Malformed(f"multipart/encrypted with {len(part.children)} parts instead of 2")
    control, payload = part.children
    if control.content_type != ENCRYPTED_PROTOCOL:
        raise Malformed(f"first part of multipart/encrypted is {control.content_type}, "
                        f"not {ENCRYPTED_PROTOCOL}")
    if not re.search(rb"^Version:[ \t]*1[ \t]*\r?$", control.decoded(), re.M):
        raise Malformed("multipart/encrypted control part without 'Version: 1'")
    data = payload.decoded() if payload.is_leaf else b""
    if b"-----BEGIN PGP MESSAGE-----" not in data:
        raise Malformed("second part of multipart/encrypted holds no PGP message")
    return data


def signed_content(part: Part) -> tuple[bytes, bytes]:
    """(the signed entity in canonical form, the signature) of a PGP multipart/signed.

    The entity is the raw bytes between the boundaries, never a re-serialisation.
    """
    if len(part.children) != 2 or part.children[1].content_type != SIGNED_PROTOCOL:
        raise Malformed("multipart/signed without exactly one entity and one application/pgp-signature")
    return canonical(part.children[0].to_bytes()), part.children[1].decoded()


# -- building PGP/MIME ------------------------------------------------------------------

def build_encrypted(outer: Outer, armor: bytes, eol: bytes) -> Part:
    """An RFC 3156 multipart/encrypted carrying ``armor``, under the outer header fields."""
    control = Part.new([("Content-Type", ENCRYPTED_PROTOCOL),
                        ("Content-Description", "PGP/MIME version identification")],
                       b"Version: 1\n", eol=eol, encoding="7bit")
    payload = Part.new([("Content-Type", 'application/octet-stream; name="encrypted.asc"'),
                        ("Content-Description", "OpenPGP encrypted message"),
                        ("Content-Disposition", 'inline; filename="encrypted.asc"')],
                       armor, eol=eol, encoding="7bit")
    return outer_multipart(outer, "encrypted", [control, payload], f'; protocol="{ENCRYPTED_PROTOCOL}"',
                           b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)", eol)


def build_signed(outer: Outer, entity: bytes, signature: bytes, micalg: str, eol: bytes,
                 parse: Callable[[bytes], Part]) -> Part:
    """An RFC 3156 multipart/signed: ``entity`` exactly as signed (``parse``: the message's
    own, within its limits), then the signature."""
    sig = Part.new([("Content-Type", 'application/pgp-signature; name="signature.asc"'),
                    ("Content-Description", "OpenPGP digital signature"),
                    ("Content-Disposition", 'attachment; filename="signature.asc"')],
                   signature, eol=eol, encoding="7bit")
    return outer_multipart(outer, "signed", [parse(entity), sig],
                           f'; micalg="{micalg}"; protocol="{SIGNED_PROTOCOL}"',
                           b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)", eol)
