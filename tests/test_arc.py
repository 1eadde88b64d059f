"""DKIM survives what the gate does not change; what it changes it seals with ARC.

Signatures and seals are checked with dkimpy's own verify and arc_verify on the bytes
the next hop received, with keys served by a real DNS server (dnsmasq) on loopback.
"""

from __future__ import annotations

import re

import dkim
import pytest

from conftest import CORPUS, run_gate, run_inline
from support.mailauth import MisbehavingDns, signed

SIMPLE = (CORPUS / "plain.eml").read_bytes()
AUTHSERV = "mx.example.net"


def arc_config(config_file, sink, auth, extra: str = "", arc_extra: str = "", name="arc.toml"):
    return config_file(f'''
        mail_host = "{sink.address}"
        loop_suffix = ""
        {extra}
        [arc]
        domain = "{auth.gateway_key.domain}"
        selector = "{auth.gateway_key.selector}"
        private_key_file = "{auth.gateway_key.path}"
        authserv_id = "{AUTHSERV}"
        resolver = "{auth.dns.address}"
        {arc_extra}
    ''', name=name)


def deliver(config, data: bytes, sink) -> bytes:
    run = run_inline(["-c", str(config), "-f", "author@sender.example", "rcpt@example.com"], data)
    assert run.code == 0, run.stderr
    return sink.messages[-1].content


def test_dkim_survives_the_dummy_chain_and_nothing_is_sealed(config_file, smtp_sink, mailauth):
    data = signed(mailauth, SIMPLE)
    wire = deliver(arc_config(config_file, smtp_sink, mailauth), data, smtp_sink)
    assert wire == data.replace(b"\n", b"\r\n")
    assert dkim.verify(wire, dnsfunc=mailauth.dns.txt)
    assert b"ARC-Seal" not in wire


def test_dkim_survives_a_filter_that_only_adds_a_header(config_file, smtp_sink, mailauth):
    data = signed(mailauth, SIMPLE)
    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Stamp"]')
    wire = deliver(config, data, smtp_sink)
    assert dkim.verify(wire, dnsfunc=mailauth.dns.txt)
    verdict, sets, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason


def test_a_changed_message_is_sealed_with_the_trusted_results_only(config_file, smtp_sink, mailauth):
    data = (f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=sender.example\n"
            "Authentication-Results: evil.example; spf=pass smtp.mailfrom=evil.example\n").encode()
    data += signed(mailauth, SIMPLE)
    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Upcase"]')
    wire = deliver(config, data, smtp_sink)
    assert not dkim.verify(wire, dnsfunc=mailauth.dns.txt)        # the body changed
    verdict, sets, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason
    assert [s["instance"] for s in sets] == [1]
    headers = wire.split(b"\r\n\r\n", 1)[0]
    aar = re.search(rb"ARC-Authentication-Results: (.*?)\r\n(?![ \t])", headers, re.S).group(1)
    assert b"i=1; mx.example.net" in aar and b"dkim=pass header.d=sender.example" in aar
    assert b"evil.example" not in aar and b"spf=" not in aar
    assert re.search(rb"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=gw.example.net; s=arc1", headers)
    assert headers.startswith(b"ARC-Seal: ")


def test_verify_dkim_records_the_gateways_own_finding(config_file, smtp_sink, mailauth):
    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Upcase"]',
                        "verify_dkim = true")
    wire = deliver(config, signed(mailauth, SIMPLE), smtp_sink)
    verdict, _, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason
    assert re.search(rb"ARC-Authentication-Results: i=1; mx.example.net;\s+dkim=pass "
                     rb"header.d=sender.example header.s=sel", wire)


def test_verify_dkim_reports_a_bad_signature_as_fail(config_file, smtp_sink, mailauth):
    tampered = signed(mailauth, SIMPLE).replace(b"Subject: ", b"Subject: tampered ", 1)
    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Stamp"]',
                        "verify_dkim = true")
    wire = deliver(config, tampered, smtp_sink)
    assert re.search(rb"ARC-Authentication-Results: i=1; mx.example.net;\s+dkim=fail", wire)


def relay_sealed(mailauth, tamper=lambda message: message, base: bytes = SIMPLE) -> bytes:
    """Signed mail as an earlier hop (relay.example) sealed it; ``tamper`` changes it afterwards."""
    original = b"Authentication-Results: relay.example; dkim=pass header.d=sender.example\n"
    original += signed(mailauth, base)
    relay = mailauth.relay_key
    first = dkim.arc_sign(original.replace(b"\n", b"\r\n"), relay.selector.encode(), relay.domain.encode(),
                          relay.private_pem, b"relay.example")
    return b"".join(first).replace(b"\r\n", b"\n") + tamper(original)


def test_an_existing_arc_chain_gets_instance_2_with_its_validated_cv(config_file, smtp_sink, mailauth):
    data = relay_sealed(mailauth)
    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Upcase"]')
    wire = deliver(config, data, smtp_sink)
    verdict, sets, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason
    assert sorted(s["instance"] for s in sets) == [1, 2]
    assert re.search(rb"ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=gw.example.net", wire)
    assert re.search(rb"ARC-Authentication-Results: i=2; mx.example.net;\s+arc=pass", wire)


def aar_of(wire: bytes) -> bytes:
    """The unfolded value of the newest ARC-Authentication-Results, without its ``i=N; ``."""
    head = wire.split(b"\r\n\r\n", 1)[0]
    value = re.search(rb"ARC-Authentication-Results: i=\d+; (.*?)\r\n(?![ \t])", head, re.S).group(1)
    return re.sub(rb"\r\n[ \t]+", b" ", value)


def test_without_any_results_the_aar_still_says_arc_none(config_file, smtp_sink, mailauth):
    """dkimpy drops a bare ``none``: the gateway's ``arc=none`` keeps the AAR valid RFC 8601."""
    import authres

    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Upcase"]')
    wire = deliver(config, SIMPLE, smtp_sink)
    aar = aar_of(wire).decode()
    header = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + aar)
    assert header.authserv_id == AUTHSERV
    assert [(r.method, r.result) for r in header.results] == [("arc", "none")]
    assert re.search(rb"ARC-Seal: i=1; cv=none;", wire)
    verdict, _, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason


def test_a_tampered_earlier_arc_set_is_sealed_as_cv_fail(config_file, smtp_sink, mailauth):
    data = relay_sealed(mailauth, lambda m: m.replace(b"Subject: ", b"Subject: tampered ", 1))
    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Upcase"]')
    wire = deliver(config, data, smtp_sink)
    assert re.search(rb"ARC-Seal: i=2; cv=fail; a=rsa-sha256; d=gw.example.net", wire)
    assert b"arc=fail" in aar_of(wire)
    # dkimpy answers None ("chain is terminated"), not CV_Fail, for a chain a seal declared failed
    verdict, _, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict is None and "ARC-Seal[2] reported failure" in reason
    # a cv=fail seal covers its own set only (dkimpy signs it so, its verifier hashes all sets):
    # without the broken set 1, the gateway's seal and message signature verify
    alone = without_arc_instance(wire, 1)
    _, sets, _ = dkim.arc_verify(alone, dnsfunc=mailauth.dns.txt)
    assert sets[0]["instance"] == 2 and sets[0]["as-valid"] and sets[0]["ams-valid"]


def without_arc_instance(wire: bytes, instance: int) -> bytes:
    head, body = wire.split(b"\r\n\r\n", 1)
    fields = re.findall(rb"[^\r\n]+\r\n(?:[ \t][^\r\n]*\r\n)*", head + b"\r\n")
    mark = f"i={instance};".encode()
    kept = [f for f in fields if not (f.lower().startswith(b"arc-") and mark in f)]
    return b"".join(kept) + b"\r\n" + body


def test_sealing_for_the_sendmail_hop_matches_the_wire(config_file, mailauth, recorder):
    """The sendmail hop gets LF line ends; on the wire (CRLF) the seal must still verify."""
    script, calls = recorder(0)
    config = config_file(f'''
        sendmail_command = ["{script}"]
        default_filter = ["gate_test_filters:Upcase"]
        [arc]
        domain = "{mailauth.gateway_key.domain}"
        selector = "{mailauth.gateway_key.selector}"
        private_key_file = "{mailauth.gateway_key.path}"
        authserv_id = "{AUTHSERV}"
    ''')
    run = run_inline(["-c", str(config), "-f", "a@sender.example", "b@example.com"], signed(mailauth, SIMPLE))
    assert run.code == 0, run.stderr
    from conftest import recorded_calls
    handed = recorded_calls(calls)[0]["data"].encode("latin-1")
    assert b"\r\n" not in handed
    verdict, _, reason = dkim.arc_verify(handed.replace(b"\n", b"\r\n"), dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason


@pytest.mark.parametrize("mode, message", [(0o644, "readable by others"), (None, "cannot read")])
def test_the_arc_key_must_be_private_and_present(config_file, smtp_sink, mailauth, tmp_path, mode, message):
    key = tmp_path / "arc.pem"
    if mode is not None:
        key.write_bytes(mailauth.gateway_key.private_pem)
        key.chmod(mode)
    config = config_file(f'[arc]\ndomain = "gw.example.net"\nselector = "arc1"\n'
                         f'private_key_file = "{key}"\nauthserv_id = "{AUTHSERV}"\n')
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75
    assert "arc.private_key_file" in run.first_line and message in run.first_line


def test_arc_section_errors_name_the_key(config_file):
    config = config_file('[arc]\ndomain = "gw.example.net"\ncolour = "blue"\n')
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], SIMPLE)
    assert run.code == 75 and "arc.colour: unknown key" in run.first_line


# -- with the real filters (issue 9) ---------------------------------------------------------

WARNING = 'text = "CAUTION: this message comes from outside the organisation."\nposition = "top"\n' \
          'subject_prefix = "[EXTERNAL] "\n'


def test_dkim_survives_a_virscan_that_only_adds_a_header(config_file, smtp_sink, mailauth, clamd):
    config = arc_config(config_file, smtp_sink, mailauth,
                        f'default_filter = ["av"]\n[filter.av]\ntype = "virscan"\nsocket = "{clamd.socket}"')
    wire = deliver(config, signed(mailauth, SIMPLE), smtp_sink)
    assert wire.startswith(b"ARC-Seal: ")                   # changed (a header), so sealed
    assert b"X-ispMailGate-VirScan: scanned" in wire
    assert dkim.verify(wire, dnsfunc=mailauth.dns.txt)       # the signed bytes are intact
    assert dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)[0] == dkim.CV_Pass


def test_top_banner_and_subject_tag_on_signed_mail_is_sealed_and_verifies(config_file, smtp_sink, mailauth):
    data = (f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=sender.example header.s=sel\n"
            "Authentication-Results: other.example; dkim=fail header.d=sender.example\n").encode()
    data += signed(mailauth, SIMPLE)
    config = arc_config(config_file, smtp_sink, mailauth,
                        'default_filter = ["warn"]\n[filter.warn]\ntype = "banner"\n' + WARNING)
    wire = deliver(config, data, smtp_sink)
    head, body = wire.split(b"\r\n\r\n", 1)
    assert b"Subject: [EXTERNAL] Notes on the analytical engine" in head
    assert body.startswith(b"CAUTION: this message comes from outside")
    assert not dkim.verify(wire, dnsfunc=mailauth.dns.txt)
    verdict, sets, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason
    aar = re.search(rb"ARC-Authentication-Results: (.*?)\r\n(?![ \t])", head, re.S).group(1)
    assert b"dkim=pass header.d=sender.example" in aar and b"dkim=fail" not in aar
    # a second pass through the gateway adds nothing and sends the bytes as they came
    again = deliver(config, wire.replace(b"\r\n", b"\n"), smtp_sink)
    assert again == wire


def test_a_banner_on_mail_with_an_arc_set_gets_instance_2(config_file, smtp_sink, mailauth):
    data = relay_sealed(mailauth)
    config = arc_config(config_file, smtp_sink, mailauth,
                        'default_filter = ["warn"]\n[filter.warn]\ntype = "banner"\n' + WARNING)
    wire = deliver(config, data, smtp_sink)
    verdict, sets, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)
    assert verdict == dkim.CV_Pass, reason
    assert re.search(rb"ARC-Seal: i=2; cv=pass;", wire)


def test_skip_leaves_signed_mail_verifiable_and_still_banners_unsigned_mail(config_file, smtp_sink, mailauth):
    config = arc_config(config_file, smtp_sink, mailauth,
                        'default_filter = ["warn"]\n[filter.warn]\ntype = "banner"\non_dkim_signed = "skip"\n'
                        + WARNING)
    data = signed(mailauth, SIMPLE)
    wire = deliver(config, data, smtp_sink)
    assert wire == data.replace(b"\n", b"\r\n")               # untouched: not even sealed
    assert dkim.verify(wire, dnsfunc=mailauth.dns.txt)
    unsigned = deliver(config, SIMPLE, smtp_sink)
    assert b"Subject: [EXTERNAL] Notes on the analytical engine" in unsigned
    assert dkim.arc_verify(unsigned, dnsfunc=mailauth.dns.txt)[0] == dkim.CV_Pass


# -- DNS on a budget (issue 15): a resolver that does not answer, or answers garbage --------

LETTER = (b"From: Author <author@sender.example>\nTo: rcpt@example.com\nSubject: Request for Leave\n"
          b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <leave@sender.example>\n\n"
          b"Please grant me leave next week.\n")


@pytest.fixture
def misbehaving():
    servers = []

    def start(mode: str, records: dict[str, str] | None = None) -> MisbehavingDns:
        servers.append(MisbehavingDns(mode, records))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def dkim_results(wire: bytes) -> list[str]:
    """The dkim results of the newest AAR, as ``result header.d=...``."""
    return [m.decode() for m in re.findall(rb"dkim=(\w+(?: header\.d=\S+)?)", aar_of(wire))]


def budget_config(config_file, sink, auth, resolver: str, extra: str = "") -> str:
    return arc_config(config_file, sink, auth, 'default_filter = ["gate_test_filters:Upcase"]',
                      f'verify_dkim = true\n{extra}').read_text().replace(auth.dns.address, resolver)


@pytest.mark.parametrize("mode", ["silent", "garbage", "servfail"])
def test_a_resolver_that_fails_gives_temperror_never_fail_and_the_seal_holds(config_file, smtp_sink,
                                                                            mailauth, misbehaving, mode):
    """dkimpy swallows its own DnsTimeoutError into False ("fail"): the gateway watches its lookups."""
    server = misbehaving(mode)
    config = config_file(budget_config(config_file, smtp_sink, mailauth, server.address,
                                       "dns_timeout = 1.5"), name="budget.toml")
    wire = deliver(config, signed(mailauth, LETTER), smtp_sink)
    assert dkim_results(wire) == ["temperror header.d=sender.example"]
    assert server.distinct == {"sel._domainkey.sender.example"}
    verdict, _, reason = dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)      # sealed, honestly
    assert verdict == dkim.CV_Pass, reason


def with_signatures(mauth, count: int, *, same_domain: bool = False) -> bytes:
    """A signed message with ``count`` DKIM-Signature fields, each for another d= (or the same)."""
    message = signed(mauth, LETTER)
    first, rest = message.split(b"\n", 1)
    while rest[:1] in (b" ", b"\t"):
        line, rest = rest.split(b"\n", 1)
        first += b"\n" + line
    copies = [first if same_domain else first.replace(b"sender.example", f"s{i}.example".encode())
              for i in range(count)]
    return b"\n".join(copies) + b"\n" + rest


def test_thirty_signatures_and_a_failing_resolver_stay_within_the_budget(config_file, smtp_sink, mailauth,
                                                                          misbehaving, tmp_path):
    server = misbehaving("servfail")
    config = config_file(budget_config(config_file, smtp_sink, mailauth, server.address, "dns_lookups = 4"),
                         name="budget.toml")
    wire = deliver(config, with_signatures(mailauth, 30), smtp_sink)
    assert len(server.distinct) == 4                     # the budget: four names asked, no more
    results = dkim_results(wire)
    assert len(results) == 10 and all(r.startswith("temperror") for r in results)
    log = (tmp_path / "gate.log").read_text()
    assert "30 DKIM signatures: only the first 10 are checked" in log
    assert dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)[0] == dkim.CV_Pass


def test_a_silent_resolver_costs_the_time_budget_once_not_per_signature(config_file, smtp_sink, mailauth,
                                                                        misbehaving):
    server = misbehaving("silent")
    config = config_file(budget_config(config_file, smtp_sink, mailauth, server.address, "dns_timeout = 1"),
                         name="budget.toml")
    wire = deliver(config, with_signatures(mailauth, 30), smtp_sink)
    assert len(server.distinct) == 1                      # the second query found the time spent
    assert dkim_results(wire).count("temperror header.d=s0.example") == 1
    assert all(r.startswith("temperror") for r in dkim_results(wire))


def test_answers_are_cached_per_message_and_a_bad_key_is_permerror(config_file, smtp_sink, mailauth,
                                                                   misbehaving):
    server = misbehaving("records", {"sel._domainkey.sender.example": mailauth.sender_txt,
                                     "sel._domainkey.s1.example": "v=DKIM1; k=rsa; p=not a key"})
    config = config_file(budget_config(config_file, smtp_sink, mailauth, server.address), name="budget.toml")
    wire = deliver(config, with_signatures(mailauth, 5, same_domain=True), smtp_sink)
    assert dkim_results(wire) == ["pass header.d=sender.example"] * 5
    assert server.names == ["sel._domainkey.sender.example"]         # asked once for five signatures
    wire = deliver(config, with_signatures(mailauth, 3), smtp_sink)
    assert dkim_results(wire) == ["permerror header.d=s0.example", "permerror header.d=s1.example",
                                  "permerror header.d=s2.example"]     # no key, a broken key: never fail


def test_an_arc_chain_dns_cannot_decide_is_not_sealed_over(config_file, smtp_sink, mailauth, misbehaving,
                                                           tmp_path):
    """cv can only be none, pass or fail: with DNS silent the chain is none of them, so the
    changed message goes on without a new set (never cv=fail for a chain that may be good)."""
    server = misbehaving("silent")
    config = arc_config(config_file, smtp_sink, mailauth, 'default_filter = ["gate_test_filters:Upcase"]',
                        "dns_timeout = 1").read_text().replace(mailauth.dns.address, server.address)
    data = relay_sealed(mailauth, base=LETTER)
    wire = deliver(config_file(config, name="budget.toml"), data, smtp_sink)
    assert b"ARC-Seal: i=2" not in wire and b"ARC-Seal: i=1" in wire
    assert wire.endswith(b"\r\n\r\nPLEASE GRANT ME LEAVE NEXT WEEK.\r\n")      # delivered, changed
    log = (tmp_path / "gate.log").read_text()
    assert "existing ARC chain not validated (DNS: relay._domainkey.relay.example: no answer" in log
    assert server.distinct == {"relay._domainkey.relay.example"}


@pytest.mark.parametrize("setting, complaint", [("dns_lookups = -1", "arc.dns_lookups: expected a count"),
                                                ("dns_lookups = true", "arc.dns_lookups: expected a count"),
                                                ("dns_timeout = 0", "arc.dns_timeout: expected seconds"),
                                                ('dns_timeout = "5"', "arc.dns_timeout: expected seconds")])
def test_the_dns_budget_is_checked_with_the_rule_file(config_file, smtp_sink, mailauth, setting, complaint):
    config = arc_config(config_file, smtp_sink, mailauth, arc_extra=setting)
    run = run_gate(["-c", str(config), "-f", "a@b.example", "c@d.example"], LETTER)
    assert run.code == 75 and complaint in run.first_line
