"""What the encryption filters share: the MIME entity they protect, and what is encrypted already.

pgp (RFC 3156) and smime (RFC 8551) protect a message the same way: its own MIME entity
(its Content-* fields and body, byte for byte) goes inside in canonical CRLF form, the
other header fields stay outside, and a decrypted entity takes the place of the outer
Content-* fields.  Neither encrypts what is encrypted already, judged by content, not by
labels: PGP/MIME, inline PGP, binary OpenPGP attachments, S/MIME enveloped data.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Context, FilterError, Reject, TempFail
from .mime import Headers, Message, Part, decode_body, fold_field

ENCRYPTED_PROTOCOL = "application/pgp-encrypted"
PKCS7_TYPES = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
# Leaves that are no content of their own: signatures and attached public keys.
NOT_CONTENT = frozenset({"application/pgp-signature", "application/pkcs7-signature",
                         "application/x-pkcs7-signature", "application/pgp-keys"})
PGP_KINDS = frozenset({"PGP/MIME", "inline PGP", "OpenPGP binary"})
SMIME_KINDS = frozenset({"S/MIME enveloped data"})
_BEGIN, _END = b"-----BEGIN PGP MESSAGE-----", b"-----END PGP MESSAGE-----"
# First octet of a public-key or symmetric-key encrypted session key packet (RFC 4880 4.2)
_SESSION_KEY_PACKETS = frozenset({0x84, 0x85, 0x86, 0x87, 0x8C, 0x8D, 0x8E, 0x8F, 0xC1, 0xC3})
# The CMS content types (RFC 5652, 5083, 3274) by the DER contents of their OIDs
_CMS_TYPES = {bytes.fromhex("2a864886f70d010703"): "enveloped-data",
              bytes.fromhex("2a864886f70d0109100117"): "authenveloped-data",
              bytes.fromhex("2a864886f70d010702"): "signed-data",
              bytes.fromhex("2a864886f70d0109100109"): "compressed-data",
              bytes.fromhex("2a864886f70d010701"): "data"}
ENVELOPED = frozenset({"enveloped-data", "authenveloped-data"})


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
        elif part.content_type not in NOT_CONTENT and part.body.strip():
            return frozenset()
    return frozenset(kinds)


def encryption_kind(part: Part) -> str | None:
    """What kind of encrypted data ``part`` is, judged by its content as well as its labels."""
    content_type = part.content_type
    if content_type == "multipart/encrypted":
        return "PGP/MIME" if is_pgp_encrypted(part) else "multipart/encrypted"
    if not part.is_leaf:
        return None
    if content_type in PKCS7_TYPES:
        return "S/MIME enveloped data" if _smime_enveloped(part) else None
    head = decoded_head(part)
    if head.startswith(_BEGIN) and (content_type.startswith("text/") or content_type in (
            "application/octet-stream", ENCRYPTED_PROTOCOL)) and part.decoded().rstrip().endswith(_END):
        return "inline PGP"
    name = (part.filename or "").lower()
    if name.endswith((".pgp", ".gpg")) and head[:1] and head[0] in _SESSION_KEY_PACKETS:
        return "OpenPGP binary"
    if name.endswith(".p7m") and cms_content_type(head) in ENVELOPED:
        return "S/MIME enveloped data"
    return None


def is_pgp_encrypted(part: Part) -> bool:
    return part.content_type == "multipart/encrypted" and \
        (part.param("protocol") or "").lower() == ENCRYPTED_PROTOCOL


def decoded_head(part: Part, size: int = 4096) -> bytes:
    """The start of a leaf's decoded body, without decoding a large attachment whole."""
    return decode_body(part.body[:size], part.transfer_encoding).lstrip()


def cms_content_type(head: bytes) -> str | None:
    """The content type of the CMS ContentInfo whose first bytes (DER or BER) are ``head``:
    enveloped-data, authenveloped-data, signed-data, compressed-data, data; None if
    ``head`` does not start one.  Only the outer SEQUENCE's header and the OID after it
    are read."""
    if len(head) < 2 or head[0] != 0x30 or head[1] > 0x84:
        return None
    start = 2 + (head[1] & 0x7F if head[1] > 0x80 else 0)     # short, indefinite or long form
    if head[start:start + 1] != b"\x06" or len(head) < start + 2:
        return None
    return _CMS_TYPES.get(head[start + 2:start + 2 + head[start + 1]])


def _smime_enveloped(part: Part) -> bool:
    """The CMS content type decides; smime-type is only a label, trusted when there is none.

    In doubt the answer is no: encrypting twice costs the reader a step, passing clear
    content unencrypted costs the secret.
    """
    kind = cms_content_type(decode_body(part.body[:400], part.transfer_encoding))
    if kind is not None:
        return kind in ENVELOPED
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


# -- the protected entity -------------------------------------------------------------------

Outer = list[tuple[str, bytes] | None]


def split_entity(root: Part, eol: bytes) -> tuple[Outer, bytes]:
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


def outer_multipart(outer: Outer, subtype: str, children: list[Part], params: str,
                    preamble: bytes, eol: bytes) -> Part:
    """A new multipart/``subtype`` of ``children`` as the message, under the outer fields."""
    part = Part.new_multipart(subtype, children, eol=eol, params=params)
    part.preamble = preamble + eol
    return under_outer(outer, part, eol)


def under_outer(outer: Outer, part: Part, eol: bytes) -> Part:
    """``part`` as the message: its header fields where the Content-* fields stood, the
    outer fields around them, MIME-Version added if the outer fields have none."""
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
    part.headers.dirty = True
    return part


# -- line ends and transfer encodings -------------------------------------------------------

def canonical(data: bytes) -> bytes:
    """CRLF line ends, as RFC 3156 and 8551 sign and encrypt (and as the SMTP wire carries it)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")      # 40x faster than re.sub


def native(data: bytes, eol: bytes) -> bytes:
    """Line ends as the message around it has them."""
    data = data.replace(b"\r\n", b"\n")
    return data if eol == b"\n" else data.replace(b"\n", eol)


def seven_bit(entity: bytes, parse: Callable[[bytes], Part]) -> bytes:
    """The entity with 8-bit leaves re-encoded (RFC 3156 5, RFC 8551 3.1.1: data signed in
    a multipart/signed must be 7-bit safe, as no hop may re-encode it).  ``parse`` is the
    message's own (:meth:`Message.parse_again`, within its limits); a container it keeps
    opaque is left as it is (no transfer encoding may be put on a multipart)."""
    if entity.isascii():
        return entity
    root = parse(entity)
    for leaf in root.leaves():
        if leaf.content_type.startswith(("multipart/", "message/")):
            continue
        body = leaf.body
        if not body.isascii() and leaf.transfer_encoding not in ("base64", "quoted-printable"):
            text = leaf.content_type.startswith("text/")
            leaf.set_decoded(leaf.decoded(), "quoted-printable" if text else "base64")
    return root.to_bytes()


# -- verdict fields and what cannot be decrypted --------------------------------------------

def remove_verdicts(message: Message, ctx: Context, fields: tuple[str, ...], marker: str) -> None:
    """Remove the result ``fields`` a filter writes, and a ``marker`` saying "neg" (decrypted
    here), from a message as it arrived: first, on every path, so that no early return
    (mail encrypted to keys the gateway does not hold, mail that is passed as it is, mail
    sent in clear) can deliver a verdict the sender wrote."""
    headers = message.headers
    for name in fields:
        if headers.remove(name):
            ctx.log.warning("removed %s header fields the message brought along", name)
    if any(not value.strip().lower().startswith("pos") for value in headers.get_all(marker)):
        headers.remove(marker)
        ctx.log.warning("removed an %s header field that did not say pos (only this gateway "
                        "says neg)", marker)


def unparsed_incoming(message: Message, ctx: Context, policy: str, result: str, traces: str, kind: str) -> None:
    """Decrypting or verifying a message the parser gave up on: its parts cannot be found,
    so what looks like ``kind`` in it (the regular expression ``traces``) is undecryptable
    and follows ``policy``; a message with no trace of it has nothing to decrypt."""
    import re

    if re.search(traces.encode("ascii"), bytes(message.to_bytes()), re.IGNORECASE):
        follow_undecryptable(policy, f"the message cannot be parsed ({message.unparsed}): the {kind} in it "
                             "cannot be found", message, ctx, result)
    else:
        ctx.log.info("the message cannot be parsed, and nothing in it looks like %s", kind)


def follow_undecryptable(policy: str, reasons: str, message: Message, ctx: Context, result: str) -> None:
    """What ``on_undecryptable`` says for data the gateway could not decrypt: deliver (with
    a ``result`` field; the postmaster told), report, reject (the postmaster told), tempfail."""
    if policy == "tempfail":        # no report: it would go out again on every retry
        raise TempFail(f"cannot decrypt: {reasons}", "4.7.5")
    if policy == "report":          # the core sends the original to the postmaster
        raise FilterError(f"cannot decrypt: {reasons}")
    if policy == "reject":
        _tell_postmaster(ctx, reasons, "It was rejected (on_undecryptable = \"reject\"), "
                                       "so the sender gets a bounce")
        raise Reject(f"cannot decrypt: {reasons}", "5.7.5")
    ctx.log.warning("not decrypted, delivered as it came: %s", reasons)
    message.headers.add(result, 'undecryptable; reason="%s"' % reasons.replace('"', "'"))
    _tell_postmaster(ctx, reasons, "It was delivered as it came (on_undecryptable = \"deliver\")")


def _tell_postmaster(ctx: Context, reasons: str, outcome: str) -> None:
    envelope = ctx.envelope
    ctx.notify([ctx.postmaster], "ispmailgate: encrypted message not decrypted",
               f"ispmailgate could not decrypt message {ctx.message_id}\n"
               f"from <{envelope.sender}> to {', '.join(envelope.recipients)}:\n\n  {reasons}\n\n"
               f"{outcome}; the original is attached.\n", attach_original=True)
