"""The pgp filter through the real command line, delivering to a real SMTP server."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import CORPUS, crlf, run_gate, run_inline, without_from_line
from support.pgp_keys import GpgHome, World
from ispmailgate_filters.mime import Message

SENDER = "someone@a.example"


@pytest.fixture(scope="module")
def world():
    keys = World()
    yield keys
    keys.close()


def toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml(k)} = {toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value, ensure_ascii=False)


def pgp_config(config_file, sink, home, **options) -> str:
    lines = "".join(f"{key} = {toml(value)}\n" for key, value in options.items())
    return str(config_file(f'mail_host = "{sink.address}"\nloop_suffix = ""\npostmaster = "postmaster@b.example"\n'
                           f'default_filter = ["gw"]\n[filter.gw]\ntype = "pgp"\ngnupghome = "{home}"\n' + lines))


def passphrase_table(config_file, sink, home, **options) -> str:
    path = pgp_config(config_file, sink, home, **options)
    with open(path, "a") as out:
        out.write(f'[filter.gw.passphrases]\n"gw@b.example" = {toml(World.B_PASSPHRASE)}\n')
    return path


def from_wire(data: bytes) -> bytes:
    """What the next MTA's pipe hands the receiving gateway: LF line ends."""
    return data.replace(b"\r\n", b"\n")


def header(data: bytes, name: str) -> list[str]:
    return Message(from_wire(data)).headers.get_all(name)


def test_gateway_to_gateway_through_both_command_lines(world, config_file, smtp_sink, tmp_path):
    original = without_from_line((CORPUS / "two-images.eml").read_bytes())
    sending = pgp_config(config_file, smtp_sink, world.sending, direction="pos", uid=World.B_UID, sign=True)
    run = run_gate(["-c", sending, "-f", SENDER, "user@b.example"], original)
    assert (run.code, run.stderr) == (0, "")            # nothing from gpg or python-gnupg on stderr
    [encrypted] = smtp_sink.messages
    assert header(encrypted.content, "X-ispMailGate-PGP") == ["pos"]
    assert b"R0lGODlh" not in encrypted.content and b"multipart/encrypted" in encrypted.content
    receiving = passphrase_table(config_file, smtp_sink, world.receiving, direction="auto", uid=World.A_UID)
    run = run_gate(["-c", receiving, "-f", SENDER, "user@b.example"], from_wire(encrypted.content))
    assert (run.code, run.stderr) == (0, "")
    decrypted = smtp_sink.messages[1].content
    assert header(decrypted, "X-ispMailGate-PGP") == ["neg"]
    assert header(decrypted, "X-ispMailGate-PGP-Signature")[0].startswith(f"good; key={world.a[-16:]}")
    ours = b"".join(raw for name, raw in Message(from_wire(decrypted)).headers.fields()
                    if name.lower().startswith("x-ispmailgate-pgp"))
    assert from_wire(decrypted).replace(ours, b"", 1) == original
    assert World.B_PASSPHRASE not in (tmp_path / "gate.log").read_text()


def test_per_recipient_keys_make_delivery_groups(world, config_file, smtp_sink):
    original = (CORPUS / "plain.eml").read_bytes()
    config = pgp_config(config_file, smtp_sink, world.sending, direction="pos", per_recipient=True)
    recipients = ["alice@b.example", "carol@b.example", "bob@b.example", "alice.smith@b.example"]
    run = run_gate(["-c", config, "-f", SENDER, *recipients], original)
    assert run.code == 0, run.stderr
    groups = {tuple(m.rcpt_tos): from_wire(m.content) for m in smtp_sink.messages}
    assert set(groups) == {("alice@b.example", "alice.smith@b.example"), ("bob@b.example",), ("carol@b.example",)}
    assert groups[("carol@b.example",)] == original             # no key: in clear (on_missing_key)
    for rcpt, home, passphrase, other in (("alice@b.example", world.alice, "", world.bob),
                                          ("bob@b.example", world.bob, World.BOB_PASSPHRASE, world.alice)):
        data = next(data for group, data in groups.items() if rcpt in group)
        armor = Message(data).root.children[1].decoded()
        assert home.decrypt(armor, passphrase).returncode == 0
        assert b"No secret key" in other.decrypt(armor, World.BOB_PASSPHRASE).stderr
        assert header(data, "X-ispMailGate-PGP") == []          # not for a receiving gateway


def test_recipient_without_key_rejected_or_deferred(world, config_file, smtp_sink):
    original = (CORPUS / "plain.eml").read_bytes()
    config = pgp_config(config_file, smtp_sink, world.sending, direction="pos", per_recipient=True,
                        on_missing_key="reject")
    run = run_inline(["-c", config, "-f", SENDER, "alice@b.example", "carol@b.example"], original)
    assert run.code == 0, run.stderr
    delivered, bounce = smtp_sink.messages
    assert delivered.rcpt_tos == ["alice@b.example"] and b"multipart/encrypted" in delivered.content
    assert bounce.rcpt_tos == [SENDER] and b"5.7.5" in bounce.content and b"carol@b.example" in bounce.content
    config = pgp_config(config_file, smtp_sink, world.sending, direction="pos", per_recipient=True,
                        on_missing_key="tempfail")
    run = run_inline(["-c", config, "-f", SENDER, "alice@b.example", "carol@b.example"], original)
    assert run.code == 75 and run.first_line.startswith("4.7.5 ")
    assert len(smtp_sink.messages) == 2                         # nothing more delivered


def smime(tmp_path, operation: str) -> bytes:
    """A real S/MIME message made by openssl: enveloped (encrypted) or opaque signed data."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-subj", "/CN=user@b.example", "-days", "2"], check=True, capture_output=True)
    content = tmp_path / "content"
    content.write_bytes(b"Content-Type: text/plain\n\nS/MIME content\n")
    args = ["-encrypt", "-aes256", "-in", str(content), str(cert)] if operation == "encrypt" else \
        ["-sign", "-nodetach", "-signer", str(cert), "-inkey", str(key), "-in", str(content)]
    made = subprocess.run(["openssl", "cms", *args], check=True, capture_output=True)
    return b"From: someone@a.example\nTo: user@b.example\nSubject: s/mime\n" + made.stdout.replace(b"\r\n", b"\n")


def test_encrypted_mail_passes_pos_byte_identical(world, config_file, smtp_sink, tmp_path):
    armor = world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nfor B\r\n", "gw@b.example")
    messages = {
        "PGP/MIME": (b"From: x@a.example\nTo: user@b.example\nMIME-Version: 1.0\nContent-Type: "
                     b'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"\n\n--b\n'
                     b"Content-Type: application/pgp-encrypted\n\nVersion: 1\n\n--b\n"
                     b"Content-Type: application/octet-stream\n\n" + armor + b"\n--b--\n"),
        "inline PGP": b"From: x@a.example\nTo: user@b.example\nSubject: inline\n\n" + armor,
        "S/MIME enveloped data": smime(tmp_path, "encrypt"),
    }
    config = pgp_config(config_file, smtp_sink, world.sending, direction="pos", uid=World.B_UID, sign=True)
    for kind, data in messages.items():
        run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], data)
        assert run.code == 0, run.stderr
        assert smtp_sink.messages[-1].content == crlf(data), kind
        assert f"not encrypted again: already {kind}" in (tmp_path / "gate.log").read_text()


def test_smime_signed_only_mail_is_encrypted_whole(world, config_file, smtp_sink, tmp_path):
    data = smime(tmp_path, "sign")
    assert b"signed-data" in data
    config = pgp_config(config_file, smtp_sink, world.sending, direction="pos", uid=World.B_UID)
    run = run_inline(["-c", config, "-f", SENDER, "user@b.example"], data)
    assert run.code == 0, run.stderr
    armor = Message(from_wire(smtp_sink.messages[0].content)).root.children[1].decoded()
    plain = world.receiving.decrypt(armor, World.B_PASSPHRASE)
    assert plain.returncode == 0 and b"application/pkcs7-mime" in plain.stdout


def test_wrong_passphrase_defers_and_says_why(world, config_file, smtp_sink, tmp_path):
    sending = pgp_config(config_file, smtp_sink, world.sending, direction="pos", uid=World.B_UID)
    assert run_inline(["-c", sending, "-f", SENDER, "user@b.example"], (CORPUS / "plain.eml").read_bytes()).code == 0
    encrypted = from_wire(smtp_sink.messages.pop().content)
    receiving = pgp_config(config_file, smtp_sink, world.receiving, direction="neg",
                           passphrases={"gw@b.example": "not the passphrase"})
    run = run_gate(["-c", receiving, "-d", "-f", SENDER, "user@b.example"], encrypted)
    assert run.code == 75 and run.first_line.startswith("4.7.5 gw: pgp: wrong or missing passphrase for key")
    assert smtp_sink.messages == []
    assert "not the passphrase" not in (tmp_path / "gate.log").read_text() + run.stderr


def test_undecryptable_mail_is_delivered_and_the_postmaster_told(world, config_file, smtp_sink):
    armor = world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nnot for B\r\n", "out@c.example")
    data = b"From: x@c.example\nTo: user@b.example\nSubject: foreign\n\n" + armor
    config = passphrase_table(config_file, smtp_sink, world.receiving, direction="neg")
    run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], data)
    assert run.code == 0, run.stderr
    delivered, notice = smtp_sink.messages
    assert delivered.rcpt_tos == ["user@b.example"] and delivered.content.endswith(crlf(data))
    assert header(delivered.content, "X-ispMailGate-PGP-Result")[0].startswith(
        'undecryptable; reason="no secret key for ')
    assert notice.rcpt_tos == ["postmaster@b.example"] and notice.mail_from == "<>"
    assert crlf(data) in notice.content                       # the original, attached


@pytest.mark.parametrize("policy, code, status", [("report", 0, ""), ("reject", 69, "5.7.5 ")])
def test_undecryptable_mail_reported_or_rejected_reaches_the_postmaster_once(world, config_file, smtp_sink,
                                                                              policy, code, status):
    armor = world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nnot for B\r\n", "out@c.example")
    data = b"From: x@c.example\nTo: user@b.example\nSubject: foreign\n\n" + armor
    config = passphrase_table(config_file, smtp_sink, world.receiving, direction="neg", on_undecryptable=policy)
    run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], data)
    assert run.code == code and run.first_line.startswith(status), run.stderr
    [report] = smtp_sink.messages                             # the recipient gets nothing
    assert report.rcpt_tos == ["postmaster@b.example"] and report.mail_from == "<>"
    assert b"no secret key for " in report.content
    assert crlf(data) in report.content                       # the original, attached


def test_missing_gpg_defers_and_sends_nothing(world, config_file, smtp_sink):
    armor = world.outsider.encrypt(b"Content-Type: text/plain\r\n\r\nfor B\r\n", "gw@b.example")
    work = {"pos": (CORPUS / "plain.eml").read_bytes(),
            "neg": b"From: x@c.example\nTo: user@b.example\nSubject: for B\n\n" + armor}
    for direction, data in work.items():
        config = pgp_config(config_file, smtp_sink, world.receiving, direction=direction, uid=World.A_UID,
                            gpg_binary="/nonexistent/gpg")
        run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], data)
        assert run.code == 75, (direction, run.stderr)
        assert run.first_line.startswith("4.3.5 gw: pgp: cannot run gpg"), run.first_line
    assert smtp_sink.messages == []


def test_missing_gnupghome_defers_and_home_gnupg_is_never_touched(world, config_file, smtp_sink, tmp_path):
    message = (CORPUS / "plain.eml").read_bytes()
    config = pgp_config(config_file, smtp_sink, tmp_path / "missing", direction="pos", uid=World.B_UID)
    run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], message)
    assert run.code == 75 and "gnupghome" in run.first_line and run.first_line.startswith("4.3.5 ")
    home = tmp_path / "home"
    home.mkdir()
    fresh = GpgHome("fresh")                      # no agent running yet: the gate's gpg starts it
    try:
        fresh.import_keys(world.receiving.export_secret(world.b, World.B_PASSPHRASE))
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env={"GNUPGHOME": fresh.path}, check=True)
        config = passphrase_table(config_file, smtp_sink, fresh, direction="auto", uid=World.B_UID)
        run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], message, env={"HOME": str(home)})
        assert run.code == 0, run.stderr
        encrypted = from_wire(smtp_sink.messages[-1].content)
        run = run_gate(["-c", config, "-f", SENDER, "user@b.example"], encrypted, env={"HOME": str(home)})
        assert run.code == 0, run.stderr
    finally:
        fresh.close()
    assert header(smtp_sink.messages[-1].content, "X-ispMailGate-PGP-Result") == ["decrypted; scope=message"]
    assert list(home.iterdir()) == []
