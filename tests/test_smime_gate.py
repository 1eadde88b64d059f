"""The smime filter through the real command line, delivering to a real SMTP server; check
and explain on S/MIME rule files."""

from __future__ import annotations

import json

import pytest

from conftest import crlf, run_gate
from support.smime_keys import openssl, pki, smime_message
from ispmailgate_filters.mime import Message

SENDER = "someone@a.example"
ORIGINAL = (b"From: Someone <someone@a.example>\nTo: user@b.example\nSubject: quarterly figures\n"
            b"Message-ID: <42@a.example>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
            b"Content-Transfer-Encoding: 8bit\n\nUmsatz: 1.000.000 \xe2\x82\xac\n")


@pytest.fixture(scope="module")
def keys():
    return pki()


def smime_config(config_file, sink, **options) -> str:
    lines = "".join(f"{key} = {json.dumps(str(value) if hasattr(value, 'parent') else value)}\n"
                    for key, value in options.items())
    return str(config_file(f'mail_host = "{sink.address}"\nloop_suffix = ""\npostmaster = "postmaster@b.example"\n'
                           f'default_filter = ["gw"]\n[filter.gw]\ntype = "smime"\n' + lines))


def from_wire(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def header(data: bytes, name: str) -> list[str]:
    return Message(from_wire(data)).headers.get_all(name)


def test_gateway_to_gateway_through_both_command_lines(keys, config_file, smtp_sink):
    sending = smime_config(config_file, smtp_sink, direction="pos", recipient_cert=keys.gateway_b.cert, sign=True,
                           key_file=keys.gateway_a.key, cert_file=keys.gateway_a.cert, cipher="aes256-gcm")
    run = run_gate(["-c", sending, "-f", SENDER, "user@b.example"], ORIGINAL)
    assert (run.code, run.stderr) == (0, "")
    [encrypted] = smtp_sink.messages
    assert header(encrypted.content, "X-ispMailGate-SMIME") == ["pos"] and b"Umsatz" not in encrypted.content
    receiving = smime_config(config_file, smtp_sink, direction="auto", recipient_cert=keys.gateway_a.cert,
                             key_file=keys.gateway_b.key, cert_file=keys.gateway_b.cert, trust_store=keys.trust_store)
    run = run_gate(["-c", receiving, "-f", SENDER, "user@b.example"], from_wire(encrypted.content))
    assert (run.code, run.stderr) == (0, "")
    decrypted = from_wire(smtp_sink.messages[1].content)
    assert header(decrypted, "X-ispMailGate-SMIME-Result") == ["decrypted; scope=message"]
    # signed by the gateway's certificate, which is not the author's address (RFC 8550)
    assert header(decrypted, "X-ispMailGate-SMIME-Signature") == [
        'untrusted; signer="gw@a.example"; reason="the certificate is not for the From address '
        'someone@a.example"; scope=message']
    signed = Message(decrypted).root
    assert signed.content_type == "multipart/signed"
    assert signed.children[0].decoded() == "Umsatz: 1.000.000 €\n".encode()


def test_per_recipient_certificates_make_delivery_groups(keys, config_file, smtp_sink, tmp_path):
    folder = tmp_path / "certs"
    folder.mkdir()
    for holder in (keys.alice, keys.bob):
        (folder / f"{holder.address}.pem").write_bytes(holder.cert.read_bytes())
    config = smime_config(config_file, smtp_sink, direction="pos", per_recipient=True, recipient_certs=folder)
    recipients = ["alice@b.example", "carol@b.example", "bob@b.example", "alice.smith@b.example"]
    run = run_gate(["-c", config, "-f", SENDER, *recipients], ORIGINAL)
    assert run.code == 0, run.stderr
    groups = {tuple(m.rcpt_tos): from_wire(m.content) for m in smtp_sink.messages}
    assert set(groups) == {("alice@b.example", "alice.smith@b.example"), ("bob@b.example",), ("carol@b.example",)}
    assert groups[("carol@b.example",)] == ORIGINAL                 # no certificate: in clear
    for rcpt, holder, other in (("alice@b.example", keys.alice, keys.bob), ("bob@b.example", keys.bob, keys.alice)):
        der = Message(next(data for group, data in groups.items() if rcpt in group)).root.decoded()
        plain = holder.decrypt(der, inform="DER")
        assert plain.returncode == 0 and b"Umsatz" in plain.stdout
        assert other.decrypt(der, inform="DER").returncode != 0
    explained = run_gate(["explain", "-c", config, "-f", SENDER, *recipients], b"")
    assert explained.code == 0, explained.stderr
    lines = explained.stdout.decode().splitlines()
    assert any(line.startswith("  gw: <alice@b.example>, <alice.smith@b.example>  (differs per recipient; "
                               "encrypted to ") and "alice@b.example" in line for line in lines), lines
    assert "  gw: <carol@b.example>  (differs per recipient; no certificate: on_missing_cert = clear)" in lines


def test_openssl_made_mail_is_decrypted_and_verified_on_the_command_line(keys, config_file, smtp_sink):
    content = b"Content-Type: text/plain\r\n\r\nsigned and sealed\r\n"
    signed = keys.alice.sign(content, detached=False)
    made = openssl("cms", "-encrypt", "-aes256", keys.gateway_b.cert, data=signed).stdout
    data = smime_message(made, b"From: alice@b.example\nTo: gw@b.example\nSubject: both\n")
    config = smime_config(config_file, smtp_sink, direction="neg", key_file=keys.gateway_b.key,
                          cert_file=keys.gateway_b.cert, trust_store=keys.trust_store)
    run = run_gate(["-c", config, "-f", SENDER, "gw@b.example"], data)
    assert (run.code, run.stderr) == (0, "")
    [delivered] = smtp_sink.messages
    assert header(delivered.content, "X-ispMailGate-SMIME-Result") == ["decrypted; scope=message"]
    assert header(delivered.content, "X-ispMailGate-SMIME-Signature") == [
        'good; signer="alice.smith@b.example, alice@b.example"; scope=message']
    assert from_wire(delivered.content).endswith(b"\n\nsigned and sealed\n")


def test_check_lists_key_and_certificate_problems(keys, config_file, smtp_sink, tmp_path):
    readable = tmp_path / "world-readable.key"
    readable.write_bytes(keys.gateway_b.key.read_bytes())
    readable.chmod(0o644)
    config = smime_config(config_file, smtp_sink, direction="neg", key_file=[str(readable), str(keys.gateway_a.key)],
                          cert_file=[str(keys.gateway_b.cert), str(keys.gateway_b.cert)],
                          trust_store=tmp_path / "no-such-ca.pem")
    run = run_gate(["check", "-c", config], b"")
    assert run.code == 78
    lines = run.stdout.decode().splitlines()
    assert f"{config}: filter.gw: key_file {readable} is readable by others: chmod o-r it" in lines
    assert (f"{config}: filter.gw: key_file {keys.gateway_a.key} does not belong to the certificate in "
            f"{keys.gateway_b.cert}") in lines
    assert (f"{config}: filter.gw: cannot read trust_store {tmp_path / 'no-such-ca.pem'}: No such file or "
            "directory") in lines


def test_missing_openssl_defers_and_sends_nothing(keys, config_file, smtp_sink):
    data = smime_message(keys.alice.sign(b"Content-Type: text/plain\r\n\r\nx\r\n"), b"From: alice@b.example\n")
    config = smime_config(config_file, smtp_sink, direction="neg", key_file=keys.gateway_b.key,
                          cert_file=keys.gateway_b.cert, trust_store=keys.trust_store,
                          openssl_binary="/nonexistent/openssl")
    run = run_gate(["-c", config, "-f", SENDER, "gw@b.example"], data)
    assert run.code == 75 and run.first_line.startswith("4.3.5 gw: smime: cannot run openssl"), run.stderr
    assert smtp_sink.messages == []


def test_already_encrypted_mail_passes_the_command_line_byte_for_byte(keys, config_file, smtp_sink):
    data = smime_message(openssl("cms", "-encrypt", "-aes256", keys.alice.cert,
                                 data=b"Content-Type: text/plain\r\n\r\nfor alice\r\n").stdout)
    config = smime_config(config_file, smtp_sink, direction="pos", recipient_cert=keys.gateway_b.cert)
    run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], data)
    assert run.code == 0, run.stderr
    assert smtp_sink.messages[-1].content == crlf(data)
