"""ARC sealing (RFC 8617) of the messages a filter changed, with dkimpy.

A banner or a subject tag changes signed bytes and breaks DKIM.  ARC lets the gateway
record what it saw before the change — the Authentication-Results of the site's own
verifier (``authserv_id``), or its own DKIM verification (``verify_dkim``) — and seal the
changed message with its own key, so receivers that trust the gateway can accept it.

Only messages that some filter changed are sealed; an untouched message goes out byte
for byte.  The seal is computed over the wire form (CRLF line ends, exactly the bytes the
next hop gets).  This module and dkimpy are imported only when ``[arc]`` is configured.

DNS is asked on a budget per message (``dns_lookups`` queries, ``dns_timeout`` seconds,
each name once): a timeout, a failure or a spent budget is ``temperror``, never ``fail``,
and an existing chain DNS could not decide gets no new set rather than ``cv=fail``.  What
checking costs besides DNS (keys, signatures, ARC sets, passes over the message) is bounded
in :mod:`.dkim_bounds`, with the same rule: a spent budget is never a pass or a fail.
"""

from __future__ import annotations

import logging
import re
from typing import Any, NamedTuple

from ispmailgate_filters.base import ConfigError

from .dkim_bounds import MAX_ARC_INSTANCES, Work, overlong_signature, parse, passes, prepared, refused_key, tags

log = logging.getLogger("ispmailgate.arc")

KEYS = {
    "domain": "Signing domain (d=) of the ARC set.",
    "selector": "Selector (s=); the public key is published at SELECTOR._domainkey.DOMAIN.",
    "private_key_file": "PEM RSA private key; refused if readable by others. Read before "
                        "privileges are dropped.",
    "authserv_id": "Trust Authentication-Results headers with this authserv-id (the MTA's "
                   "verifier); the ARC-Authentication-Results carries their results. The MTA must "
                   "remove such headers from mail arriving from outside (RFC 8601 section 5).",
    "verify_dkim": "true: verify DKIM signatures of the message as it arrived, and record "
                   "the result (default false).",
    "resolver": "DNS server HOST[:PORT] for verify_dkim and for validating an existing ARC "
                "chain (default: the system's resolver).",
    "dns_lookups": "Most DNS queries for one message (default 10): past them a signature's result "
                   "is temperror; answers are cached for the message.",
    "dns_timeout": "Seconds all DNS queries for one message may take together (default 10; one "
                   "query at most 5): a timeout or an unusable answer is temperror, never fail.",
}
DEFAULT_LOOKUPS, DEFAULT_DNS_SECONDS, QUERY_SECONDS = 10, 10.0, 5.0
MAX_SIGNATURES = 10     # DKIM signatures checked per message (RFC 6376 6.1 lets a verifier limit them)


class ArcSettings(NamedTuple):
    domain: str
    selector: str
    private_key: bytes
    authserv_id: str
    verify_dkim: bool
    resolver: tuple[str, int] | None
    dns_lookups: int = DEFAULT_LOOKUPS
    dns_timeout: float = DEFAULT_DNS_SECONDS


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
                       text["authserv_id"], verify, _resolver(table.get("resolver"), where),
                       *_dns_budget(table, where))


def _dns_budget(table: dict, where: str) -> tuple[int, float]:
    lookups = table.get("dns_lookups", DEFAULT_LOOKUPS)
    if isinstance(lookups, bool) or not isinstance(lookups, int) or not 0 <= lookups <= 1000:
        raise ConfigError(f"{where}.dns_lookups", f"expected a count from 0 to 1000, got {lookups!r}")
    seconds = table.get("dns_timeout", DEFAULT_DNS_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 600:
        raise ConfigError(f"{where}.dns_timeout", f"expected seconds above 0, at most 600, got {seconds!r}")
    return lookups, float(seconds)


def _private_key(path: str, where: str) -> bytes:
    from .keys import read_private_file     # no FIFO, no link, private: as the [[dkim]] keys

    key = read_private_file(path, f"{where}.private_key_file")
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"{where}.private_key_file", f"{path} holds no PEM private key")
    return key


def _resolver(value: Any, where: str) -> tuple[str, int] | None:
    """HOST, HOST:PORT, [V6]:PORT or a bare IPv6 address; port 53 unless given."""
    if value is None:
        return None
    from .addresses import parse_hop

    text = value.strip() if isinstance(value, str) else ""
    try:
        host, port = parse_hop(text)
    except ValueError:
        raise ConfigError(f"{where}.resolver", f"expected HOST[:PORT], got {value!r}") from None
    explicit = "]:" in text or text.count(":") == 1
    return host, port if explicit else 53


def preload() -> None:
    """Import what checking and sealing import lazily (before privileges are dropped): dkimpy,
    authres with its result types, and dnspython, which loads the class of each record type
    on the first answer that carries one (an answer is the sender's DNS: any type)."""
    import importlib
    import pkgutil

    import authres
    import dkim
    import dkim.crypto
    import dkim.util
    import dns.exception
    import dns.rdtypes
    import dns.resolver

    authres.all_features()
    for module in pkgutil.walk_packages(dns.rdtypes.__path__, "dns.rdtypes."):
        importlib.import_module(module.name)


class Unsealable(Exception):
    """A message that must not get an ARC set now: its chain could not be validated."""


class Sealer:
    """Seals changed messages for one run; verifies what arrived at most once."""

    def __init__(self, settings: ArcSettings) -> None:
        self.settings = settings
        self.lookups = Lookups(settings)
        self._gateway_results: list[str] | None = None

    def seal(self, original: bytes | bytearray, changed: bytes | bytearray, eol: bytes) -> bytes:
        """``changed`` with one ARC set on top, in ``changed``'s own line ending."""
        import dkim

        wire = _crlf(changed)
        results = self._results(bytes(original))
        stamp = f"Authentication-Results: {self.settings.authserv_id}; {'; '.join(results) or 'none'}\r\n"
        arc_set = _arc_set(_trusted_only(parse(stamp.encode() + wire), self.settings.authserv_id), self.settings)
        if not arc_set:
            raise dkim.DKIMException("dkimpy produced no ARC set")
        head = b"".join(arc_set)
        return (head if eol == b"\r\n" else head.replace(b"\r\n", eol)) + bytes(changed)

    def _results(self, original: bytes) -> list[str]:
        """What the gateway adds to the trusted results: its own DKIM and ARC findings.

        The ARC finding is always there unless the trusted verifier gave one: dkimpy drops
        a bare ``none`` when it merges results, and an AAR with no result at all is not
        valid RFC 8601 (nor what RFC 8617 asks for, which is the ``arc`` result).  The
        chain is validated first: the seal depends on it, the DKIM results only inform.
        The message is parsed for dkimpy once, and its checks share one work budget.
        """
        if self._gateway_results is None:
            trusted = _trusted_methods(original, self.settings.authserv_id)
            parsed = parse(_crlf(original))
            work = Work(parsed)
            results = []
            if "arc" not in trusted:
                arrived_sealed = _headers(original).get("ARC-Seal") is not None
                results.append(f"arc={self._chain(parsed, work) if arrived_sealed else 'none'}")
            if self.settings.verify_dkim:
                results[:0] = self._dkim_results(parsed, work)
            self._gateway_results = results
        return self._gateway_results

    def _dkim_results(self, parsed: tuple, work: Work) -> list[str]:
        signatures = [value for name, value in parsed[0] if name.lower() == b"dkim-signature"]
        if not signatures:
            return ["dkim=none"]
        if len(signatures) > MAX_SIGNATURES:
            log.warning("%d DKIM signatures: only the first %d are checked", len(signatures), MAX_SIGNATURES)
        return [self._dkim_result(parsed, index, value, work)
                for index, value in enumerate(signatures[:MAX_SIGNATURES])]

    def _dkim_result(self, parsed: tuple, index: int, signature: bytes, work: Work) -> str:
        """pass, fail (the signature does not match), permerror (no usable key, a broken
        signature, one longer than any key that is checked), or temperror (DNS did not answer
        in time or usably, or a budget is spent): dkimpy turns DNS timeouts into a plain
        False, so the lookups are watched."""
        found = tags(signature)
        domain, selector = _text(found.get(b"d")), _text(found.get(b"s"))
        if overlong_signature(signature):
            log.info("DKIM signature %d: b= is longer than any key that is checked", index + 1)
            result = "permerror"
        elif not work.take(passes(signature)):
            log.warning("DKIM signature %d not checked: the work budget of this message is spent", index + 1)
            result = "temperror"
        else:
            result = self._verify_dkim(parsed, index)
        return f"dkim={result} header.d={domain} header.s={selector}" if domain else f"dkim={result}"

    def _verify_dkim(self, parsed: tuple, index: int) -> str:
        import dkim

        verifier = prepared(dkim.DKIM, parsed, minkey=1024, timeout=QUERY_SECONDS)
        troubles = len(self.lookups.troubles)
        try:
            good = verifier.verify(idx=index, dnsfunc=self.lookups.txt)
        except (ImportError, MemoryError):     # this machine's trouble, not the signature's
            raise
        except Exception as error:      # DKIMException, or dkimpy tripping over the sender's tags
            log.info("DKIM signature %d: %r", index + 1, error)
            good = None
        if len(self.lookups.troubles) > troubles:
            return "temperror"
        if good:
            return "pass"
        return "fail" if good is False and getattr(verifier, "pk", None) is not None else "permerror"

    def _chain(self, parsed: tuple, work: Work) -> str:
        """Validate the ARC chain the message arrived with: pass, fail or none.  A chain DNS
        or the work budget could not decide is neither: the message then goes out without
        a new set."""
        import dkim

        chain = prepared(dkim.ARC, parsed, minkey=1024, timeout=QUERY_SECONDS)
        instances, fields = chain.sorted_arc_headers()
        if not instances:
            return "none"
        broken = _broken_chain(instances, fields)
        if broken:
            log.info("existing ARC chain: fail (%s)", broken)
            return "fail"
        # dkimpy checks every set's seal and message signature, after a pass to find them
        cost = 1 + sum(1 if name.lower() == b"arc-seal" else passes(value)
                       for _, (name, value) in fields if name.lower() != b"arc-authentication-results")
        if not work.take(cost):
            log.warning("existing ARC chain of %d sets not validated: the work budget of this message "
                        "is spent; no ARC set is added", instances)
            raise Unsealable(f"the existing ARC chain of {instances} sets is too costly to validate")
        troubles = len(self.lookups.troubles)
        verdict, reason = self._validate(chain)
        if len(self.lookups.troubles) > troubles:
            why = "; ".join(dict.fromkeys(self.lookups.troubles[troubles:]))
            log.warning("existing ARC chain not validated (DNS: %s): no ARC set is added", why)
            raise Unsealable(f"the existing ARC chain could not be validated (DNS: {why})")
        log.info("existing ARC chain: %s (%s)", verdict, reason)
        return verdict

    def _validate(self, chain) -> tuple[str, str]:
        import dkim

        try:
            verdict, _, reason = chain.verify(dnsfunc=self.lookups.txt)
        except (ImportError, MemoryError):     # this machine's trouble, not the chain's
            raise
        except dkim.DKIMException as error:     # as dkim.arc_verify answers it
            return "fail", str(error)
        except Exception as error:      # dkimpy tripping over the sender's fields: undecided
            log.warning("existing ARC chain not validated (%r): no ARC set is added", error)
            raise Unsealable(f"the existing ARC chain could not be validated ({error!r})") from None
        # None: a seal declared the chain failed (RFC 8617 5.2: then it has failed)
        return (verdict or dkim.CV_Fail).decode(), reason


def _broken_chain(instances: int, fields: list) -> str:
    """Why a chain fails before any signature is checked, or "" (dkimpy's order of fields:
    ``(instance, (name, relaxed value))``)."""
    if instances > MAX_ARC_INSTANCES:
        return f"{instances} ARC sets (RFC 8617 allows {MAX_ARC_INSTANCES})"
    if len(fields) != 3 * instances:
        return f"{len(fields)} ARC header fields for {instances} sets: a set incomplete or doubled"
    for _, (name, value) in fields:
        if name.lower() != b"arc-authentication-results" and overlong_signature(value):
            return f"an {name.decode('ascii', 'replace')} longer than any key that is checked"
    return ""


def _trusted_only(parsed: tuple, authserv_id: str) -> tuple:
    """The message for dkimpy's sealer without Authentication-Results of other verifiers: it
    parses each one (as UTF-8, failing on other bytes) only to drop it, and none is signed."""
    mark = authserv_id.encode()
    headers, body = parsed
    return [h for h in headers if h[0] != b"Authentication-Results" or mark in h[1]], body


class Lookups:
    """The DNS queries of one message: cached by name, within a budget of queries and time.

    A query that times out, fails (SERVFAIL, REFUSED, garbage) or would pass the budget is
    recorded in ``troubles`` and raised to dkimpy as its DnsTimeoutError; dkimpy swallows
    that into a plain False, so the caller looks at ``troubles`` to tell temperror from fail.
    A key no legitimate signer uses (:func:`.dkim_bounds.refused_key`) is raised to dkimpy as
    its KeyFormatError before dkimpy computes with it: a permerror, or a failed ARC seal.
    """

    def __init__(self, settings: ArcSettings) -> None:
        self.settings = settings
        self.left = settings.dns_lookups
        self.deadline: float | None = None
        self.answers: dict[str, bytes | None | str] = {}     # a str: why there is no answer
        self.refusals: dict[str, str | None] = {}            # why a key is not used, per name
        self.troubles: list[str] = []

    def txt(self, name: bytes | str, timeout: float = QUERY_SECONDS) -> bytes | None:
        import dkim

        name = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower().rstrip(".")
        if name not in self.answers:
            self.answers[name] = self._query(name, timeout)
        answer = self.answers[name]
        if isinstance(answer, str):
            self.troubles.append(f"{name}: {answer}")
            raise dkim.DnsTimeoutError(answer)
        if answer is not None and name not in self.refusals:
            self.refusals[name] = refused_key(answer)
            if self.refusals[name]:
                log.info("key %s not used: %s", name, self.refusals[name])
        if answer is not None and self.refusals[name]:
            raise dkim.KeyFormatError(f"{name}: {self.refusals[name]}")
        return answer

    def _query(self, name: str, timeout: float) -> bytes | None | str:
        import time

        now = time.monotonic()
        self.deadline = self.deadline or now + self.settings.dns_timeout
        lifetime = min(timeout, QUERY_SECONDS, self.deadline - now)
        if self.left <= 0 or lifetime <= 0:
            return (f"budget of {self.settings.dns_lookups} lookups spent" if self.left <= 0
                    else f"budget of {self.settings.dns_timeout:g} s spent")
        self.left -= 1
        return self._resolve(name, lifetime)

    def _resolve(self, name: str, lifetime: float) -> bytes | None | str:
        import dns.exception
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=self.settings.resolver is None)
        if self.settings.resolver is not None:
            resolver.nameservers = [self.settings.resolver[0]]
            resolver.port = self.settings.resolver[1]
        try:
            answer = resolver.resolve(name, "TXT", lifetime=lifetime, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.exception.Timeout:
            return f"no answer within {lifetime:.1f} s"
        except dns.exception.DNSException as error:     # SERVFAIL, REFUSED, a broken answer ...
            return f"no usable answer ({type(error).__name__})"
        for record in answer.response.answer:
            if record.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(record.items)).strings)
        return None


def _arc_set(parsed: tuple, settings: ArcSettings) -> list[bytes]:
    """dkimpy's arc_sign on a message :func:`parse` parsed, with the message's
    DKIM-Signature fields in the AMS: RFC 8617 4.1.2 asks for them (dkimpy leaves them
    out), so the set covers the gateway's own."""
    import dkim

    signer = prepared(dkim.ARC, parsed, linesep=b"\r\n")
    signer.should_not_sign.discard(b"dkim-signature")
    signer.should_sign.add(b"dkim-signature")
    return signer.sign(settings.selector.encode(), settings.domain.encode(), settings.private_key,
                       settings.authserv_id.encode(), include_headers=signer.default_sign_headers())


def _text(value: bytes | str | None) -> str:
    """A tag dkimpy read from a signature (bytes), or its default (str), as text."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value or ""


def _trusted_methods(message: bytes, authserv_id: str) -> set[str]:
    """Methods (dkim, spf, arc ...) in the Authentication-Results of the trusted verifier."""
    import authres

    methods = set()
    for value in _headers(message).get_all("Authentication-Results"):
        if authserv_id not in value:        # not the trusted verifier's: no parse needed
            continue
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
    from .delivery.wire import wire_chunks

    return b"".join(wire_chunks(data, b"\r\n"))
