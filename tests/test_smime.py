"""The smime filter with real openssl: what openssl makes is decrypted and verified, what
the filter makes openssl decrypts and verifies, and every way it can fail."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys

import pytest

from support.smime_keys import openssl, pki, smime_message
from ispmailgate_filters.base import ConfigError, Context, Envelope, FilterError, Reject, TempFail
from ispmailgate_filters.mime import Message
from ispmailgate_filters.smime import Smime

RESULT, SIGNATURE, MARKER = "X-ispMailGate-SMIME-Result", "X-ispMailGate-SMIME-Signature", "X-ispMailGate-SMIME"
CONTENT = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße, S/MIME\r\n".encode()
PLAIN = (b"From: Alice <alice@b.example>\nTo: gw@b.example\nSubject: plain\nMessage-ID: <1@b.example>\n"
         b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b\"\n\n--b\nContent-Type: text/plain\n\n"
         b"Hello,\nsee attached.\n--b\nContent-Type: application/octet-stream; name=\"x.bin\"\n"
         b"Content-Transfer-Encoding: base64\n\nAAECAwQFBgcICQ==\n--b--\n")


@pytest.fixture(scope="module")
def keys():
    return pki()


@pytest.fixture
def run(tmp_path):
    """One filter step on bytes, as the core runs it: -> (result bytes, message, notices)."""
    def run(step: Smime, data: bytes, recipients=("gw@b.example",), notices=None):
        message, notices = Message(data), [] if notices is None else notices
        ctx = Context(Envelope("someone@c.example", tuple(recipients)), message_id="TESTRUN",
                      log=logging.getLogger("ispmailgate.smime"), workdir=lambda: tmp_path,
                      postmaster="postmaster@b.example", notices=notices)
        step.process(message, ctx)
        return bytes(message.to_bytes()), message, notices
    return run


def smime(**options) -> Smime:
    return Smime.from_options({key: str(value) if hasattr(value, "parent") else value
                               for key, value in options.items()}, "filter.smime", "smime")


def receiving(keys, **options) -> Smime:
    """Gateway B: decrypts with its key, verifies against the test CA."""
    return smime(**{"direction": "neg", "key_file": keys.gateway_b.key, "cert_file": keys.gateway_b.cert,
                    "trust_store": keys.trust_store, **options})


def sending(keys, **options) -> Smime:
    """Gateway A: encrypts to gateway B's certificate, signs with its own key if asked."""
    return smime(**{"direction": "pos", "key_file": keys.gateway_a.key, "cert_file": keys.gateway_a.cert,
                    "recipient_cert": keys.gateway_b.cert, **options})


def field(data: bytes, name: str) -> list[str]:
    return Message(data).headers.get_all(name)


def entity(data: bytes) -> tuple[list[bytes], bytes]:
    """(Content-* fields, body) of a message: what goes inside and must come back."""
    root = Message(data).root
    return [raw for name, raw in root.headers.fields() if name.lower().startswith("content-")], root.body_bytes()


def from_alice(body: bytes) -> bytes:
    return smime_message(body, b"From: Alice <alice@b.example>\nTo: gw@b.example\nSubject: s/mime\n")


# -- what openssl makes, the filter reads ------------------------------------------------------------

@pytest.mark.parametrize("how", [["-aes256"], ["-aes128"], ["-aes-256-gcm"], ["-aes-128-gcm"], ["-des3"],
                                 ["-aes256", "-stream"]], ids=" ".join)
def test_enveloped_data_from_openssl_is_decrypted(keys, run, how):
    made = openssl("cms", "-encrypt", *how, keys.gateway_b.cert, data=CONTENT).stdout
    decrypted, message, notices = run(receiving(keys), smime_message(made))
    assert message.root.content_type == "text/plain" and message.root.decoded() == "Grüße, S/MIME\n".encode()
    assert field(decrypted, RESULT) == ["decrypted; scope=message"] and field(decrypted, MARKER) == ["neg"]
    assert field(decrypted, "Subject") == ["s/mime"] and notices == []


def test_several_keys_any_that_fits_decrypts(keys, run):
    """An EC key (openssl's key agreement) beside the RSA one: mail for either is read."""
    step = receiving(keys, key_file=[str(keys.gateway_b.key), str(keys.gateway_b_ec.key)],
                     cert_file=[str(keys.gateway_b.cert), str(keys.gateway_b_ec.cert)])
    for holder in (keys.gateway_b_ec, keys.gateway_b):
        made = openssl("cms", "-encrypt", "-aes256", holder.cert, data=CONTENT).stdout
        decrypted, message, _ = run(step, smime_message(made))
        assert field(decrypted, RESULT) == ["decrypted; scope=message"], holder
        assert message.root.decoded().endswith("S/MIME\n".encode())


def test_detached_signature_from_openssl_is_verified_and_kept(keys, run):
    data = from_alice(keys.alice.sign(CONTENT))
    verified, message, _ = run(receiving(keys), data)
    assert field(verified, SIGNATURE) == ['good; signer="alice.smith@b.example, alice@b.example"; scope=message']
    assert message.root.content_type == "multipart/signed"
    assert verified.endswith(data[data.index(b"MIME-Version"):])         # the signed message, byte for byte


@pytest.mark.parametrize("unwrap", [True, False])
def test_opaque_signed_data_from_openssl_is_verified(keys, run, unwrap):
    data = from_alice(keys.alice.sign(CONTENT, detached=False))
    verified, message, _ = run(receiving(keys, unwrap_opaque=unwrap), data)
    assert field(verified, SIGNATURE)[0].startswith('good; signer="alice.smith@b.example, alice@b.example"')
    if unwrap:
        assert message.root.content_type == "text/plain"
        assert message.root.decoded() == "Grüße, S/MIME\n".encode()
    else:
        assert message.root.content_type == "application/pkcs7-mime"


@pytest.mark.parametrize("detached", [True, False])
def test_signed_and_enveloped_from_openssl_is_decrypted_and_verified(keys, run, detached):
    signed = keys.alice.sign(CONTENT, detached=detached)
    made = openssl("cms", "-encrypt", "-aes256", keys.gateway_b.cert, data=signed).stdout
    decrypted, message, _ = run(receiving(keys), from_alice(made))
    assert field(decrypted, RESULT) == ["decrypted; scope=message"]
    assert field(decrypted, SIGNATURE) == ['good; signer="alice.smith@b.example, alice@b.example"; scope=message']
    assert b"Gr=C3=BC=C3=9Fe" in decrypted or "Grüße".encode() in decrypted or detached is False


def test_tampered_untrusted_expired_and_forged_senders(keys, run):
    step = receiving(keys)
    good = from_alice(keys.alice.sign(b"Content-Type: text/plain\r\n\r\nPay to IBAN DE00 1234\r\n"))
    tampered = good.replace(b"DE00 1234", b"DE66 6666")
    assert field(run(step, tampered)[0], SIGNATURE)[0].startswith("bad; reason=")
    stranger = smime_message(keys.outsider.sign(CONTENT), b"From: out@c.example\n")
    assert field(run(step, stranger)[0], SIGNATURE) == [
        'untrusted; signer="out@c.example"; reason="unable to get local issuer certificate"; scope=message']
    expired = smime_message(keys.expired.sign(CONTENT), b"From: old@b.example\n")
    assert field(run(step, expired)[0], SIGNATURE) == [
        'expired; signer="old@b.example"; reason="certificate has expired"; scope=message']
    forged = good.replace(b"From: Alice <alice@b.example>", b"From: CEO <ceo@b.example>")
    [verdict] = field(run(step, forged)[0], SIGNATURE)
    assert verdict.startswith('untrusted; signer="alice.smith@b.example, alice@b.example"; reason="the '
                              'certificate is not for the From address ceo@b.example"')
    assert field(run(receiving(keys, trust_store=""), good)[0], SIGNATURE)[0].startswith(
        'untrusted; signer="alice.smith@b.example, alice@b.example"; reason="no trust_store is configured"')


def test_a_certs_only_message_is_no_signature(keys, run):
    der = openssl("crl2pkcs7", "-nocrl", "-certfile", keys.alice.cert, "-outform", "DER").stdout
    data = (b"From: alice@b.example\nMIME-Version: 1.0\nContent-Type: application/pkcs7-mime; smime-type=certs-only;"
            b" name=smime.p7c\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(der))
    delivered, message, notices = run(receiving(keys), data)
    assert delivered == data and not message.changed and notices == []


def test_signature_without_the_signers_certificate_is_untrusted(keys, run):
    made = openssl("cms", "-sign", "-nocerts", "-signer", keys.alice.cert, "-inkey", keys.alice.key,
                   data=CONTENT).stdout
    [verdict] = field(run(receiving(keys), from_alice(made))[0], SIGNATURE)
    assert verdict == 'untrusted; reason="the signer\'s certificate is not in the message"; scope=message'


# -- what the filter makes, openssl reads ---------------------------------------------------------------

def p7m(message: Message) -> bytes:
    assert message.root.content_type == "application/pkcs7-mime"
    return message.root.decoded()


@pytest.mark.parametrize("cipher", ["aes256-cbc", "aes128-gcm", "aes256-gcm"])
def test_encrypted_output_decrypts_with_openssl(keys, run, cipher):
    encrypted, message, _ = run(sending(keys, cipher=cipher), PLAIN)
    assert message.root.param("smime-type") == ("enveloped-data" if cipher.endswith("cbc") else "authEnveloped-data")
    assert field(encrypted, MARKER) == ["pos"] and field(encrypted, "Subject") == ["plain"]
    assert b"see attached" not in encrypted and b"AAECAwQF" not in encrypted
    plain = keys.gateway_b.decrypt(p7m(message), inform="DER")
    assert plain.returncode == 0, plain.stderr
    fields, body = entity(PLAIN)
    assert plain.stdout == (b"".join(fields) + b"\n" + body).replace(b"\n", b"\r\n")     # canonical form
    assert keys.alice.decrypt(p7m(message), inform="DER").returncode != 0


@pytest.mark.parametrize("sign_format", ["detached", "opaque"])
def test_signed_output_verifies_with_openssl(keys, run, sign_format, tmp_path):
    original = PLAIN.replace(b"Hello,", "Grüß Gott,".encode())       # 8-bit text: signed as 7-bit
    signed, message, _ = run(sending(keys, encrypt=False, recipient_cert="", sign=True, sign_format=sign_format),
                             original)
    assert field(signed, MARKER) == []
    check = openssl("cms", "-verify", "-CAfile", keys.trust_store, "-no-CApath", "-no-CAstore", "-purpose",
                    "smimesign", data=signed.replace(b"\n", b"\r\n"), check=False)
    assert check.returncode == 0 and b"Verification successful" in check.stderr, check.stderr
    assert "Grüß Gott,".encode() in check.stdout or b"Gr=C3=BC=C3=9F Gott," in check.stdout
    if sign_format == "detached":
        assert message.root.content_type == "multipart/signed" and message.root.param("micalg") == "sha-256"
        assert message.root.children[0].to_bytes().isascii()


def test_signed_and_encrypted_output_reads_with_openssl(keys, run, tmp_path):
    encrypted, message, _ = run(sending(keys, sign=True, digest="sha512"), PLAIN)
    plain = keys.gateway_b.decrypt(p7m(message), inform="DER")
    assert plain.returncode == 0 and b"multipart/signed" in plain.stdout and b"micalg=sha-512" in plain.stdout
    check = openssl("cms", "-verify", "-CAfile", keys.trust_store, "-no-CApath", "-no-CAstore", data=plain.stdout,
                    check=False)
    assert check.returncode == 0, check.stderr
    assert b"see attached." in check.stdout


def test_round_trip_restores_the_original_entity_byte_for_byte(keys, run):
    for eol in (b"\n", b"\r\n"):
        original = PLAIN.replace(b"\n", eol)
        encrypted, _, _ = run(sending(keys), original)
        decrypted, _, _ = run(receiving(keys), encrypted)
        ours = b"".join(raw for name, raw in Message(decrypted).headers.fields() if name.lower().startswith("x-ispmailgate"))
        assert decrypted.replace(ours, b"", 1) == original


def test_signed_only_mail_is_encrypted_whole_with_its_signature_inside(keys, run):
    signed = from_alice(keys.alice.sign(CONTENT))
    encrypted, message, _ = run(sending(keys), signed)
    assert message.root.content_type == "application/pkcs7-mime"
    decrypted, message, _ = run(receiving(keys), encrypted)
    assert message.root.content_type == "multipart/signed"
    assert field(decrypted, SIGNATURE)[0].startswith("good; ")


# -- per recipient ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificates(keys, tmp_path_factory):
    """A folder of the recipients' certificates, and the same as one bundle."""
    folder = tmp_path_factory.mktemp("certs")
    for holder in (keys.alice, keys.bob, keys.expired):
        (folder / f"{holder.address}.pem").write_bytes(holder.cert.read_bytes())
    (folder / "README").write_text("not a certificate, not read\n")
    (folder / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    bundle = folder.parent / "bundle.pem"
    bundle.write_bytes(b"".join(holder.cert.read_bytes() for holder in (keys.alice, keys.bob)))
    return folder, bundle


def per_recipient(keys, certs, **options) -> Smime:
    return smime(**{"direction": "pos", "per_recipient": True, "recipient_certs": certs, **options})


def test_per_recipient_variants_follow_the_certificates(keys, certificates):
    from ispmailgate_filters.smime.credentials import fingerprint, read_certificates

    for certs in certificates:
        step = per_recipient(keys, certs)
        variants = {r: step.variant(r) for r in ("alice@b.example", "Alice.Smith@b.example", "bob@b.example",
                                                 "old@b.example", "carol@b.example")}
        alice, bob = (fingerprint(read_certificates(str(h.cert), "x")[0]) for h in (keys.alice, keys.bob))
        assert variants["alice@b.example"] == variants["Alice.Smith@b.example"] == alice
        assert variants["bob@b.example"] == bob
        assert variants["old@b.example"] == variants["carol@b.example"] == "no certificate"   # expired: none
        assert "encrypted to CN=alice" in step.explain(alice).replace("1.2.840.113549.1.9.1=alice@b.example,", "")
        assert step.explain("no certificate") == "no certificate: on_missing_cert = clear"


def test_per_recipient_encrypts_to_each_own_certificate(keys, run, certificates):
    step = per_recipient(keys, certificates[0])
    for holder, other in ((keys.alice, keys.bob), (keys.bob, keys.alice)):
        _, message, _ = run(step, PLAIN, recipients=(holder.address,))
        assert holder.decrypt(p7m(message), inform="DER").returncode == 0
        assert other.decrypt(p7m(message), inform="DER").returncode != 0
        assert message.headers.get_all(MARKER) == []            # not for a receiving gateway
    delivered, _, _ = run(step, PLAIN, recipients=("carol@b.example",))
    assert delivered == PLAIN                                    # no certificate: in clear
    with pytest.raises(Reject) as raised:
        run(per_recipient(keys, certificates[0], on_missing_cert="reject"), PLAIN, recipients=("carol@b.example",))
    assert raised.value.status == "5.7.5"
    with pytest.raises(TempFail):
        run(per_recipient(keys, certificates[0], on_missing_cert="tempfail"), PLAIN, recipients=("old@b.example",))


# -- never twice ------------------------------------------------------------------------------------------

def test_already_encrypted_mail_passes_byte_for_byte(keys, run):
    enveloped = smime_message(openssl("cms", "-encrypt", "-aes256", keys.alice.cert, data=CONTENT).stdout)
    der = openssl("cms", "-encrypt", "-aes256", "-outform", "DER", keys.alice.cert, data=CONTENT).stdout
    octet_p7m = (b"From: a@b.example\nMIME-Version: 1.0\nContent-Type: application/octet-stream; name=\"x.p7m\"\n"
                 b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(der))
    mislabelled = enveloped.replace(b"smime-type=enveloped-data", b"smime-type=signed-data")
    armor = (b"-----BEGIN PGP MESSAGE-----\n\nhQEMA5xlBw0W8nqLAQf/Yx1e\n=abcd\n-----END PGP MESSAGE-----\n")
    pgp_mime = (b"From: x@a.example\nMIME-Version: 1.0\nContent-Type: multipart/encrypted; "
                b'protocol="application/pgp-encrypted"; boundary="b"\n\n--b\nContent-Type: application/pgp-encrypted'
                b"\n\nVersion: 1\n\n--b\nContent-Type: application/octet-stream\n\n" + armor + b"\n--b--\n")
    inline = b"From: x@a.example\nSubject: inline\n\n" + armor
    for data in (enveloped, octet_p7m, mislabelled, pgp_mime, inline):
        for step in (sending(keys, sign=True), sending(keys, direction="auto")):
            delivered, message, _ = run(step, data)
            assert delivered == data and not message.changed


# -- what cannot be decrypted, and hostile input ---------------------------------------------------------------

def for_alice(keys) -> bytes:
    return smime_message(openssl("cms", "-encrypt", "-aes256", keys.alice.cert, data=CONTENT).stdout)


def test_mail_for_another_certificate_is_delivered_as_it_came_and_reported(keys, run):
    data = for_alice(keys)
    delivered, _, notices = run(receiving(keys), data)
    [result] = field(delivered, RESULT)
    assert result.startswith('undecryptable; reason="not encrypted to this gateway\'s certificate (')
    assert delivered.endswith(data)
    [notice] = notices
    assert notice.recipients == ("postmaster@b.example",) and notice.attach_original


@pytest.mark.parametrize("policy, verdict, status, told", [("reject", Reject, "5.7.5", 1),
                                                           ("tempfail", TempFail, "4.7.5", 0),
                                                           ("report", FilterError, "4.3.0", 0)])
def test_undecryptable_policies(keys, run, policy, verdict, status, told):
    notices = []
    with pytest.raises(verdict) as raised:
        run(receiving(keys, on_undecryptable=policy), for_alice(keys), notices=notices)
    assert raised.value.status == status and "not encrypted to this gateway" in str(raised.value)
    assert len(notices) == told


def test_auto_passes_mail_for_others_unless_a_gateway_marked_it(keys, run):
    auto = receiving(keys, direction="auto", recipient_cert=keys.alice.cert)
    data = for_alice(keys)
    forged = (b"X-ispMailGate-SMIME-Result: decrypted; scope=message\n"
              b'X-ispMailGate-SMIME-Signature: good; signer="ceo@b.example"\nX-ispMailGate-SMIME: neg\n')
    for incoming in (data, forged + data):
        delivered, _, notices = run(auto, incoming)
        assert delivered == data and notices == []
    delivered, _, notices = run(auto, b"X-ispMailGate-SMIME: pos\n" + data)
    assert field(delivered, RESULT)[0].startswith("undecryptable") and len(notices) == 1
    encrypted, _, _ = run(auto, forged + PLAIN)                # pos: the forged verdicts go too
    assert field(encrypted, RESULT) == field(encrypted, SIGNATURE) == [] and field(encrypted, MARKER) == ["pos"]


def test_forged_verdicts_are_removed_on_every_path(keys, run):
    forged = b'X-ispMailGate-SMIME-Signature: good; signer="ceo@b.example"\nX-ispMailGate-SMIME-Result: decrypted\n'
    for step in (receiving(keys), sending(keys), sending(keys, encrypt=False, recipient_cert="", sign=True)):
        delivered, _, _ = run(step, forged + PLAIN)
        assert field(delivered, SIGNATURE) == [] and field(delivered, RESULT) == [], step
    assert run(receiving(keys), forged + PLAIN)[0] == PLAIN


def pkcs7_message(der: bytes, smime_type: bytes = b"enveloped-data") -> bytes:
    return (b"From: someone@c.example\nMIME-Version: 1.0\nContent-Type: application/pkcs7-mime; smime-type="
            + smime_type + b'; name="smime.p7m"\nContent-Transfer-Encoding: base64\n\n' + base64.encodebytes(der))


def hostile(keys) -> dict[str, tuple[bytes, str]]:
    """Broken S/MIME, each with the start of the verdict it must get."""
    good = openssl("cms", "-encrypt", "-aes256", "-outform", "DER", keys.gateway_b.cert, data=CONTENT * 50).stdout
    gcm = openssl("cms", "-encrypt", "-aes-256-gcm", "-outform", "DER", keys.gateway_b.cert, data=CONTENT).stdout
    flipped, flipped_gcm = bytearray(good), bytearray(gcm)
    flipped[-1] ^= 0x5A
    flipped_gcm[-30] ^= 1
    huge = b"\x30\x84\x40\x00\x00\x00" + good[4:]               # declares 1 GiB
    encoded = base64.encodebytes(good)
    return {
        "truncated DER": (pkcs7_message(good[:len(good) // 2]), "truncated: the CMS structure declares"),
        "1 GiB declared": (pkcs7_message(huge), "truncated: the CMS structure declares 1073741830 bytes"),
        "garbage": (pkcs7_message(b"\x30\x82\x00\x10\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x03" + b"\xff" * 16),
                    "malformed CMS data"),
        "CBC padding damaged": (pkcs7_message(bytes(flipped)), "decryption failed"),
        "GCM tag fails": (pkcs7_message(bytes(flipped_gcm)), "decryption failed"),
        "truncated base64": (pkcs7_message(good).rsplit(b"\n", 30)[0][:-7] + b"\n", "truncated"),
        "BER, cut short": (pkcs7_message(openssl("cms", "-encrypt", "-aes256", "-stream", "-outform", "DER",
                                                 keys.gateway_b.cert, data=CONTENT).stdout[:300]), "malformed"),
    }


@pytest.mark.parametrize("name", ["truncated DER", "1 GiB declared", "garbage", "CBC padding damaged",
                                  "GCM tag fails", "truncated base64", "BER, cut short"])
def test_broken_smime_gets_a_clear_verdict_and_nothing_is_lost(keys, run, name):
    data, reason = hostile(keys)[name]
    delivered, _, notices = run(receiving(keys), data)
    [result] = field(delivered, RESULT)
    assert result.startswith(f'undecryptable; reason="{reason}'), result
    assert delivered.endswith(data) and len(notices) == 1


def test_broken_signatures_are_bad_not_a_crash(keys, run):
    signed = from_alice(keys.alice.sign(CONTENT))
    root = Message(signed).root
    sig = root.children[1].body
    for damage in (sig[:len(sig) // 3], b"bm90IERFUg==\n", b""):
        data = signed.replace(sig, damage)
        [verdict] = field(run(receiving(keys), data)[0], SIGNATURE)
        assert verdict.startswith("bad; reason="), verdict
    lonely = signed.replace(b"Content-Type: application/pkcs7-signature;", b"Content-Type: text/plain;")
    assert field(run(receiving(keys), lonely)[0], SIGNATURE)[0].startswith('bad; reason="multipart/signed without')


def test_too_large_data_is_not_decoded(keys, run):
    made = openssl("cms", "-encrypt", "-aes256", keys.gateway_b.cert, data=CONTENT * 2000).stdout
    delivered, _, _ = run(receiving(keys, max_size="10K"), smime_message(made))
    assert field(delivered, RESULT) == ['undecryptable; reason="larger than max_size (10240 bytes)"']


def test_nested_enveloped_part_beside_html_is_not_decrypted(keys, run):
    der = openssl("cms", "-encrypt", "-aes256", "-outform", "DER", keys.gateway_b.cert, data=CONTENT).stdout
    part = (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\n"
            b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(der))
    for sibling, decrypted in ((b"Content-Type: text/html\n\n<img src=\"http://evil.example/?", False),
                               (b"Content-Type: text/plain\n\n-- \nthe list footer", True)):
        data = (b"From: x@c.example\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"m\"\n\n--m\n"
                + part + b"--m\n" + sibling + b"\n--m--\n")
        delivered, _, _ = run(receiving(keys), data)
        [result] = field(delivered, RESULT)
        assert (result == "decrypted; scope=part") is decrypted and ("EFAIL" in result) is not decrypted


# -- the gateway's set-up ----------------------------------------------------------------------------------

def test_a_key_others_can_read_is_refused_group_may(keys, run, tmp_path):
    key = tmp_path / "gw-b.key"
    key.write_bytes(keys.gateway_b.key.read_bytes())
    made = smime_message(openssl("cms", "-encrypt", "-aes256", keys.gateway_b.cert, data=CONTENT).stdout)
    step = receiving(keys, key_file=key)
    for mode in (0o600, 0o640):
        key.chmod(mode)
        assert field(run(step, made)[0], RESULT) == ["decrypted; scope=message"]
        assert step.problems() == []
    key.chmod(0o644)
    with pytest.raises(TempFail, match="is readable by others: chmod o-r it") as raised:
        run(step, made)
    assert raised.value.status == "4.3.5"
    assert step.problems() == [f"key_file {key} is readable by others: chmod o-r it"]


def test_check_reports_what_is_wrong(keys, tmp_path, certificates):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("no certificate here\n")
    missing = tmp_path / "missing.pem"
    assert receiving(keys).problems() == [] and sending(keys, sign=True).problems() == []
    assert receiving(keys, key_file=missing).problems() == [f"cannot read key_file {missing}: No such file or directory"]
    assert receiving(keys, cert_file=keys.alice.cert).problems() == [
        f"key_file {keys.gateway_b.key} does not belong to the certificate in {keys.alice.cert}"]
    assert receiving(keys, trust_store=garbage).problems() == [
        f"trust_store {garbage} holds no PEM certificate (or a damaged one)"]
    [expired] = sending(keys, recipient_cert=keys.expired.cert).problems()
    assert expired.startswith(f"recipient_cert {keys.expired.cert}: ") and expired.endswith(
        "cannot be used: expired on 2021-01-01")
    [own] = receiving(keys, key_file=keys.expired.key, cert_file=keys.expired.cert).problems()
    assert own.endswith("cannot be used: expired on 2021-01-01")
    broken, store = per_recipient(keys, certificates[0]).problems()
    assert broken == f"recipient_certs file {certificates[0] / 'broken.pem'} holds no PEM certificate (or a damaged one)"
    assert "old@b.example" in store and store.endswith("cannot be used: expired on 2021-01-01")
    assert per_recipient(keys, tmp_path / "nowhere").problems() == [f"recipient_certs {tmp_path / 'nowhere'} does not exist"]
    assert receiving(keys, openssl_binary="/nonexistent/openssl").problems() == [
        "openssl (/nonexistent/openssl) not found: it verifies every signature, and does GCM and EC keys"]


def test_an_expired_gateway_certificate_holds_the_mail(keys, run):
    with pytest.raises(TempFail, match="cannot be used: expired on 2021-01-01"):
        run(sending(keys, recipient_cert=keys.expired.cert), PLAIN)


def test_missing_or_hung_openssl_tempfails_and_the_child_is_reaped(keys, run, tmp_path):
    signed = from_alice(keys.alice.sign(CONTENT))
    with pytest.raises(TempFail, match="cannot run openssl") as raised:
        run(receiving(keys, openssl_binary=str(tmp_path / "no-openssl")), signed)
    assert raised.value.status == "4.3.5"
    fake = tmp_path / "openssl"
    fake.write_text(f"#!{sys.executable}\nimport os, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
                    "time.sleep(60)\n")
    fake.chmod(0o755)
    with pytest.raises(TempFail, match="took longer than 1 s") as raised:
        run(receiving(keys, openssl_binary=str(fake), timeout=1), signed)
    assert raised.value.status == "4.4.7"
    pid = int((tmp_path / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}"), "the hung openssl was not killed and reaped"


@pytest.mark.parametrize("options, path", [
    ({"direction": "pos"}, "filter.smime.recipient_cert"),
    ({"recipient_cert": "/x.pem", "per_recipient": True, "recipient_certs": "/c"}, "filter.smime.per_recipient"),
    ({"per_recipient": True}, "filter.smime.recipient_certs"),
    ({"recipient_cert": "/x.pem", "recipient_certs": "/c"}, "filter.smime.recipient_certs"),
    ({"recipient_cert": "/x.pem", "sign": True}, "filter.smime.key_file"),
    ({"recipient_cert": "/x.pem", "key_file": ["/k1", "/k2"], "cert_file": "/c1"}, "filter.smime.cert_file"),
    ({"direction": "neg"}, "filter.smime.key_file"),
    ({"recipient_cert": "relative.pem"}, "filter.smime.recipient_cert"),
    ({"recipient_cert": "/x.pem", "cipher": "rc2-40"}, "filter.smime.cipher"),
    ({"recipient_cert": "/x.pem", "cipher": "des3"}, "filter.smime.cipher"),
    ({"direction": "pos", "encrypt": False}, "filter.smime.sign"),
])
def test_contradicting_options_are_config_errors(options, path):
    with pytest.raises(ConfigError) as raised:
        Smime.from_options(options, "filter.smime")
    assert raised.value.path == path


def test_cryptography_is_imported_lazily():
    probe = subprocess.run([sys.executable, "-c", "import sys, ispmailgate_filters.smime as s; "
                            "s.Smime.from_options({'recipient_cert': '/x.pem'}, 'f'); "
                            "print(any(m.startswith('cryptography') for m in sys.modules), 'subprocess' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["False", "False"]


def test_every_option_is_documented_and_the_example_loads():
    from ispmailgate_core import routing, rules
    from conftest import PROJECT, assert_documented

    assert_documented(Smime)
    config = rules.load_config(PROJECT / "examples" / "smime-gateway.toml")
    incoming, outgoing = config.filters["smime-in"], config.filters["smime-out"]
    assert incoming.direction == "neg" and len(incoming.key_file) == 2 and incoming.trust_store
    assert outgoing.per_recipient and outgoing.sign and outgoing.on_missing_cert == "clear"
    assert routing.route(config, "x@elsewhere.example", "alice@example-a.net").chain == (incoming,)
    assert routing.route(config, "alice@example-a.net", "bob@example-b.net").chain == (outgoing,)
