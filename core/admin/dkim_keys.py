"""The ``[[dkim]]`` keys for an administrator: ``check`` signs with each and compares what
DNS publishes for it (a key that does not match its record is the most common DKIM
outage); ``ispmailgate dkim-record`` prints the record to publish."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import BinaryIO

from ispmailgate_filters.base import ConfigError

from ..keys import key_record, publishes
from ..rules import find_config, load_config
from ..signing import MIN_RSA_BITS, DkimSettings, dns_name, signature
from ..status import EX_CONFIG, EX_OK
from .output import Output

DNS_PROBE_SECONDS = 5.0     # all the time one record's query may take, retries included
TXT_STRING = 255            # the longest character-string of a TXT record (RFC 1035 3.3)


def signing_findings(tables: tuple[DkimSettings, ...], probe_dns: bool) -> tuple[list[ConfigError], list[str]]:
    """Problems and warnings of each ``[[dkim]]`` table: a test signature made with its key
    and verified with its public half; with ``probe_dns``, the record DNS publishes for it."""
    problems, warnings = [], []
    for table in tables:
        if table.sign == "always":
            warnings.append(f"warning: {table.where}: sign = \"always\" signs mail from the internet that "
                            f"claims From: {table.domain} as well: only for a gateway that sees outbound "
                            "mail alone; otherwise give --originating on the MTA's transport for its users")
        trouble = _test_signature(table)
        if trouble:
            problems.append(ConfigError(f"{table.where}.private_key_file", trouble))
        elif probe_dns:
            answer = txt_records(table.dns_name, table.resolver, DNS_PROBE_SECONDS)
            if isinstance(answer, str):
                warnings.append(f"warning: {table.where}: DNS did not answer for {table.dns_name} "
                                f"({answer}): the key it publishes was not compared")
            else:
                trouble = _record_problem(table, answer)
                problems += [ConfigError(f"{table.where}.selector", trouble)] if trouble else []
    return problems, warnings


def _test_signature(table: DkimSettings) -> str:
    """What is wrong with signing with this table's key, or "": dkimpy signs a small
    message with it, and the signature must verify with the key's own public half."""
    import dkim

    wire = (f"From: check@{table.domain}\r\nSubject: ispmailgate check\r\n\r\n"
            "A test signature.\r\n").encode()
    record = key_record(table.key).encode()
    try:
        signed = signature(table, wire) + wire
        good = dkim.DKIM(signed, minkey=MIN_RSA_BITS).verify(dnsfunc=lambda name, timeout=5: record)
    except Exception as error:      # noqa: BLE001 -- whatever dkimpy raises is the answer
        return f"cannot sign with {table.key_file}: {type(error).__name__}: {error}"
    return "" if good else f"a signature made with {table.key_file} does not verify with its own public key"


def txt_records(name: str, resolver: tuple[str, int] | None, seconds: float) -> list[str] | str:
    """The TXT records at ``name`` ([] if there are none), or why DNS did not say."""
    import dns.exception
    import dns.rdatatype
    import dns.resolver

    try:
        client = dns.resolver.Resolver(configure=resolver is None)
        if resolver is not None:
            client.nameservers, client.port = [resolver[0]], resolver[1]
        answer = client.resolve(name, "TXT", lifetime=seconds, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    except dns.exception.Timeout:
        return f"no answer within {seconds:g} s"
    except dns.exception.DNSException as error:     # SERVFAIL, REFUSED, no resolv.conf ...
        return f"no usable answer: {type(error).__name__}"
    return [b"".join(item.strings).decode("utf-8", "replace")
            for record in answer.response.answer if record.rdtype == dns.rdatatype.TXT for item in record]


def _record_problem(table: DkimSettings, records: list[str]) -> str:
    """What keeps receivers from verifying this table's signatures with what DNS publishes."""
    publish = f"publish what ispmailgate dkim-record {table.domain} prints"
    if not records:
        return f"{table.dns_name} publishes no key: receivers cannot verify a signature; {publish}"
    if len(records) > 1:
        return f"{table.dns_name} has {len(records)} TXT records: a receiver uses any one of them; keep one"
    tags = {}
    for part in records[0].split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags[name.strip().lower()] = "".join(value.split())
    mismatch = _mismatch(table, tags)
    return f"{table.dns_name}: {mismatch}; {publish}" if mismatch else ""


def _mismatch(table: DkimSettings, tags: dict[str, str]) -> str:
    kind = tags.get("k", "rsa").lower()
    if tags.get("v", "DKIM1") != "DKIM1":
        return f"not a DKIM key record (v={tags['v']})"
    if kind != table.key.kind:
        return f"publishes a k={kind} key, and private_key_file holds an {table.key.kind} key"
    if "p" not in tags or not tags["p"]:
        return "the key is revoked (empty p=)" if "p" in tags else "a record without p="
    hashes = tags.get("h")
    if hashes and "sha256" not in hashes.lower().split(":"):
        return f"h={hashes} does not allow sha256"
    try:
        published = base64.b64decode(tags["p"], validate=True)
    except binascii.Error:
        return "p= is not base64"
    if not publishes(table.key, published):
        return (f"publishes another key than {table.key_file} holds: receivers fail every "
                "signature made with it")
    return ""


def dkim_record(requested: Path | None, domain: str, stdout: BinaryIO) -> int:
    """The TXT record of each ``[[dkim]]`` table of ``domain``, as a zone file line."""
    out = Output(stdout)
    try:
        config = load_config(find_config(requested))
        wanted = dns_name(domain, "DOMAIN")
    except ConfigError as error:
        out.line(str(error))
        out.close()
        return EX_CONFIG
    tables = [table for table in config.sections.get("dkim", ()) if table.domain == wanted]
    if not tables:
        configured = sorted({table.domain for table in config.sections.get("dkim", ())})
        out.line(f"{config.path}: no [[dkim]] table signs as {wanted}"
                 f" ({'its domains: ' + ', '.join(configured) if configured else 'it has none'})")
        out.close()
        return EX_CONFIG
    for table in tables:
        bits = f"a {table.key.bits}-bit RSA key" if table.key.kind == "rsa" else "an Ed25519 key"
        out.line(f"; {table.where}: {table.algorithm}, {bits} from {table.key_file}")
        for line in _zone_lines(table.dns_name, key_record(table.key)):
            out.line(line)
    out.close()
    return EX_OK


def _zone_lines(name: str, record: str) -> list[str]:
    """The record as a zone file has it: quoted strings of at most 255 characters each."""
    pieces = [f'"{record[i:i + TXT_STRING]}"' for i in range(0, len(record), TXT_STRING)]
    if len(pieces) == 1:
        return [f"{name}. IN TXT {pieces[0]}"]
    return [f"{name}. IN TXT ( {pieces[0]}", *(f"        {piece}" for piece in pieces[1:-1]),
            f"        {pieces[-1]} )"]
