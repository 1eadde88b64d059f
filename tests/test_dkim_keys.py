"""The [[dkim]] tables for an administrator (issue 20): keys read and checked when the rule file
is, ``check`` comparing each key with what DNS publishes, ``dkim-record``, explain, --dry-run."""

from __future__ import annotations

import base64
import os
import re
import subprocess

import dkim
import pytest

from conftest import run_gate, run_inline
from support.mailauth import DnsServer, MisbehavingDns
from test_dkim import DOMAIN, LETTER, dkim_table, signing, signing_config  # noqa: F401  (fixture)


def openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, check=True, capture_output=True).stdout


def private(path, data: bytes):
    path.write_bytes(data)
    path.chmod(0o600)
    return path


# -- reading keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["pkcs1", "pkcs8", "ed25519", "seed"])
def test_each_key_form_gives_the_public_key_openssl_derives(tmp_path, form):
    from ispmailgate_core.keys import parse_private_key, public_key, publishes

    key = tmp_path / "key.pem"
    if form == "pkcs1":
        private(key, openssl("genrsa", "-traditional", "1024"))
        assert key.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    else:
        private(key, openssl("genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024") if form == "pkcs8"
                else openssl("genpkey", "-algorithm", "ed25519"))
    expected = openssl("pkey", "-in", str(key), "-pubout", "-outform", "DER")
    if form == "seed":          # dknewkey's form: the 32-byte seed, base64, on one line
        der = openssl("pkey", "-in", str(key), "-outform", "DER")
        private(key, base64.b64encode(der[-32:]) + b"\n")
    parsed = parse_private_key(key.read_bytes())
    if parsed.kind == "rsa":
        assert public_key(parsed) == expected and parsed.bits == 1024
        assert publishes(parsed, expected) and publishes(parsed, expected[22:])     # SPKI or RSAPublicKey
    else:
        assert public_key(parsed) == expected[-32:] and parsed.kind == "ed25519"


@pytest.mark.parametrize("data, complaint", [
    (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "encrypted"),
    (b"-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n", "not base64"),
    (b"-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJB\n-----END RSA PRIVATE KEY-----\n", "truncated"),
    (b"just some text\n", "no PEM private key"),
    ("ec", "neither an RSA nor an Ed25519 key")])
def test_what_is_not_a_usable_key_says_why(data, complaint):
    from ispmailgate_core.keys import parse_private_key

    if data == "ec":
        data = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    with pytest.raises(ValueError, match=complaint):
        parse_private_key(data)


def run_config(config_file, text: str):
    config = config_file(text)
    return run_gate(["-c", str(config), "-f", "a@gate.example", "b@example.com"], LETTER)


@pytest.mark.parametrize("table, complaint", [
    ('domain = "gate.example"\nselector = "sel"\nprivate_key_file = "{key}"\nalgorithm = "ed25519-sha256"',
     "dkim[0].algorithm: ed25519-sha256, but {key} holds an RSA key"),
    ('domain = "gate.example"\nselector = "sel"\nprivate_key_file = "{key}"\ncolour = "blue"',
     "dkim[0].colour: unknown key"),
    ('domain = "gate example"\nselector = "sel"\nprivate_key_file = "{key}"',
     "dkim[0].domain: not a domain name"),
    ('domain = "gate.example"\nselector = "sel"\nprivate_key_file = "{key}"\nheaders = ["Subject", "Received"]',
     "dkim[0].headers: received must not be signed"),
    ('domain = "gate.example"\nselector = "sel"\nprivate_key_file = "{key}"\ncanonicalization = "loose/simple"',
     "dkim[0].canonicalization: expected HEADER/BODY"),
    ('domain = "gate.example"\nselector = "sel"\nprivate_key_file = "{key}"\n[[dkim]]\ndomain = "Gate.Example."'
     '\nselector = "sel"\nprivate_key_file = "{key}"', "dkim[1]: selector sel of gate.example is configured twice"),
])
def test_table_errors_name_their_key_and_defer(config_file, signing, table, complaint):
    run = run_config(config_file, "[[dkim]]\n" + table.format(key=signing.rsa.path))
    assert run.code == 75 and complaint.format(key=signing.rsa.path) in run.first_line, run.first_line


@pytest.mark.parametrize("command", [[], ["check"], ["dkim-record", "gate.example"]])
def test_a_fifo_or_a_link_in_the_key_s_place_is_refused_at_once(config_file, signing, tmp_path, command):
    """Whoever may change the key's directory put a FIFO there: every run, check and
    dkim-record blocked in open() for ever, as root and before any time limit (t_key_fifo.sh)."""
    table = '[[dkim]]\ndomain = "gate.example"\nselector = "sel"\nprivate_key_file = "{}"\n'
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo, 0o600)
    link = tmp_path / "link.pem"
    link.symlink_to(signing.rsa.path)
    for path, complaint in ((fifo, "is not a regular file"), (link, "a symbolic link")):
        config = config_file(table.format(path))
        extra = ["-f", "a@gate.example", "b@example.com"] if not command else []
        run = run_gate([*command, "-c", str(config), *extra], LETTER, timeout=30)     # was: for ever
        assert run.code in (75, 78) and complaint in (run.stderr + run.stdout.decode()), run


def test_an_arc_key_that_is_a_fifo_is_refused_at_once(config_file, tmp_path):
    fifo = tmp_path / "arc.pem"
    os.mkfifo(fifo, 0o600)
    config = config_file(f'[arc]\ndomain = "gate.example"\nselector = "arc"\nprivate_key_file = "{fifo}"\n'
                         'authserv_id = "mx.gate.example"\n')
    run = run_gate(["-c", str(config), "-f", "a@gate.example", "b@example.com"], LETTER, timeout=30)
    assert run.code == 75 and f"arc.private_key_file: {fifo} is not a regular file" in run.first_line


def test_the_key_must_be_private_present_and_long_enough(config_file, signing, tmp_path):
    table = '[[dkim]]\ndomain = "gate.example"\nselector = "sel"\nprivate_key_file = "{}"\n'
    shared = tmp_path / "shared.pem"
    shared.write_bytes(signing.rsa.private_pem)
    shared.chmod(0o644)
    run = run_config(config_file, table.format(shared))
    assert run.code == 75 and "dkim[0].private_key_file: " in run.first_line and "readable by others" in run.first_line
    run = run_config(config_file, table.format(tmp_path / "missing.pem"))
    assert "cannot read" in run.first_line
    short = private(tmp_path / "short.pem", openssl("genrsa", "512"))
    run = run_config(config_file, table.format(short))
    assert "a 512-bit RSA key: receivers refuse keys under 1024 bits" in run.first_line


def test_a_rule_s_dkim_must_be_true_or_false(config_file, signing):
    run = run_config(config_file, '[[recipients]]\nfilters = []\ndkim = "no"\n' + dkim_table(signing.rsa))
    assert run.code == 75 and "recipients[0].dkim: expected true or false" in run.first_line


# -- check -----------------------------------------------------------------------------------------

def check(config_file, smtp_sink, *tables: str, config_only: bool = False) -> tuple[int, list[str]]:
    config = config_file(f'mail_host = "{smtp_sink.address}"\n' + "".join(tables))
    run = run_inline(["check", "-c", str(config), *(["--config-only"] if config_only else [])], b"")
    return run.code, [line.split(": ", 1)[1] for line in run.stdout.decode().splitlines()]


def test_check_passes_keys_that_match_their_records(config_file, smtp_sink, signing):
    resolver = f'resolver = "{signing.dns.address}"'
    code, lines = check(config_file, smtp_sink, dkim_table(signing.rsa, resolver),
                        dkim_table(signing.ed25519, resolver, algorithm="ed25519-sha256"))
    assert (code, lines) == (0, ["OK (0 rules, 0 named filters)"])


def test_check_warns_about_a_table_that_signs_always(config_file, smtp_sink, signing):
    resolver = f'resolver = "{signing.dns.address}"'
    code, lines = check(config_file, smtp_sink, dkim_table(signing.rsa, resolver + '\nsign = "always"'))
    assert code == 0
    assert lines[0].startswith('warning: dkim[0]: sign = "always" signs mail from the internet that claims '
                               'From: gate.example as well')
    assert lines[1] == "OK (0 rules, 0 named filters), 1 warning"


def test_a_table_s_sign_must_be_originating_or_always(config_file, signing):
    run = run_config(config_file, dkim_table(signing.rsa, 'sign = "outbound"'))
    assert run.code == 75 and "dkim[0].sign: expected originating or always, got 'outbound'" in run.first_line


def test_check_catches_a_key_that_does_not_match_its_dns_record(config_file, smtp_sink, signing):
    server = MisbehavingDns("records", signing.records)        # NXDOMAIN for the names it has not
    resolver = f'resolver = "{server.address}"'
    try:
        code, lines = check(config_file, smtp_sink, dkim_table(signing.rsa, resolver, selector="stale"),
                            dkim_table(signing.rsa, resolver, selector="gone"),
                            dkim_table(signing.ed25519, resolver, selector="sel", algorithm="ed25519-sha256"))
    finally:
        server.close()
    assert code == 78
    assert lines[:3] == [
        f"dkim[0].selector: stale._domainkey.gate.example: publishes another key than {signing.rsa.path} "
        "holds: receivers fail every signature made with it; publish what ispmailgate dkim-record "
        "gate.example prints",
        "dkim[1].selector: gone._domainkey.gate.example publishes no key: receivers cannot verify a "
        "signature; publish what ispmailgate dkim-record gate.example prints",
        "dkim[2].selector: sel._domainkey.gate.example: publishes a k=rsa key, and private_key_file "
        "holds an ed25519 key; publish what ispmailgate dkim-record gate.example prints"]
    assert lines[3:] == ["3 problems"]


def test_check_without_an_answer_from_dns_warns_and_config_only_does_not_ask(config_file, smtp_sink, signing,
                                                                              monkeypatch):
    from ispmailgate_core.admin import dkim_keys

    monkeypatch.setattr(dkim_keys, "DNS_PROBE_SECONDS", 1.0)
    server = MisbehavingDns("silent")
    try:
        table = dkim_table(signing.rsa, f'resolver = "{server.address}"', selector="stale")
        code, lines = check(config_file, smtp_sink, table)
        assert code == 0 and lines == [
            "warning: dkim[0]: DNS did not answer for stale._domainkey.gate.example (no answer within 1 s): "
            "the key it publishes was not compared", "OK (0 rules, 0 named filters), 1 warning"]
        asked = len(server.names)
        code, lines = check(config_file, smtp_sink, table, config_only=True)
        assert code == 0 and len(server.names) == asked
    finally:
        server.close()


# -- dkim-record ------------------------------------------------------------------------------------

def record_of(output: str) -> tuple[str, str]:
    """The name and the record of a zone file entry: its quoted strings joined."""
    name = output.split(" IN TXT ", 1)[0].splitlines()[-1].rstrip(".")
    return name, "".join(re.findall(r'"([^"]*)"', output))


def test_dkim_record_prints_what_makes_the_signatures_verify(config_file, smtp_sink, signing):
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]")
    run = run_inline(["dkim-record", "-c", str(config), "GATE.example"], b"")
    assert run.code == 0, run.stdout
    text = run.stdout.decode()
    assert text.startswith(f"; dkim[0]: rsa-sha256, a 2048-bit RSA key from {signing.rsa.path}\n"
                           "sel._domainkey.gate.example. IN TXT ( \"v=DKIM1; k=rsa; p=")
    assert all(len(piece) <= 255 for piece in re.findall(r'"([^"]*)"', text))
    name, record = record_of(text)
    published = DnsServer({name: record})
    try:
        run_inline(["-c", str(config), "--originating", "-f", "ada@gate.example", "r@example.com"], LETTER)
        assert dkim.verify(smtp_sink.messages[-1].content, dnsfunc=published.txt)
    finally:
        published.stop()


def test_dkim_record_of_a_domain_without_a_table_exits_78(config_file, smtp_sink, signing):
    config = signing_config(config_file, smtp_sink, dkim_table(signing.ed25519, algorithm="ed25519-sha256"))
    run = run_inline(["dkim-record", "-c", str(config), "other.example"], b"")
    assert run.code == 78
    assert run.stdout.decode() == f"{config}: no [[dkim]] table signs as other.example (its domains: gate.example)\n"
    run = run_inline(["dkim-record", "-c", str(config), "gate.example"], b"")
    assert run.stdout.decode().splitlines()[1].startswith('ed._domainkey.gate.example. IN TXT "v=DKIM1; k=ed25519; p=')


# -- explain and --dry-run --------------------------------------------------------------------------

def test_explain_says_whose_results_are_signed_by_whom(config_file, smtp_sink, signing):
    rule = '[[recipients]]\nrecipient = "@inside\\\\.example$"\nfilters = ["banner"]\ndkim = false\n'
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa, "subdomains = true"), extra=rule)
    run = run_inline(["explain", "-c", str(config), "--originating", "-f", "ada@gate.example",
                      "in@inside.example", "out@example.com"], b"")
    assert run.code == 0
    groups = run.stdout.decode().split("delivery groups")[1].splitlines()
    assert "  2. <in@inside.example>: banner; not sealed (no [arc]); not DKIM-signed (recipients[0]: dkim = false)" \
        in groups
    assert "  1. <out@example.com>: banner; not sealed (no [arc]); DKIM-signed if the From: domain is " \
           "gate.example or below (by d=gate.example s=sel rsa-sha256)" in groups
    inbound = run_inline(["explain", "-c", str(config), "-f", "ada@gate.example", "out@example.com"], b"")
    assert "  1. <out@example.com>: banner; not sealed (no [arc]); not DKIM-signed: the run is not " \
           "originating (no --originating): d=gate.example s=sel signs only the mail of the MTA's own users" \
        in inbound.stdout.decode().splitlines()


def test_dry_run_says_what_would_be_signed(config_file, smtp_sink, signing):
    rule = '[[recipients]]\nrecipient = "@inside\\\\.example$"\nfilters = ["banner"]\ndkim = false\n'
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), extra=rule)
    run = run_inline(["--dry-run", "--originating", "-c", str(config), "-f", "ada@gate.example",
                      "in@inside.example", "out@example.com"], LETTER)
    text = run.stdout.decode()
    assert "    would be DKIM-signed as d=gate.example s=sel\n" in text
    assert "    not DKIM-signed: the rule says dkim = false\n" in text
    other = run_inline(["--dry-run", "--originating", "-c", str(config), "-f", "x@y.example", "out@example.com"],
                       LETTER.replace(b"ada@gate.example", b"x@y.example")).stdout.decode()
    assert "    not DKIM-signed: the From: domain y.example is in no [[dkim]] domain\n" in other
    inbound = run_inline(["--dry-run", "-c", str(config), "-f", "ada@gate.example", "out@example.com"],
                         LETTER).stdout.decode()
    assert "    not DKIM-signed: the run is not originating (no --originating): d=gate.example s=sel " \
           "signs only the mail of the MTA's own users\n" in inbound
    assert smtp_sink.messages == []
