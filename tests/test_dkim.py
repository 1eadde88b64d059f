"""DKIM signing after the filters (issue 20): what leaves with a banner verifies.

Signatures are checked with dkimpy's own verify on the bytes the next hop received, with the
public keys served by a real DNS server (dnsmasq) on loopback, made from openssl's keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim
import pytest

from conftest import recorded_calls, run_inline
from support.mailauth import DnsServer, Key, make_ed25519_key, make_key

DOMAIN = "gate.example"
LETTER = (b"From: Ada <ada@gate.example>\nTo: rcpt@example.com\nSubject: Notes\n"
          b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <notes@gate.example>\n\n"
          b"The analytical engine weaves algebraic patterns.\n")
BANNER = '[filter.banner]\ntype = "banner"\ntext = "-- sent through the gateway"\n'


@dataclass
class Signing:
    rsa: Key            # sel._domainkey.gate.example
    ed25519: Key        # ed._domainkey.gate.example
    other: Key          # a key whose record DNS publishes as stale._domainkey.gate.example
    dns: DnsServer
    records: dict[str, str]     # what dns serves: name -> TXT record


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dkim")
    rsa, rsa_txt = make_key(directory, "sel", DOMAIN)
    ed, ed_txt = make_ed25519_key(directory, "ed", DOMAIN)
    other, other_txt = make_key(directory, "stale", DOMAIN)
    records = {rsa.dns_name: rsa_txt, ed.dns_name: ed_txt, other.dns_name: other_txt}
    server = DnsServer(records)
    try:
        yield Signing(rsa, ed, other, server, records)
    finally:
        server.stop()


def dkim_table(key: Key, extra: str = "", *, algorithm: str = "rsa-sha256", selector: str | None = None,
               domain: str = DOMAIN) -> str:
    return (f'[[dkim]]\ndomain = "{domain}"\nselector = "{selector or key.selector}"\n'
            f'private_key_file = "{key.path}"\nalgorithm = "{algorithm}"\n{extra}\n')


def signing_config(config_file, sink, *tables: str, chain: str = '["banner"]', extra: str = ""):
    return config_file(f'mail_host = "{sink.address}"\nloop_suffix = ""\ndefault_filter = {chain}\n'
                       f'{extra}\n{BANNER}' + "".join(tables))


def deliver(config, data: bytes, sink, *recipients: str, debug: bool = False) -> bytes:
    args = ["-c", str(config), "-f", "ada@gate.example", *(["-d"] if debug else []),
            *(recipients or ["rcpt@example.com"])]
    run = run_inline(args, data)
    assert run.code == 0, run.stderr
    return sink.messages[-1].content


def signatures(wire: bytes) -> list[bytes]:
    head = wire.split(b"\r\n\r\n", 1)[0]
    return re.findall(rb"^DKIM-Signature: .*?\r\n(?![ \t])", head + b"\r\n", re.M | re.S)


def verifies(wire: bytes, signing: Signing, index: int = 0) -> bool:
    """Does the DKIM-Signature at ``index`` verify (dkimpy raises for some failures)?"""
    try:
        return dkim.DKIM(wire).verify(idx=index, dnsfunc=signing.dns.txt)
    except dkim.DKIMException:
        return False


# -- which mail is signed -------------------------------------------------------------------

def test_mail_from_the_domain_leaves_with_a_banner_and_a_signature_that_verifies(config_file, smtp_sink,
                                                                                  signing):
    wire = deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa)), LETTER, smtp_sink)
    assert wire.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=gate.example;")
    assert b"-- sent through the gateway" in wire
    assert verifies(wire, signing)
    [field] = signatures(wire)
    signed = re.sub(rb"\s", b"", re.search(rb"h=([^;]*);", field).group(1)).split(b":")
    assert signed.count(b"from") == 2            # over-signed: a From: added later breaks it
    assert {b"to", b"subject", b"date", b"message-id"} <= set(signed)
    assert b"x-ispmailgate-banner" not in signed


def test_rsa_and_ed25519_tables_of_one_domain_dual_sign(config_file, smtp_sink, signing):
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa),
                            dkim_table(signing.ed25519, algorithm="ed25519-sha256"))
    wire = deliver(config, LETTER, smtp_sink)
    fields = signatures(wire)
    assert [re.search(rb"a=([\w-]+);", f).group(1) for f in fields] == [b"rsa-sha256", b"ed25519-sha256"]
    assert verifies(wire, signing, 0) and verifies(wire, signing, 1)


def test_mail_from_another_domain_is_not_signed_and_the_log_says_why(config_file, smtp_sink, signing, tmp_path):
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]")
    other = LETTER.replace(b"ada@gate.example", b"bob@elsewhere.example")
    wire = deliver(config, other, smtp_sink, debug=True)
    assert wire == other.replace(b"\n", b"\r\n")        # untouched, byte for byte
    log = (tmp_path / "gate.log").read_text()
    assert "not DKIM-signed for rcpt@example.com: the From: domain elsewhere.example is in no [[dkim]] domain" in log


@pytest.mark.parametrize("subdomains, expected", [("false", 0), ("true", 1)])
def test_subdomains_are_signed_only_when_asked(config_file, smtp_sink, signing, subdomains, expected):
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa, f"subdomains = {subdomains}"))
    wire = deliver(config, LETTER.replace(b"ada@gate.example", b"ada@lab.gate.example"), smtp_sink)
    assert len(signatures(wire)) == expected
    assert expected == 0 or verifies(wire, signing)


def test_a_from_with_several_authors_is_signed_once_for_the_configured_domain(config_file, smtp_sink, signing):
    several = LETTER.replace(b"From: Ada <ada@gate.example>",
                             b'From: "Bob, at gate.example" <bob@elsewhere.example>, Ada <ada@GATE.example.>')
    wire = deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa)), several, smtp_sink)
    assert len(signatures(wire)) == 1 and verifies(wire, signing)
    quoted = LETTER.replace(b"From: Ada <ada@gate.example>", b'From: "ada@gate.example" <ada@elsewhere.example>')
    assert signatures(deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa)), quoted,
                              smtp_sink)) == []


@pytest.mark.parametrize("header, why", [
    (b"From: Ada <ada@gate.example>\nFrom: Bank <help@bank.example>", "2 From: fields (RFC 5322 allows one)"),
    (b"Sender: ada@gate.example", "no From: field"),
    (b"From: undisclosed-recipients:;", "no address in From:")])
def test_a_message_without_exactly_one_from_field_is_not_signed(config_file, smtp_sink, signing, tmp_path,
                                                                 header, why):
    data = LETTER.replace(b"From: Ada <ada@gate.example>", header)
    wire = deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa)), data, smtp_sink, debug=True)
    assert signatures(wire) == []
    assert f"not DKIM-signed for rcpt@example.com: {why}" in (tmp_path / "gate.log").read_text()


# -- not signed twice -------------------------------------------------------------------------

def test_signed_and_unchanged_mail_is_not_signed_twice(config_file, smtp_sink, signing, tmp_path):
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]")
    first = deliver(config, LETTER, smtp_sink)
    assert len(signatures(first)) == 1
    again = deliver(config, first.replace(b"\r\n", b"\n"), smtp_sink)
    assert again == first                         # the same bytes: no second signature
    assert "unchanged, and gate.example (s=sel) signed it already" in (tmp_path / "gate.log").read_text()


def test_signed_mail_a_filter_changed_is_signed_again(config_file, smtp_sink, signing):
    unsigned = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]")
    first = deliver(unsigned, LETTER, smtp_sink).replace(b"\r\n", b"\n")
    bannered = signing_config(config_file, smtp_sink, dkim_table(signing.rsa))
    wire = deliver(bannered, first, smtp_sink)
    assert len(signatures(wire)) == 2
    assert verifies(wire, signing, 0) and not verifies(wire, signing, 1)     # the banner broke the old one


def test_a_signature_that_only_claims_the_selector_gets_a_real_one_beside_it(config_file, smtp_sink, signing):
    forged = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=gate.example; s=sel; h=from;\n"
              b" bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=Zm9yZ2Vk\n") + LETTER
    wire = deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]"), forged, smtp_sink)
    assert len(signatures(wire)) == 2 and verifies(wire, signing, 0) and not verifies(wire, signing, 1)
    assert wire.endswith(forged.replace(b"\n", b"\r\n"))


# -- rules, hops, ARC ---------------------------------------------------------------------------

def test_a_rule_with_dkim_false_keeps_its_recipients_apart_and_unsigned(config_file, smtp_sink, signing):
    rule = '[[recipients]]\nrecipient = "@inside\\\\.example$"\nfilters = ["banner"]\ndkim = false\n'
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), extra=rule)
    deliver(config, LETTER, smtp_sink, "out@example.com", "in@inside.example")
    received = {tuple(m.rcpt_tos): m.content for m in smtp_sink.messages}
    assert set(received) == {("out@example.com",), ("in@inside.example",)}
    assert len(signatures(received[("out@example.com",)])) == 1
    assert signatures(received[("in@inside.example",)]) == []
    assert received[("out@example.com",)].endswith(received[("in@inside.example",)])    # same banner


def test_the_signature_for_the_sendmail_hop_verifies_on_the_wire(config_file, signing, recorder):
    script, calls = recorder(0)
    config = config_file(f'sendmail_command = ["{script}"]\ndefault_filter = ["banner"]\n{BANNER}'
                         + dkim_table(signing.rsa, 'canonicalization = "simple/simple"'))
    run = run_inline(["-c", str(config), "-f", "ada@gate.example", "b@example.com"], LETTER)
    assert run.code == 0, run.stderr
    handed = recorded_calls(calls)[0]["data"].encode("latin-1")
    assert b"\r\n" not in handed and b"c=simple/simple" in handed
    assert dkim.verify(handed.replace(b"\n", b"\r\n"), dnsfunc=signing.dns.txt)


def test_with_arc_the_signature_comes_first_and_the_arc_set_covers_it(config_file, smtp_sink, signing):
    arc = (f'[arc]\ndomain = "{DOMAIN}"\nselector = "{signing.other.selector}"\n'
           f'private_key_file = "{signing.other.path}"\nauthserv_id = "mx.gate.example"\n')
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), extra=arc)
    wire = deliver(config, LETTER, smtp_sink)
    names = re.findall(rb"^([A-Za-z-]+):", wire.split(b"\r\n\r\n", 1)[0], re.M)
    assert names[:4] == [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results",
                         b"DKIM-Signature"]
    assert verifies(wire, signing)
    verdict, _, reason = dkim.arc_verify(wire, dnsfunc=signing.dns.txt)
    assert verdict == dkim.CV_Pass, reason
    ams = re.search(rb"ARC-Message-Signature: (.*?)\r\n(?![ \t])", wire, re.S).group(1)
    assert b"dkim-signature" in re.sub(rb"\s", b"", re.search(rb"h=([^;]*);", ams).group(1)).split(b":")


# -- signing failure defers ------------------------------------------------------------------------

def test_a_message_dkimpy_cannot_sign_is_deferred_not_sent_unsigned(config_file, smtp_sink, signing):
    broken = LETTER.replace(b"Subject: Notes\n", b"Subject: Notes\nNot a header line\n")
    run = run_inline(["-c", str(signing_config(config_file, smtp_sink, dkim_table(signing.rsa))),
                      "-f", "ada@gate.example", "rcpt@example.com"], broken)
    assert run.code == 75
    assert run.first_line.startswith("4.6.0 DKIM signing as gate.example (s=sel) failed: ")
    assert "Unexpected characters in RFC822 header" in run.first_line
    assert smtp_sink.messages == []


def test_any_signing_failure_defers_everything_with_the_reason(config_file, smtp_sink, signing, monkeypatch):
    from ispmailgate_core import signing as module

    def fail(table, wire):
        raise dkim.KeyFormatError("the key went away")
    monkeypatch.setattr(module, "signature", fail)
    rule = '[[recipients]]\nrecipient = "@inside\\\\.example$"\nfilters = []\ndkim = false\n'
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), extra=rule)
    run = run_inline(["-c", str(config), "-f", "ada@gate.example", "in@inside.example", "out@example.com"],
                     LETTER)
    assert (run.code, run.first_line) == (75, "4.3.5 DKIM signing as gate.example (s=sel) failed: "
                                              "the key went away")
    assert smtp_sink.messages == []      # the unsigned group waits for the retry too
