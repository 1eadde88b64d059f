"""ARC sealing (RFC 8617) of the messages a filter changed, with dkimpy.

A banner or a subject tag changes signed bytes and breaks DKIM.  ARC lets the gateway
record what it saw before the change — the Authentication-Results of the site's own
verifier (``authserv_id``), or its own DKIM verification (``verify_dkim``) — and seal the
changed message with its own key, so receivers that trust the gateway can accept it.

Only messages that some filter changed are sealed; an untouched message goes out byte
for byte.  The seal is computed over the wire form (CRLF line ends, exactly the bytes the
next hop gets).  This module and dkimpy are imported only when ``[arc]`` is configured.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, NamedTuple

from ispmailgate_filters.base import ConfigError

log = logging.getLogger("ispmailgate.arc")

KEYS = {
    "domain": "Signing domain (d=) of the ARC set.",
    "selector": "Selector (s=); the public key is published at SELECTOR._domainkey.DOMAIN.",
    "private_key_file": "PEM RSA private key; refused if readable by others. Read before "
                        "privileges are dropped.",
    "authserv_id": "Trust Authentication-Results headers with this authserv-id (the MTA's "
                   "verifier); the ARC-Authentication-Results carries their results.",
    "verify_dkim": "true: verify DKIM signatures of the message as it arrived, and record "
                   "the result (default false).",
    "resolver": "DNS server HOST[:PORT] for verify_dkim and for validating an existing ARC "
                "chain (default: the system's resolver).",
}


class ArcSettings(NamedTuple):
    domain: str
    selector: str
    private_key: bytes
    authserv_id: str
    verify_dkim: bool
    resolver: tuple[str, int] | None


def load_section(table: Any, where: str) -> ArcSettings:
    """The ``[arc]`` table, checked when the rule file is read."""
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a table")
    for key in table:
        if key not in KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key (known: {', '.join(KEYS)})")
    text = {}
    for key in ("domain", "selector", "private_key_file", "authserv_id"):
        value = table.get(key)
        if not isinstance(value, str) or not value or re.search(r"[\s;=]", value):
            raise ConfigError(f"{where}.{key}", "required: a non-empty word")
        text[key] = value
    verify = table.get("verify_dkim", False)
    if not isinstance(verify, bool):
        raise ConfigError(f"{where}.verify_dkim", "expected true or false")
    return ArcSettings(text["domain"], text["selector"], _private_key(text["private_key_file"], where),
                       text["authserv_id"], verify, _resolver(table.get("resolver"), where))


def _private_key(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            info = os.fstat(stream.fileno())
            if info.st_mode & 0o004:
                raise ConfigError(f"{where}.private_key_file", f"{path} is readable by others "
                                  f"(chmod o-r {path})")
            if os.geteuid() == 0:       # a secret root reads: only root may change it
                from ispmailgate_filters.files import untrusted

                reason = untrusted(path, info)
                if reason:
                    raise ConfigError(f"{where}.private_key_file", f"{reason}: refused as root")
            key = stream.read()
    except OSError as error:
        raise ConfigError(f"{where}.private_key_file", f"cannot read {path}: {error.strerror}") from None
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"{where}.private_key_file", f"{path} holds no PEM private key")
    return key


def _resolver(value: Any, where: str) -> tuple[str, int] | None:
    """HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address; port 53 unless given."""
    if value is None:
        return None
    from ispmailgate_delivery import parse_hop

    text = value.strip() if isinstance(value, str) else ""
    try:
        host, port = parse_hop(text)
    except ValueError:
        raise ConfigError(f"{where}.resolver", f"expected HOST[:PORT], got {value!r}") from None
    explicit = "]:" in text or text.count(":") == 1
    return host, port if explicit else 53


class Sealer:
    """Seals changed messages for one run; verifies what arrived at most once."""

    def __init__(self, settings: ArcSettings) -> None:
        self.settings = settings
        self._gateway_results: list[str] | None = None

    def seal(self, original: bytes | bytearray, changed: bytes | bytearray, eol: bytes) -> bytes:
        """``changed`` with one ARC set on top, in ``changed``'s own line ending."""
        import dkim

        wire = _crlf(changed)
        results = self._results(bytes(original))
        stamp = f"Authentication-Results: {self.settings.authserv_id}; {'; '.join(results) or 'none'}\r\n"
        arc_set = dkim.arc_sign(stamp.encode() + wire, self.settings.selector.encode(),
                                self.settings.domain.encode(), self.settings.private_key,
                                self.settings.authserv_id.encode(), linesep=b"\r\n")
        if not arc_set:
            raise dkim.DKIMException("dkimpy produced no ARC set")
        head = b"".join(arc_set)
        return (head if eol == b"\r\n" else head.replace(b"\r\n", eol)) + bytes(changed)

    def _results(self, original: bytes) -> list[str]:
        """What the gateway adds to the trusted results: its own DKIM and ARC findings.

        The ARC finding is always there unless the trusted verifier gave one: dkimpy drops
        a bare ``none`` when it merges results, and an AAR with no result at all is not
        valid RFC 8601 (nor what RFC 8617 asks for, which is the ``arc`` result).
        """
        if self._gateway_results is None:
            trusted = _trusted_methods(original, self.settings.authserv_id)
            results = self._dkim_results(original) if self.settings.verify_dkim else []
            if "arc" not in trusted:
                arrived_sealed = _headers(original).get("ARC-Seal") is not None
                results.append(f"arc={self._chain(original) if arrived_sealed else 'none'}")
            self._gateway_results = results
        return self._gateway_results

    def _dkim_results(self, original: bytes) -> list[str]:
        import dkim

        message = _crlf(original)
        count = len(_headers(original).get_all("DKIM-Signature"))
        if not count:
            return ["dkim=none"]
        results = []
        for index in range(count):
            verifier = dkim.DKIM(message, minkey=1024)
            try:
                good = verifier.verify(idx=index, dnsfunc=self.dns)
            except dkim.DnsTimeoutError:
                results.append("dkim=temperror")
                continue
            except dkim.DKIMException as error:
                log.info("DKIM signature %d: %s", index + 1, error)
                good = False
            result = "pass" if good else "fail"
            domain = (verifier.domain or b"").decode("ascii", "replace")
            selector = (verifier.selector or b"").decode("ascii", "replace")
            results.append(f"dkim={result} header.d={domain} header.s={selector}" if domain else f"dkim={result}")
        return results

    def _chain(self, original: bytes) -> str:
        """Validate the ARC chain the message arrived with: pass, fail or none."""
        import dkim

        verdict, _, reason = dkim.arc_verify(_crlf(original), dnsfunc=self.dns)
        log.info("existing ARC chain: %s (%s)", verdict.decode(), reason)
        return verdict.decode()

    def dns(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """TXT lookup for dkimpy, through the configured resolver."""
        import dkim
        import dns.exception
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=self.settings.resolver is None)
        if self.settings.resolver is not None:
            resolver.nameservers = [self.settings.resolver[0]]
            resolver.port = self.settings.resolver[1]
        name = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(name, "TXT", lifetime=timeout, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as error:
            raise dkim.DnsTimeoutError(str(error)) from None
        for record in answer.response.answer:
            if record.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(record.items)).strings)
        return None


def _trusted_methods(message: bytes, authserv_id: str) -> set[str]:
    """Methods (dkim, spf, arc ...) in the Authentication-Results of the trusted verifier."""
    import authres

    methods = set()
    for value in _headers(message).get_all("Authentication-Results"):
        try:
            header = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
        except Exception:       # authres raises its own SyntaxError family on garbage
            continue
        if header.authserv_id == authserv_id:
            methods.update(result.method for result in header.results)
    return methods


def _headers(message: bytes):
    from ispmailgate_filters.mime import Message

    return Message(message).top_headers()


def _crlf(data: bytes | bytearray) -> bytes:
    """The wire form, as SmtpHop sends it."""
    from ispmailgate_delivery import wire_chunks

    return b"".join(wire_chunks(data, b"\r\n"))
