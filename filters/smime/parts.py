"""S/MIME (RFC 8551) as MIME structure: recognise it, take it apart, build it.

No cryptography here.  What a part is, is decided by its content (the CMS content type
at the start of its data), not by the ``smime-type`` label a sender wrote; a signed
entity is taken as the raw bytes between the boundaries, never re-serialised.
"""

from __future__ import annotations

from collections.abc import Callable

from ..mime import Part, decode_body
from ..secure_mime import PKCS7_TYPES, canonical, cms_content_type

MARKER = "X-ispMailGate-SMIME"                  # pos: a gateway encrypted it; neg: decrypted
RESULT = "X-ispMailGate-SMIME-Result"           # decrypted / undecryptable, written on neg
SIGNATURE = "X-ispMailGate-SMIME-Signature"     # one per signature checked on neg
SIGNATURE_TYPES = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature"})
_SMIME_TYPE = {"enveloped-data": "enveloped-data", "authenveloped-data": "authEnveloped-data",
               "signed-data": "signed-data"}


class Malformed(ValueError):
    """An S/MIME structure that does not follow RFC 8551."""


def smime_kind(part: Part) -> str | None:
    """enveloped-data, authenveloped-data or signed-data for a leaf holding that CMS
    structure (application/pkcs7-mime, or a ``.p7m`` file); multipart/signed for an
    S/MIME multipart/signed; None for anything else."""
    if part.content_type == "multipart/signed":
        protocol = (part.param("protocol") or "").lower()
        return "multipart/signed" if protocol in SIGNATURE_TYPES else None
    if not part.is_leaf:
        return None
    if part.content_type not in PKCS7_TYPES and not (part.filename or "").lower().endswith(".p7m"):
        return None
    kind = cms_content_type(decode_body(part.body[:400], part.transfer_encoding))
    if kind == "signed-data" and (part.param("smime-type") or "").lower() == "certs-only":
        return None         # certificates handed over (RFC 8551 3.8): signed data that signs nothing
    return kind if kind in _SMIME_TYPE else None


def signed_content(part: Part) -> tuple[bytes, bytes]:
    """(the signed entity in canonical form, the DER signature) of an S/MIME multipart/signed."""
    if len(part.children) != 2 or part.children[1].content_type not in SIGNATURE_TYPES:
        raise Malformed("multipart/signed without exactly one entity and one application/pkcs7-signature")
    return canonical(part.children[0].to_bytes()), part.children[1].decoded()


# -- building ------------------------------------------------------------------------------------

def pkcs7_part(der: bytes, kind: str, eol: bytes) -> Part:
    """An application/pkcs7-mime entity carrying ``der`` (enveloped or opaque signed data)."""
    smime_type = _SMIME_TYPE[kind]
    description = "S/MIME signed message" if kind == "signed-data" else "S/MIME encrypted message"
    return Part.new([("Content-Type", f'application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"'),
                     ("Content-Disposition", 'attachment; filename="smime.p7m"'),
                     ("Content-Description", description)], der, eol=eol, encoding="base64")


def signed_multipart(entity: bytes, signature: bytes, micalg: str, eol: bytes,
                     parse: Callable[[bytes], Part]) -> Part:
    """An RFC 8551 multipart/signed: ``entity`` exactly as signed (``parse``: the message's
    own, within its limits), then the signature."""
    sig = Part.new([("Content-Type", 'application/pkcs7-signature; name="smime.p7s"'),
                    ("Content-Disposition", 'attachment; filename="smime.p7s"'),
                    ("Content-Description", "S/MIME cryptographic signature")], signature, eol=eol,
                   encoding="base64")
    part = Part.new_multipart("signed", [parse(entity), sig], eol=eol,
                              params=f'; protocol="application/pkcs7-signature"; micalg={micalg}')
    part.preamble = b"This is an S/MIME signed message (RFC 8551)" + eol
    return part
