"""PGP/MIME (RFC 3156) and inline PGP as MIME structure: recognise, build, take apart.

No gpg here: this module decides what is encrypted already, cuts a message into the
headers that stay outside and the MIME entity that goes inside, and assembles
``multipart/encrypted`` and ``multipart/signed`` from bytes, so the entity a signature
covers is exactly the bytes between the boundaries.
"""

from __future__ import annotations

import re

from .mime import Headers, Part, decode_body, fold_field

MARKER = "X-ispMailGate-PGP"                    # pos: a gateway encrypted it; neg: decrypted
RESULT = "X-ispMailGate-PGP-Result"             # decrypted / undecryptable, written on neg
SIGNATURE = "X-ispMailGate-PGP-Signature"       # one per signature checked on neg
ENCRYPTED_PROTOCOL = "application/pgp-encrypted"
SIGNED_PROTOCOL = "application/pgp-signature"
MESSAGE_ARMOR = re.compile(r"^-----BEGIN PGP MESSAGE-----[ \t]*\r?\n.*?"
                           r"^-----END PGP MESSAGE-----[ \t]*(?:\r?\n|\Z)", re.M | re.S)
SIGNED_ARMOR = re.compile(rb"^-----BEGIN PGP SIGNED MESSAGE-----[ \t]*\r?\n.*?"
                          rb"^-----END PGP SIGNATURE-----[ \t]*$", re.M | re.S)
_BEGIN, _END = b"-----BEGIN PGP MESSAGE-----", b"-----END PGP MESSAGE-----"
_NOT_CONTENT = frozenset({"application/pgp-signature", "application/pkcs7-signature",
                          "application/x-pkcs7-signature", "application/pgp-keys"})
_PKCS7 = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
# DER of the CMS content-type OIDs: envelopedData, authEnvelopedData, signedData
_ENVELOPED = (bytes.fromhex("06092a864886f70d010703"), bytes.fromhex("060b2a864886f70d0109100117"))
_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
PGP_KINDS = frozenset({"PGP/MIME", "inline PGP", "OpenPGP binary"})
# First octet of a public-key or symmetric-key encrypted session key packet (RFC 4880 4.2)
_SESSION_KEY_PACKETS = frozenset({0x84, 0x85, 0x86, 0x87, 0x8C, 0x8D, 0x8E, 0x8F, 0xC1, 0xC3})


class Malformed(ValueError):
    """A PGP/MIME structure that does not follow RFC 3156."""


# -- what is encrypted already ------------------------------------------------------------

def already_encrypted(root: Part) -> frozenset[str]:
    """The kinds of encryption ``root`` is wrapped in; empty if any content is in the clear.

    Content is every leaf except signatures, attached public keys and blank parts: a
    message with an encrypted attachment beside a clear text is not encrypted.
    """
    kinds, stack = set(), [root]
    while stack:
        part = stack.pop()
        kind = encryption_kind(part)
        if kind:
            kinds.add(kind)
        elif not part.is_leaf:
            stack.extend(part.children)
        elif part.content_type not in _NOT_CONTENT and part.body.strip():
            return frozenset()
    return frozenset(kinds)


def encryption_kind(part: Part) -> str | None:
    """What kind of encrypted data ``part`` is, judged by its content as well as its labels."""
    content_type = part.content_type
    if content_type == "multipart/encrypted":
        return "PGP/MIME" if is_pgp_encrypted(part) else "multipart/encrypted"
    if not part.is_leaf:
        return None
    if content_type in _PKCS7:
        return "S/MIME enveloped data" if _smime_enveloped(part) else None
    head = _head(part)
    if head.startswith(_BEGIN) and (content_type.startswith("text/") or content_type in (
            "application/octet-stream", ENCRYPTED_PROTOCOL)) and part.decoded().rstrip().endswith(_END):
        return "inline PGP"
    name = (part.filename or "").lower()
    if name.endswith((".pgp", ".gpg")) and head[:1] and head[0] in _SESSION_KEY_PACKETS:
        return "OpenPGP binary"
    return None


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


def _head(part: Part, size: int = 4096) -> bytes:
    """The start of a leaf's decoded body, without decoding a large attachment whole."""
    return decode_body(part.body[:size], part.transfer_encoding).lstrip()


def _smime_enveloped(part: Part) -> bool:
    """The CMS content type decides; smime-type is only a label, trusted when there is none.

    In doubt the answer is no: encrypting twice costs the reader a step, passing clear
    content unencrypted costs the secret.
    """
    head = decode_body(part.body[:400], part.transfer_encoding)[:48]
    if any(oid in head for oid in _ENVELOPED):
        return True
    if _SIGNED_DATA in head:
        return False
    return (part.param("smime-type") or "").lower() in ("enveloped-data", "authenveloped-data")


# Types a mail reader may render as markup, which can load a URL made of what follows it
# (EFAIL's direct exfiltration): HTML and AMP for email, XML with its stylesheets, and every
# "+xml" type (XHTML, SVG, MathML ...); enriched text, which readers turn into HTML.
_MARKUP = frozenset({"text/html", "text/x-amp-html", "text/xml", "application/xml", "text/xsl",
                     "text/enriched", "text/richtext"})
_HIDING = ("multipart/", "message/rfc822", "message/global", "message/partial")


def may_render_as_markup(part: Part) -> bool:
    """A leaf a reader may render as markup, or one that may hide such a part from this
    parser (a multipart or message kept opaque past the parser's limits, a message/rfc822
    sent base64-encoded): what a reader renders counts, not what this gateway parsed."""
    content_type = part.content_type
    return (content_type in _MARKUP or content_type.endswith("+xml")
            or content_type.startswith(_HIDING))


def is_pgp_encrypted(part: Part) -> bool:
    return part.content_type == "multipart/encrypted" and \
        (part.param("protocol") or "").lower() == ENCRYPTED_PROTOCOL


def is_pgp_signed(part: Part) -> bool:
    return part.content_type == "multipart/signed" and (part.param("protocol") or "").lower() == SIGNED_PROTOCOL


def has_armor(part: Part) -> bool:
    """A text leaf with an inline PGP message or clearsigned text in it, or an armored file."""
    if not part.is_leaf or part.content_type in _NOT_CONTENT:
        return False
    data = part.decoded() if part.content_type.startswith("text/") else _head(part)
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
    if _BEGIN not in data:
        raise Malformed("second part of multipart/encrypted holds no PGP message")
    return data


def signed_content(part: Part) -> tuple[bytes, bytes]:
    """(the signed entity in canonical form, the signature) of a PGP multipart/signed.

    The entity is the raw bytes between the boundaries, never a re-serialisation.
    """
    if len(part.children) != 2 or part.children[1].content_type != SIGNED_PROTOCOL:
        raise Malformed("multipart/signed without exactly one entity and one application/pgp-signature")
    return canonical(part.children[0].to_bytes()), part.children[1].decoded()


def merge_decrypted(outer: Headers, inner: Part, eol: bytes) -> Part:
    """``inner`` (the decrypted entity) under the outer header fields, as the new message.

    The inner header fields take the place of the outer Content-* fields; an inner field
    whose name the outer header also has (protected headers) replaces the outer one.
    """
    inner_fields = inner.headers.fields()
    inner_names = {name.lower() for name, _ in inner_fields}
    kept, placed = [], False
    for name, raw in outer.fields():
        if name.lower().startswith("content-") or name.lower() in inner_names:
            if not placed:
                kept += inner_fields
                placed = True
            continue
        kept.append((name, raw))
    if not placed:
        kept += inner_fields
    inner.headers = Headers(kept, eol)
    inner.headers.dirty = True          # written anew; the body keeps its bytes
    inner.separator = inner.separator or eol
    return inner


# -- building PGP/MIME ------------------------------------------------------------------

def split_entity(root: Part, eol: bytes) -> tuple[list[tuple[str, bytes] | None], bytes]:
    """(the outer header fields, None where Content-Type goes; the MIME entity).

    The entity is the original's Content-* fields, a blank line and its body, byte for
    byte, so the whole original MIME entity travels inside.
    """
    outer, content = [], []
    for name, raw in root.headers.fields():
        if name.lower().startswith("content-"):
            if not content:
                outer.append(None)
            content.append(raw)
        else:
            outer.append((name, raw))
    if not content:
        outer.append(None)
    return outer, b"".join(content) + (root.separator or eol) + root.body_bytes()


Outer = list[tuple[str, bytes] | None]


def build_encrypted(outer: Outer, armor: bytes, eol: bytes) -> Part:
    """An RFC 3156 multipart/encrypted carrying ``armor``, under the outer header fields."""
    control = Part.new([("Content-Type", ENCRYPTED_PROTOCOL),
                        ("Content-Description", "PGP/MIME version identification")],
                       b"Version: 1\n", eol=eol, encoding="7bit")
    payload = Part.new([("Content-Type", 'application/octet-stream; name="encrypted.asc"'),
                        ("Content-Description", "OpenPGP encrypted message"),
                        ("Content-Disposition", 'inline; filename="encrypted.asc"')],
                       armor, eol=eol, encoding="7bit")
    return _outer_multipart(outer, "encrypted", [control, payload], f'; protocol="{ENCRYPTED_PROTOCOL}"',
                            b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)", eol)


def build_signed(outer: Outer, entity: bytes, signature: bytes, micalg: str, eol: bytes) -> Part:
    """An RFC 3156 multipart/signed: ``entity`` exactly as signed, then the signature."""
    sig = Part.new([("Content-Type", 'application/pgp-signature; name="signature.asc"'),
                    ("Content-Description", "OpenPGP digital signature"),
                    ("Content-Disposition", 'attachment; filename="signature.asc"')],
                   signature, eol=eol, encoding="7bit")
    return _outer_multipart(outer, "signed", [Part.from_bytes(entity), sig],
                            f'; micalg="{micalg}"; protocol="{SIGNED_PROTOCOL}"',
                            b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)", eol)


def _outer_multipart(outer: Outer, subtype: str, children: list[Part], params: str,
                     preamble: bytes, eol: bytes) -> Part:
    part = Part.new_multipart(subtype, children, eol=eol, params=params)
    has_version = any(field and field[0].lower() == "mime-version" for field in outer)
    fields = []
    for field in outer:
        if field is None:
            if not has_version:
                fields.append(("MIME-Version", fold_field("MIME-Version", "1.0", eol)))
            fields += part.headers.fields()
        elif not field[1].endswith(b"\n"):     # the last line of a message without a line end
            fields.append((field[0], field[1] + eol))
        else:
            fields.append(field)
    part.headers = Headers(fields, eol)
    part.preamble = preamble + eol
    return part


# -- line ends and transfer encodings -------------------------------------------------------

def canonical(data: bytes) -> bytes:
    """CRLF line ends, as RFC 3156 signs and encrypts (and as the SMTP wire carries it)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")      # 40x faster than re.sub


def native(data: bytes, eol: bytes) -> bytes:
    """Line ends as the message around it has them."""
    data = data.replace(b"\r\n", b"\n")
    return data if eol == b"\n" else data.replace(b"\n", eol)


def seven_bit(entity: bytes) -> bytes:
    """The entity with 8-bit leaves re-encoded (RFC 3156 5: signed data must be 7-bit safe)."""
    if entity.isascii():
        return entity
    root = Part.from_bytes(entity)
    for leaf in root.leaves():
        body = leaf.body
        if not body.isascii() and leaf.transfer_encoding not in ("base64", "quoted-printable"):
            text = leaf.content_type.startswith("text/")
            leaf.set_decoded(leaf.decoded(), "quoted-printable" if text else "base64")
    return root.to_bytes()
