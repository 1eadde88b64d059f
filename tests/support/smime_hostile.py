"""Hostile S/MIME for the property tests and the fuzz target: CMS structures that lie about
their length, carry the wrong content type, are cut short or damaged, in every place
S/MIME can stand in a message.  And the rule file that runs both directions of smime."""

from __future__ import annotations

import base64

from hypothesis import strategies as st

# smime both ways for c@d.example: decrypt and verify with gateway B's key, then encrypt
# (signed, opaque) to alice's certificate.  {keys} is filled in with smime_rules().
SMIME_RULES = """
default_filter = ["smime-in", "smime-out"]
[filter.smime-in]
type = "smime"
direction = "neg"
key_file = ["{gateway_b.key}", "{gateway_b_ec.key}"]
cert_file = ["{gateway_b.cert}", "{gateway_b_ec.cert}"]
trust_store = "{trust_store}"
max_size = "1M"
[filter.smime-out]
type = "smime"
direction = "pos"
recipient_cert = "{alice.cert}"
sign = true
sign_format = "opaque"
key_file = "{gateway_a.key}"
cert_file = "{gateway_a.cert}"
"""

OIDS = [bytes.fromhex(oid) for oid in ("2a864886f70d010703", "2a864886f70d0109100117", "2a864886f70d010702",
                                       "2a864886f70d0109100109", "2a864886f70d010701", "2a864886f70d01070a", "")]
LENGTHS = st.sampled_from(["exact", "huge", "indefinite", "short", "long form", "nonsense"])


def smime_rules(keys) -> str:
    """SMIME_RULES for the keys of a smime_keys.Pki."""
    return SMIME_RULES.format(gateway_a=keys.gateway_a, gateway_b=keys.gateway_b, gateway_b_ec=keys.gateway_b_ec,
                              alice=keys.alice, trust_store=keys.trust_store)


def real_structures(keys) -> list[bytes]:
    """Real DER made by openssl: enveloped (CBC, GCM, to an EC key), signed, opaque signed."""
    from support.smime_keys import openssl

    content = b"Content-Type: text/plain\r\n\r\nreal content\r\n"
    made = [openssl("cms", "-encrypt", *cipher, "-outform", "DER", "-binary", holder.cert, data=content).stdout
            for cipher, holder in ((["-aes256"], keys.gateway_b), (["-aes-256-gcm"], keys.gateway_b),
                                   (["-aes128"], keys.gateway_b_ec), (["-aes256", "-stream"], keys.gateway_b))]
    for detached in ([], ["-nodetach"]):
        made.append(openssl("cms", "-sign", "-outform", "DER", "-binary", "-signer", keys.alice.cert, "-inkey",
                            keys.alice.key, *detached, data=content).stdout)
    return made


def _length(draw, size: int) -> bytes:
    form = draw(LENGTHS)
    if form == "exact":
        return bytes([size]) if size < 128 else b"\x82" + size.to_bytes(2, "big")
    if form == "huge":                  # 1 GiB and more, declared
        return b"\x84" + draw(st.integers(1 << 30, (1 << 32) - 1)).to_bytes(4, "big")
    if form == "indefinite":
        return b"\x80"
    if form == "short":
        return bytes([draw(st.integers(0, max(0, min(size - 1, 127))))])
    if form == "long form":
        return b"\x83" + draw(st.integers(0, 1 << 24)).to_bytes(3, "big")
    return bytes([draw(st.integers(0x85, 0xFF))])


@st.composite
def cms_blob(draw, real: list[bytes] = ()) -> bytes:
    """A CMS ContentInfo that may lie: a real one damaged, or one made up."""
    if real and draw(st.booleans()):
        data = bytearray(draw(st.sampled_from(real)))
        for _ in range(draw(st.integers(0, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)
    oid = draw(st.sampled_from(OIDS))
    inner = draw(st.binary(max_size=120))
    body = b"\x06" + bytes([len(oid)]) + oid + b"\xa0" + _length(draw, len(inner)) + inner
    return b"\x30" + _length(draw, len(body)) + body


def _encoded(draw, der: bytes) -> tuple[bytes, bytes]:
    how = draw(st.sampled_from(["base64", "cut base64", "binary", "bad base64"]))
    if how == "binary":
        return b"binary", der
    text = base64.encodebytes(der)
    if how == "cut base64":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "bad base64":
        text = text.replace(b"A", b"*").replace(b"=", b"")
    return b"base64", text


@st.composite
def smime_message(draw, real: list[bytes] = ()) -> bytes:
    """A message with hostile S/MIME where a reader would look for it."""
    encoding, body = _encoded(draw, draw(cms_blob(real)))
    label = draw(st.sampled_from([b"enveloped-data", b"signed-data", b"authEnveloped-data", b"", b"certs-only"]))
    mime = draw(st.sampled_from([b"application/pkcs7-mime", b"application/x-pkcs7-mime",
                                 b"application/octet-stream; name=x.p7m"]))
    leaf = (b"Content-Type: " + mime + b"; smime-type=" + label + b"\nContent-Transfer-Encoding: " + encoding
            + b"\n\n" + body)
    head = b"From: " + draw(st.sampled_from([b"alice@b.example", b"x@y", b"", b"=?utf-8?q?=00?="])) + b"\n"
    shape = draw(st.sampled_from(["whole", "signed", "beside html", "beside text"]))
    if shape == "whole":
        return head + b"MIME-Version: 1.0\n" + leaf
    if shape == "signed":
        encoding, signature = _encoded(draw, draw(cms_blob(real)))
        return (head + b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=s\n\n'
                b"--s\n" + leaf + b"\n--s\nContent-Type: application/pkcs7-signature\nContent-Transfer-Encoding: "
                + encoding + b"\n\n" + signature + b"\n--s--\n")
    sibling = b"text/html\n\n<img src=\"http://x/?" if shape == "beside html" else b"text/plain\n\nfooter"
    return (head + b"Content-Type: multipart/mixed; boundary=m\n\n--m\n" + leaf + b"\n--m\nContent-Type: "
            + sibling + b"\n--m--\n")
