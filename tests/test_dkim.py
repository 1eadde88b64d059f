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
    args = ["-c", str(config), "--originating", "-f", "ada@gate.example", *(["-d"] if debug else []),
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


@pytest.mark.parametrize("added", [b"Reply-To: payments@evil.example\n", b"Subject: URGENT: send card details\n",
                                   b"To: victim@bank.example\n", b"Content-Type: text/html\n",
                                   b"In-Reply-To: <x@bank.example>\n"])
def test_a_field_a_reader_sees_added_on_the_way_breaks_the_signature(config_file, smtp_sink, signing, added):
    """Only From was over-signed and absent fields were not in h=: a Reply-To, a second
    Subject or To added above the signed ones left the signature valid (t_dkim_oversign.py)."""
    wire = deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa)), LETTER, smtp_sink)
    assert verifies(wire, signing)
    end = wire.index(b"\r\nFrom: ") + 2
    assert not verifies(wire[:end] + added.replace(b"\n", b"\r\n") + wire[end:], signing)


def test_headers_says_which_names_are_over_signed(config_file, smtp_sink, signing):
    table = dkim_table(signing.rsa, 'headers = ["subject", "+To", "date"]')
    wire = deliver(signing_config(config_file, smtp_sink, table), LETTER, smtp_sink)
    [field] = signatures(wire)
    assert re.sub(rb"\s", b"", re.search(rb"h=([^;]*);", field).group(1)) == b"from:to:subject:date:from:to"
    end = wire.index(b"\r\nFrom: ") + 2
    assert not verifies(wire[:end] + b"To: victim@bank.example\r\n" + wire[end:], signing)
    assert verifies(wire[:end] + b"Reply-To: x@y.example\r\n" + wire[end:], signing)     # not listed


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


def test_a_forged_from_of_our_domain_from_outside_is_not_signed(config_file, smtp_sink, signing, tmp_path):
    """Only the MTA knows who wrote the mail: without --originating nothing is signed, whatever
    the envelope sender claims (t_dkim_forged.py)."""
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa))
    for sender in ("attacker@evil.example", "ada@gate.example"):
        run = run_inline(["-c", str(config), "-f", sender, "rcpt@example.com"], LETTER)
        assert run.code == 0, run.stderr
        assert signatures(smtp_sink.messages[-1].content) == []
    assert ("not DKIM-signed for rcpt@example.com: the run is not originating (no --originating): "
            "d=gate.example s=sel signs only the mail of the MTA's own users") in (tmp_path / "gate.log").read_text()


def test_a_table_that_signs_always_signs_a_run_that_is_not_originating(config_file, smtp_sink, signing):
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa, 'sign = "always"'),
                            dkim_table(signing.ed25519, algorithm="ed25519-sha256"))
    run = run_inline(["-c", str(config), "-f", "ada@gate.example", "rcpt@example.com"], LETTER)
    assert run.code == 0, run.stderr
    wire = smtp_sink.messages[-1].content
    assert [re.search(rb"s=(\w+);", f).group(1) for f in signatures(wire)] == [b"sel"]
    assert verifies(wire, signing)


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
    run = run_inline(["-c", str(config), "--originating", "-f", "ada@gate.example", "b@example.com"], LETTER)
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


def test_the_gate_s_own_bounce_is_signed_by_the_postmaster_s_domain(config_file, smtp_sink, signing):
    """Its From: is postmaster@<the signing domain>: unsigned, receivers that enforce DMARC
    would refuse the gate's own bounces.  Signed whether or not the run is originating."""
    smtp_sink.handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]",
                            extra=f'postmaster = "postmaster@{DOMAIN}"')
    other = LETTER.replace(b"ada@gate.example", b"bob@elsewhere.example")
    run = run_inline(["-c", str(config), "-f", "bob@elsewhere.example", "rcpt@example.com", "gone@example.com"],
                     other)
    assert run.code == 0, run.stderr
    delivered, bounce = smtp_sink.messages
    assert signatures(delivered.content) == [] and bounce.mail_from == "<>"
    assert b"From: Mail Delivery System <postmaster@gate.example>" in bounce.content
    assert len(signatures(bounce.content)) == 1 and verifies(bounce.content, signing)


# -- signing failure defers ------------------------------------------------------------------------

@pytest.mark.parametrize("data, why", [
    (LETTER.replace(b"To: ", b"From x\nFrom: Bank <help@bank.example>\nTo: "),
     "a line that is neither a header field nor a continuation (From x): readers end the header there"),
    (LETTER.replace(b"\nTo: ", b"\rFrom: Bank <help@bank.example>\nTo: "), "a bare CR in the header block"),
    (LETTER.replace(b"Subject: Notes\n", b"Subject: Notes\nX-A : b\n"), "a line that is neither"),
    (LETTER.replace(b"Subject: Notes\n", b"Subject: Notes\nNot a header line\n"), "a line that is neither"),
    (LETTER.replace(b"\n\nThe", b"\nThe"), "a line that is neither")])
def test_a_header_block_readers_may_take_apart_otherwise_is_delivered_unsigned(config_file, smtp_sink, signing,
                                                                              tmp_path, data, why):
    """dkimpy skips an mbox From_ line that ends the header for a mail reader, and keeps a
    bare CR inside a field that a reader splits there (t_dkim_twofrom.py); a line dkimpy
    cannot read made every retry exit 75 (t_dkim_shapes.py)."""
    wire = deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]"), data, smtp_sink)
    assert signatures(wire) == [] and not wire.startswith(b"DKIM-Signature")
    assert "not DKIM-signed as gate.example (s=sel) for rcpt@example.com: " + why in \
        (tmp_path / "gate.log").read_text()


def test_a_header_block_past_the_bound_is_refused_for_good(config_file, smtp_sink, signing):
    """dkimpy folds an h= of every To: instance quadratically: 800,000 empty To: fields
    took 45 s (t_dkim_fold.py).  More fields than the bound is the message's fault."""
    many = LETTER.replace(b"To: rcpt@example.com\n", b"To:\n" * 1001)
    run = run_inline(["-c", str(signing_config(config_file, smtp_sink, dkim_table(signing.rsa))),
                      "--originating", "-f", "ada@gate.example", "rcpt@example.com"], many)
    assert run.code == 69
    assert run.first_line.startswith("5.6.0 DKIM signing as gate.example (s=sel) refused the message: "
                                     "more than 1000 header fields")
    assert smtp_sink.messages == []
    fewer = LETTER.replace(b"To: rcpt@example.com\n", b"To:\n" * 990)
    assert verifies(deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa)), fewer, smtp_sink),
                    signing)


def test_a_message_dkimpy_cannot_read_is_the_message_s_fault_a_key_failure_is_not():
    from ispmailgate_core.signing import Unsignable, failure_status

    assert failure_status(dkim.MessageFormatError("Unexpected characters")) == "5.6.0"
    assert failure_status(Unsignable("more than 1000 header fields")) == "5.6.0"
    assert failure_status(dkim.KeyFormatError("bad key")) == "4.3.5"
    assert failure_status(OSError("no memory")) == "4.3.0"


def test_an_arriving_signature_of_ours_with_a_huge_h_is_not_checked(config_file, smtp_sink, signing, tmp_path):
    """dkimpy looks for every h= name through every field: 32,000 names took 62 s (t_dkim_cost.py)."""
    names = ":\n ".join(":".join(f"n{i:x}" for i in range(start, start + 20)) for start in range(0, 300, 20))
    claimed = (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=gate.example; s=sel; h=from:{names};"
               "\n bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=Zm9yZ2Vk\n").encode() + LETTER
    wire = deliver(signing_config(config_file, smtp_sink, dkim_table(signing.rsa), chain="[]"), claimed, smtp_sink)
    assert len(signatures(wire)) == 2 and verifies(wire, signing, 0)
    assert "dkim[0]: the DKIM-Signature it arrived with signs over 200 names: not checked" in \
        (tmp_path / "gate.log").read_text()


def test_with_arc_a_header_block_past_the_bound_goes_out_unsealed(config_file, smtp_sink, signing, tmp_path):
    arc = (f'[arc]\ndomain = "{DOMAIN}"\nselector = "{signing.other.selector}"\n'
           f'private_key_file = "{signing.other.path}"\nauthserv_id = "mx.gate.example"\n')
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\ndefault_filter = ["banner"]\n'
                         f'{BANNER}{arc}')
    many = LETTER.replace(b"To: rcpt@example.com\n", b"X-Many: x\n" * 1001)
    wire = deliver(config, many, smtp_sink)
    assert b"ARC-Seal" not in wire and b"-- sent through the gateway" in wire
    assert "not ARC sealed for rcpt@example.com: more than 1000 header fields" in (tmp_path / "gate.log").read_text()


def test_any_signing_failure_defers_everything_with_the_reason(config_file, smtp_sink, signing, monkeypatch):
    from ispmailgate_core import signing as module

    def fail(table, wire):
        raise dkim.KeyFormatError("the key went away")
    monkeypatch.setattr(module, "signature", fail)
    rule = '[[recipients]]\nrecipient = "@inside\\\\.example$"\nfilters = []\ndkim = false\n'
    config = signing_config(config_file, smtp_sink, dkim_table(signing.rsa), extra=rule)
    run = run_inline(["-c", str(config), "--originating", "-f", "ada@gate.example", "in@inside.example", "out@example.com"],
                     LETTER)
    assert (run.code, run.first_line) == (75, "4.3.5 DKIM signing as gate.example (s=sel) failed: "
                                              "the key went away")
    assert smtp_sink.messages == []      # the unsigned group waits for the retry too
