"""What checking DKIM and ARC may cost a message: bounded, and the results stay honest.

The first outside attack review (finding 4): every incoming ARC instance was validated
(1000 sets: 34 s, quadratic), a sender-chosen key with an 8192-bit public exponent cost
seconds per signature in one ``pow()`` the time limit cannot interrupt, and dkimpy's own
header parser is quadratic in folded lines.  Here each shape is sent through the gate, with
dkimpy's public-key arithmetic counted: what no legitimate signer uses is refused before any
arithmetic (``permerror``, or a failed chain), a spent budget is ``temperror`` or no new ARC
set, never a pass or a fail the signature did not earn.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re

import dkim
import dkim.crypto
import pytest

from conftest import run_inline
from support.costly import cpu_seconds, folded_header
from support.mailauth import MisbehavingDns, signed

AUTHSERV = "mx.example.net"
LETTER = (b"From: Author <author@sender.example>\nTo: rcpt@example.com\nSubject: Request for Leave\n"
          b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <leave@sender.example>\n\n"
          b"Please grant me leave next week.\n")
EMPTY_BODY_HASH = base64.b64encode(hashlib.sha256(b"").digest()).decode()


@pytest.fixture
def public_key_operations(monkeypatch) -> list[tuple[int, int, int]]:
    """Every RSA public-key operation dkimpy does: (signature bytes, modulus bits, exponent bits)."""
    calls: list[tuple[int, int, int]] = []
    real = dkim.crypto.rsa_encrypt

    def counted(message, key, length):
        calls.append((len(message), key["modulus"].bit_length(), key["publicExponent"].bit_length()))
        return real(message, key, length)
    monkeypatch.setattr(dkim.crypto, "rsa_encrypt", counted)
    return calls


@pytest.fixture
def dns():
    servers: list[MisbehavingDns] = []

    def start(records: dict[str, str]) -> MisbehavingDns:
        servers.append(MisbehavingDns("records", records))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def key_record(modulus_bits: int, exponent_bits: int, seed: int = 1) -> str:
    """A DKIM key record of an RSA public key with these sizes (no private half: nothing
    signed with it verifies, which is beside the point: it must not be computed with)."""
    rng = random.Random(seed)
    modulus = rng.getrandbits(modulus_bits) | 1 << modulus_bits - 1 | 1
    exponent = rng.getrandbits(exponent_bits) | 1 << exponent_bits - 1 | 1

    def integer(value: int) -> bytes:
        data = value.to_bytes(value.bit_length() // 8 + 1, "big")
        return b"\x02" + length(len(data)) + data

    def length(size: int) -> bytes:
        return bytes([size]) if size < 128 else bytes([0x82]) + size.to_bytes(2, "big")
    body = integer(modulus) + integer(exponent)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(b'0' + length(len(body)) + body).decode()}"


def arc_config(config_file, sink, auth, resolver: str, arc_extra: str = "") -> str:
    return str(config_file(f'''
        mail_host = "{sink.address}"
        loop_suffix = ""
        default_filter = ["gate_test_filters:Upcase"]
        [arc]
        domain = "{auth.gateway_key.domain}"
        selector = "{auth.gateway_key.selector}"
        private_key_file = "{auth.gateway_key.path}"
        authserv_id = "{AUTHSERV}"
        resolver = "{resolver}"
        {arc_extra}
    '''))


def deliver(config: str, data: bytes, sink) -> bytes:
    run = run_inline(["-c", config, "-f", "author@sender.example", "rcpt@example.com"], data)
    assert run.code == 0, run.stderr
    assert len(sink.messages) == 1
    return sink.messages[-1].content


def aar(wire: bytes) -> bytes:
    head = wire.split(b"\r\n\r\n", 1)[0]
    match = re.search(rb"ARC-Authentication-Results: i=\d+; (.*?)\r\n(?![ \t])", head, re.S)
    return re.sub(rb"\r\n[ \t]+", b" ", match.group(1)) if match else b""


def arc_sets(count: int, signature: bytes = b"A" * 172) -> bytes:
    """``count`` ARC sets of attacker.example, newest first, as a sender can write them."""
    b = signature.decode()
    lines = []
    for instance in range(count, 0, -1):
        lines += [f"ARC-Seal: i={instance}; a=rsa-sha256; cv={'none' if instance == 1 else 'pass'}; "
                  f"d=attacker.example; s=s1; t=1; b={b}",
                  f"ARC-Message-Signature: i={instance}; a=rsa-sha256; c=relaxed/relaxed; "
                  f"d=attacker.example; s=s1; h=from; bh={EMPTY_BODY_HASH}; b={b}",
                  f"ARC-Authentication-Results: i={instance}; mx.attacker.example; dkim=pass"]
    return ("\n".join(lines) + "\n").encode() + LETTER


def relay_sealed(auth) -> bytes:
    original = b"Authentication-Results: relay.example; dkim=pass header.d=sender.example\n" + signed(auth, LETTER)
    relay = auth.relay_key
    first = dkim.arc_sign(original.replace(b"\n", b"\r\n"), relay.selector.encode(), relay.domain.encode(),
                          relay.private_pem, b"relay.example")
    return b"".join(first).replace(b"\r\n", b"\n") + original


# -- ARC: at most 50 sets, as RFC 8617 says ------------------------------------------------

def test_a_chain_of_more_than_50_sets_fails_without_a_lookup_or_a_key_operation(
        config_file, smtp_sink, mailauth, dns, public_key_operations, tmp_path):
    server = dns({"s1._domainkey.attacker.example": key_record(1024, 17)})
    wire = deliver(arc_config(config_file, smtp_sink, mailauth, server.address), arc_sets(51), smtp_sink)
    assert server.names == [] and public_key_operations == []
    log = (tmp_path / "gate.log").read_text()
    assert "existing ARC chain: fail (51 ARC sets (RFC 8617 allows 50))" in log
    # RFC 8617 has no instance 52: the changed message goes on without a set, and says so
    assert b"ARC-Seal: i=52" not in wire and "delivered unsealed" in log
    assert wire.endswith(b"PLEASE GRANT ME LEAVE NEXT WEEK.\r\n")


def test_a_doubled_set_fails_before_any_key_is_fetched(config_file, smtp_sink, mailauth, dns,
                                                        public_key_operations, tmp_path):
    server = dns({"s1._domainkey.attacker.example": key_record(1024, 17)})
    data = arc_sets(3)
    data = data.replace(b"ARC-Seal: i=2;", b"ARC-Seal: i=2; x=1; b=AAAA\nARC-Seal: i=2;", 1)
    wire = deliver(arc_config(config_file, smtp_sink, mailauth, server.address), data, smtp_sink)
    assert server.names == [] and public_key_operations == []
    assert b"arc=fail" in aar(wire) and re.search(rb"ARC-Seal: i=4; cv=fail;", wire)


# -- keys and signatures no signer uses: refused before any arithmetic ------------------------

def test_a_dkim_key_with_a_huge_public_exponent_is_permerror_without_arithmetic(
        config_file, smtp_sink, mailauth, dns, public_key_operations):
    server = dns({"sel._domainkey.sender.example": key_record(2048, 1024)})
    config = arc_config(config_file, smtp_sink, mailauth, server.address, "verify_dkim = true")
    wire = deliver(config, signed(mailauth, LETTER), smtp_sink)
    assert b"dkim=permerror header.d=sender.example" in aar(wire)
    assert public_key_operations == []


def test_a_dkim_key_above_8192_bits_is_permerror_without_arithmetic(config_file, smtp_sink, mailauth, dns,
                                                                      public_key_operations):
    server = dns({"sel._domainkey.sender.example": key_record(8200, 17)})
    config = arc_config(config_file, smtp_sink, mailauth, server.address, "verify_dkim = true")
    wire = deliver(config, signed(mailauth, LETTER), smtp_sink)
    assert b"dkim=permerror header.d=sender.example" in aar(wire)
    assert public_key_operations == []


def test_an_arc_chain_sealed_with_a_huge_exponent_fails_without_arithmetic(
        config_file, smtp_sink, mailauth, dns, public_key_operations):
    server = dns({"relay._domainkey.relay.example": key_record(2048, 2048)})
    wire = deliver(arc_config(config_file, smtp_sink, mailauth, server.address), relay_sealed(mailauth),
                   smtp_sink)
    assert b"arc=fail" in aar(wire) and re.search(rb"ARC-Seal: i=2; cv=fail;", wire)
    assert public_key_operations == []


def test_a_signature_longer_than_any_key_is_permerror_and_never_made_a_number(
        config_file, smtp_sink, mailauth, public_key_operations):
    message = signed(mailauth, LETTER)
    long_signature = base64.encodebytes(bytes(range(256)) * 8).replace(b"\n", b"\n ")   # a 16384-bit key's
    message = re.sub(rb"b=[A-Za-z0-9+/=\s]+?(?=\nFrom:)", b"b=" + long_signature.strip(), message, count=1)
    config = arc_config(config_file, smtp_sink, mailauth, mailauth.dns.address, "verify_dkim = true")
    wire = deliver(config, message, smtp_sink)
    assert b"dkim=permerror header.d=sender.example" in aar(wire)
    assert public_key_operations == []


def test_a_good_signature_with_a_usual_key_still_passes(config_file, smtp_sink, mailauth,
                                                        public_key_operations):
    config = arc_config(config_file, smtp_sink, mailauth, mailauth.dns.address, "verify_dkim = true")
    wire = deliver(config, signed(mailauth, LETTER), smtp_sink)
    assert b"dkim=pass header.d=sender.example" in aar(wire)
    assert public_key_operations == [(256, 2048, 17)]


# -- one work budget per message ------------------------------------------------------------

def with_signatures(auth, count: int) -> bytes:
    message = signed(auth, LETTER)
    head, rest = message.split(b"\nFrom:", 1)
    return b"\n".join([head] * count) + b"\nFrom:" + rest


def test_past_the_work_budget_signatures_are_temperror_never_fail(config_file, smtp_sink, mailauth, monkeypatch,
                                                                  public_key_operations, tmp_path):
    from ispmailgate_core import dkim_bounds

    monkeypatch.setattr(dkim_bounds, "WORK_UNITS", 0)
    monkeypatch.setattr(dkim_bounds, "MIN_PASSES", 3)
    config = arc_config(config_file, smtp_sink, mailauth, mailauth.dns.address, "verify_dkim = true")
    wire = deliver(config, with_signatures(mailauth, 5), smtp_sink)
    results = re.findall(rb"dkim=(\w+)", aar(wire))
    assert results == [b"pass"] * 3 + [b"temperror"] * 2
    assert len(public_key_operations) == 3
    assert "DKIM signature 4 not checked: the work budget of this message is spent" in (
        tmp_path / "gate.log").read_text()


def test_an_arc_chain_past_the_work_budget_gets_no_new_set(config_file, smtp_sink, mailauth, monkeypatch,
                                                          public_key_operations, tmp_path):
    from ispmailgate_core import dkim_bounds

    monkeypatch.setattr(dkim_bounds, "WORK_UNITS", 0)
    monkeypatch.setattr(dkim_bounds, "MIN_PASSES", 2)        # one set costs three passes
    wire = deliver(arc_config(config_file, smtp_sink, mailauth, mailauth.dns.address), relay_sealed(mailauth),
                   smtp_sink)
    assert b"ARC-Seal: i=2" not in wire and b"ARC-Seal: i=1" in wire
    assert public_key_operations == []
    assert "existing ARC chain of 1 sets not validated: the work budget" in (tmp_path / "gate.log").read_text()


def test_the_budget_lets_a_usual_chain_and_signature_through(config_file, smtp_sink, mailauth,
                                                             public_key_operations):
    config = arc_config(config_file, smtp_sink, mailauth, mailauth.dns.address, "verify_dkim = true")
    wire = deliver(config, relay_sealed(mailauth), smtp_sink)
    assert re.search(rb"ARC-Seal: i=2; cv=pass;", wire)
    assert b"dkim=pass header.d=sender.example" in aar(wire) and b"arc=pass" in aar(wire)
    assert dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)[0] == dkim.CV_Pass


# -- fields dkimpy trips over: an honest result, and the message still sealed ------------------

def test_a_signature_dkimpy_trips_over_is_permerror_and_the_message_sealed(config_file, smtp_sink, mailauth):
    # i= equal to d= (no "@"): dkimpy's check indexes before the domain and raises IndexError
    message = signed(mailauth, LETTER).replace(b"i=@sender.example;", b"i=sender.example;", 1)
    assert b"i=sender.example;" in message
    config = arc_config(config_file, smtp_sink, mailauth, mailauth.dns.address, "verify_dkim = true")
    wire = deliver(config, message, smtp_sink)
    assert b"dkim=permerror header.d=sender.example" in aar(wire)
    assert dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)[0] == dkim.CV_Pass


def test_other_verifiers_results_in_any_bytes_do_not_stop_the_seal(config_file, smtp_sink, mailauth):
    message = b"Authentication-Results: other.example; dkim=pass (\xff\xfe)\n" + LETTER
    wire = deliver(arc_config(config_file, smtp_sink, mailauth, mailauth.dns.address), message, smtp_sink)
    assert re.search(rb"ARC-Seal: i=1; cv=none;", wire)
    assert dkim.arc_verify(wire, dnsfunc=mailauth.dns.txt)[0] == dkim.CV_Pass


# -- linear in the message: n against 4n -----------------------------------------------------

LINEAR_AT_MOST = 8.0


def sealer(auth, **changes):
    from ispmailgate_core.arc import ArcSettings, Sealer

    settings = ArcSettings(auth.gateway_key.domain, auth.gateway_key.selector, auth.gateway_key.private_pem,
                           AUTHSERV, False, None)._replace(**changes)
    seal = Sealer(settings)
    record = key_record(1024, 17).encode()
    seal.lookups.txt = lambda name, timeout=5: record       # no DNS: the cost is what is measured
    return seal


def sealing(auth, **changes):
    def seal(data: bytes) -> None:
        try:
            sealer(auth, **changes).seal(data, data, b"\n")
        except dkim.DKIMException:      # no instance 51: what the gate delivers unsealed
            pass
    return seal


def signed_folded(auth):
    """A DKIM-Signature above the folded header (signed once, small: dkimpy's signer parses
    quadratically too; that the signature no longer matches changes nothing measured)."""
    signature = signed(auth, LETTER).split(b"\nFrom:", 1)[0] + b"\n"
    return lambda lines: signature + folded_header(lines)


@pytest.mark.parametrize("name, build, changes, n", [
    ("folded header, sealed", lambda auth: folded_header, {}, 80_000),
    ("folded header, DKIM checked", signed_folded, {"verify_dkim": True}, 80_000),
    ("ARC sets beyond 50", lambda auth: arc_sets, {}, 200),
])
def test_checking_and_sealing_cost_linear_time(mailauth, name, build, changes, n):
    action, builder = sealing(mailauth, **changes), build(mailauth)
    small = cpu_seconds(action, builder(n))
    while small < 0.02:
        n *= 4
        small = cpu_seconds(action, builder(n))
    large = cpu_seconds(action, builder(4 * n))
    assert large / small <= LINEAR_AT_MOST, f"{name}: n={n} took {small:.4f} s, 4n {large:.4f} s"
