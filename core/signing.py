"""DKIM signing (RFC 6376) of outgoing mail after the filters: a banner that never breaks
a signature, because the signature is made over the bytes with the banner.

Each ``[[dkim]]`` table signs, as its ``domain`` and ``selector``, every delivered result
whose From: address is in that domain: after the result's chain ran, over the wire form
(CRLF line ends, exactly the bytes the next hop gets), before an ARC seal (which then
covers the signature).  Which From: counts, and when a message is already signed, is said
by :func:`author_domains` and :meth:`Signer.signed_before`.  A signature that cannot be
made defers the run: mail that should leave signed never leaves unsigned.

dkimpy is imported only when a message is signed; the rule file's keys are read and
checked (kind, size, privacy) without it.
"""

from __future__ import annotations

import logging
import re
from typing import Any, NamedTuple

from ispmailgate_filters.base import ConfigError

from .dkim_header import MAX_FIELDS, MAX_SIGNED_NAMES, read_block
from .keys import PrivateKey, key_record, parse_private_key, read_private_file
from .status import LOCAL_TROUBLE, MISCONFIGURED, UNSIGNABLE

log = logging.getLogger("ispmailgate.dkim")

KEYS = {
    "domain": "Signing domain (d=): results whose From: address is in it are signed.",
    "selector": "Selector (s=): the public key is published at SELECTOR._domainkey.DOMAIN "
                "(ispmailgate dkim-record prints the record).",
    "private_key_file": "Private key: PEM (RSA in PKCS#1 or PKCS#8, Ed25519 in PKCS#8) or "
                        "dknewkey's Ed25519 seed; refused if readable by others. Read before "
                        "privileges are dropped.",
    "algorithm": "rsa-sha256 (default) or ed25519-sha256 (RFC 8463); must fit the key.",
    "headers": "Header fields signed where present (default: RFC 6376 section 5.4.1's list, as "
               "dkimpy has it); a name written +NAME is over-signed too: listed once more than the "
               "message has it, so that one added on the way breaks the signature (default: From, To, "
               "Cc, Subject, Date, Reply-To, Message-ID, In-Reply-To, References, MIME-Version, "
               "Content-Type, Content-Transfer-Encoding); From is always signed and over-signed.",
    "canonicalization": "HEADER/BODY, each simple or relaxed (default \"relaxed/relaxed\"); a single "
                        "word is HEADER/simple, as in the c= tag.",
    "subdomains": "true: sign mail from subdomains of domain too (default false: the From: domain "
                  "must be domain).",
    "resolver": "DNS server HOST[:PORT] that ispmailgate check asks for the published key "
                "(default: the system's resolver).",
    "sign": "originating (default): sign only in a run given --originating (the MTA's transport for "
            "its own users' mail); always: sign whatever the run (a gateway that only sees outbound mail).",
}
SIGN_WHEN = ("originating", "always")
NOT_ORIGINATING = "the run is not originating"
ALGORITHMS = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}
# dkimpy's DKIM.SHOULD: RFC 6376 5.4.1's list, with the MIME fields and Message-ID
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
    "content-type", "content-transfer-encoding", "content-id", "content-description", "resent-date",
    "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-message-id", "in-reply-to",
    "references", "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post",
    "list-owner", "list-archive")
# what a reader sees, signed once more than present so that an added one breaks the signature
OVERSIGNED = ("from", "to", "cc", "subject", "date", "reply-to", "message-id", "in-reply-to", "references",
              "mime-version", "content-type", "content-transfer-encoding")
# RFC 6376 5.4: fields hops add or change (and the signatures themselves), never signed
NEVER_SIGNED = ("return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature")
MIN_RSA_BITS = 1024         # RFC 8301 3.2: verifiers refuse shorter keys
MAX_FROM = 16 * 1024        # a From: field longer than this is not looked into (its parse is not free)
_NAME = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)*"
                   r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?")
_FIELD_NAME = re.compile(r"[!-9;-~]{1,100}")


class DkimSettings(NamedTuple):
    """One ``[[dkim]]`` table, checked."""
    where: str                              # "dkim[0]", for messages
    domain: str                             # lower case, A-labels
    selector: str
    key: PrivateKey
    key_file: str
    algorithm: str
    headers: frozenset[str]                 # signed where present; "from" always among them
    canonicalization: tuple[str, str]
    subdomains: bool = False
    resolver: tuple[str, int] | None = None
    sign: str = "originating"               # or "always": see SIGN_WHEN
    oversigned: tuple[str, ...] = ("from",)     # of headers: signed once more than present

    def covers(self, domain: str) -> bool:
        return domain == self.domain or (self.subdomains and domain.endswith("." + self.domain))

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def load_section(value: Any, where: str) -> tuple[DkimSettings, ...]:
    """The ``[[dkim]]`` tables, checked when the rule file is read."""
    if not isinstance(value, list) or not value or not all(isinstance(table, dict) for table in value):
        raise ConfigError(where, "expected [[dkim]] tables, one per signing domain and selector")
    tables = tuple(_table(table, f"{where}[{i}]") for i, table in enumerate(value))
    seen: dict[tuple[str, str], str] = {}
    for table in tables:
        first = seen.setdefault((table.domain, table.selector), table.where)
        if first != table.where:
            raise ConfigError(table.where, f"selector {table.selector} of {table.domain} is "
                                           f"configured twice (first in {first})")
    return tables


def _table(table: dict, where: str) -> DkimSettings:
    for key in table:
        if key not in KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key (known: {', '.join(KEYS)})")
    domain = dns_name(table.get("domain"), f"{where}.domain")
    selector = dns_name(table.get("selector"), f"{where}.selector")
    path = table.get("private_key_file")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.private_key_file", "required: the path of the private key")
    key = _key(path, table.get("algorithm", "rsa-sha256"), where)
    subdomains = table.get("subdomains", False)
    if not isinstance(subdomains, bool):
        raise ConfigError(f"{where}.subdomains", "expected true or false")
    when = table.get("sign", "originating")
    if when not in SIGN_WHEN:
        raise ConfigError(f"{where}.sign", f"expected {' or '.join(SIGN_WHEN)}, got {when!r}")
    headers, oversigned = _headers(table.get("headers", DEFAULT_HEADERS), f"{where}.headers")
    return DkimSettings(where, domain, selector, key, path, table.get("algorithm", "rsa-sha256"), headers,
                        _canonicalization(table.get("canonicalization", "relaxed/relaxed"),
                                          f"{where}.canonicalization"),
                        subdomains, _resolver(table.get("resolver"), f"{where}.resolver"), when, oversigned)


def dns_name(value: Any, where: str) -> str:
    """A domain name or selector in lower case, a name with non-ASCII labels as its A-labels."""
    if not isinstance(value, str) or not value.strip(". "):
        raise ConfigError(where, "required: a domain name")
    name = value.strip().rstrip(".").lower()
    try:
        name = name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        name = ""
    if not _NAME.fullmatch(name):
        raise ConfigError(where, f"not a domain name: {value!r}")
    return name


def _key(path: str, algorithm: Any, where: str) -> PrivateKey:
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{where}.algorithm", f"expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    try:
        key = parse_private_key(read_private_file(path, f"{where}.private_key_file"))
    except ValueError as error:
        raise ConfigError(f"{where}.private_key_file", f"{path}: {error}") from None
    if key.kind != ALGORITHMS[algorithm]:
        raise ConfigError(f"{where}.algorithm", f"{algorithm}, but {path} holds an "
                                                f"{'RSA' if key.kind == 'rsa' else 'Ed25519'} key")
    if key.kind == "rsa" and key.bits < MIN_RSA_BITS:
        raise ConfigError(f"{where}.private_key_file", f"{path}: a {key.bits}-bit RSA key: receivers "
                                                       f"refuse keys under {MIN_RSA_BITS} bits (RFC 8301); "
                                                       "use 2048")
    if key.kind == "ed25519":
        import importlib.util

        if importlib.util.find_spec("nacl") is None:
            raise ConfigError(f"{where}.algorithm", "ed25519-sha256 needs the PyNaCl package (pip install pynacl)")
    return key


def _headers(value: Any, where: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """The names signed where present, and those of them over-signed (+NAME, and From)."""
    if value is DEFAULT_HEADERS:
        return frozenset(DEFAULT_HEADERS), OVERSIGNED
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(where, "expected a list of header field names (+NAME: over-signed too)")
    written = [name.strip().lower() for name in value]
    names = {name.removeprefix("+") for name in written}
    for name in sorted(names):
        if not _FIELD_NAME.fullmatch(name) or name.startswith("+"):
            raise ConfigError(where, f"not a header field name: {name!r}")
        if name in NEVER_SIGNED:
            raise ConfigError(where, f"{name} must not be signed: hops add or change it (RFC 6376 5.4)")
    oversigned = dict.fromkeys(["from", *(name[1:] for name in written if name.startswith("+"))])
    return frozenset(names | {"from"}), tuple(oversigned)


def _canonicalization(value: Any, where: str) -> tuple[str, str]:
    parts = value.lower().split("/") if isinstance(value, str) else []
    if len(parts) == 1:
        parts.append("simple")
    if len(parts) != 2 or not all(part in ("simple", "relaxed") for part in parts):
        raise ConfigError(where, f"expected HEADER/BODY, each simple or relaxed, got {value!r}")
    return parts[0], parts[1]


def _resolver(value: Any, where: str) -> tuple[str, int] | None:
    if value is None:
        return None
    from .addresses import parse_dns_server

    try:
        return parse_dns_server(value if isinstance(value, str) else "")
    except ValueError:
        raise ConfigError(where, f"expected HOST[:PORT], got {value!r}") from None


def author_domains(headers) -> tuple[list[str], str]:
    """The domains of the From: field's addresses, or why there are none to sign for.

    Exactly one From: field counts (RFC 5322 3.6 allows one; a second is how a message
    shows receivers another author than the one checked), with every address in it: a
    From: of several authors is signed for each of their domains that is configured."""
    fields = headers.get_all("From")
    if len(fields) != 1:
        return [], "no From: field" if not fields else f"{len(fields)} From: fields (RFC 5322 allows one)"
    if len(fields[0]) > MAX_FROM:
        return [], f"a From: field of more than {MAX_FROM} characters"
    from email.utils import getaddresses

    domains = [_ascii(address.rpartition("@")[2]) for _, address in getaddresses(fields) if "@" in address]
    domains = list(dict.fromkeys(domain for domain in domains if domain))
    return domains, "" if domains else "no address in From:"


def _ascii(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        return ""


class NotSigned(Exception):
    """A header block readers may take apart otherwise than dkimpy: delivered unsigned."""


class Unsignable(Exception):
    """A header block past what signing takes (MAX_FIELDS): the message's own fault."""


class Signer:
    """Signs the delivery groups of one run, with the ``[[dkim]]`` tables of its rule file."""

    def __init__(self, tables: tuple[DkimSettings, ...], originating: bool = False) -> None:
        self.tables, self.originating = tables, originating

    def plan(self, headers) -> tuple[list[DkimSettings], str]:
        """The tables that sign a result with these top-level headers, or why none does.

        A From: says nothing about who wrote the mail: anyone on the internet can claim
        the signing domain.  So a table signs only mail the MTA vouches for (the run is
        given --originating on its users' transport) unless it says sign = "always"."""
        domains, why = author_domains(headers)
        if not domains:
            return [], why
        chosen = [table for table in self.tables if any(table.covers(domain) for domain in domains)]
        if not chosen:
            return [], f"the From: domain {', '.join(domains)} is in no [[dkim]] domain"
        signing = [table for table in chosen if self.originating or table.sign == "always"]
        return signing, "" if signing else not_originating(chosen)

    def sign(self, original: bytes | bytearray, data: bytes | bytearray, eol: bytes,
             tables: list[DkimSettings]) -> tuple[bytes | bytearray, list[DkimSettings]]:
        """``data`` with a DKIM-Signature on top for each table (in ``data``'s own line
        ending), and the tables that signed: not those :meth:`signed_before`."""
        wire = _crlf(data)
        block = read_block(wire)
        if block.fields > MAX_FIELDS:
            raise Unsignable(f"more than {MAX_FIELDS} header fields")
        if block.odd or block.from_fields > 1:
            raise NotSigned(block.odd or f"{block.from_fields} From: fields as dkimpy reads the header")
        unchanged = data is original or data == original
        signers = [table for table in tables if not (unchanged and self.signed_before(table, wire))]
        if not signers:
            return data, []
        head = b"".join(signature(table, wire) for table in signers)
        return (head if eol == b"\r\n" else head.replace(b"\r\n", eol)) + bytes(data), signers

    @staticmethod
    def signed_before(table: DkimSettings, wire: bytes) -> bool:
        """Does the message, as it arrived, carry this table's own signature already?

        Its first DKIM-Signature with this d= and s= must verify with this table's key
        (asked of the key itself, not of DNS): a signature that only claims the domain, or
        that a later change broke, gets a fresh one beside it.  Only the first is checked,
        as each check hashes the whole body."""
        from .dkim_linear import install

        install()
        import dkim
        from dkim.util import InvalidTagValueList, parse_tag_value

        verifier = dkim.DKIM(wire, minkey=MIN_RSA_BITS)
        found = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
        for index, value in enumerate(found):
            try:
                tags = parse_tag_value(value)
            except InvalidTagValueList:
                continue
            if (tags.get(b"d", b"").lower(), tags.get(b"s", b"").lower()) == \
                    (table.domain.encode(), table.selector.encode()):
                if tags.get(b"h", b"").count(b":") >= MAX_SIGNED_NAMES:    # dkimpy: names x fields
                    log.info("%s: the DKIM-Signature it arrived with signs over %d names: not checked",
                             table.where, MAX_SIGNED_NAMES)
                    return False
                record = key_record(table.key).encode()
                try:
                    return bool(verifier.verify(idx=index, dnsfunc=lambda name, timeout=5: record))
                except Exception as error:      # noqa: BLE001 -- dkimpy's own and its parsers': sign anew
                    log.info("%s: the DKIM-Signature it arrived with does not verify: %r", table.where, error)
                    return False
        return False


def not_originating(tables: list[DkimSettings]) -> str:
    """Why these tables did not sign: the run was not originating."""
    names = ", ".join(f"d={table.domain} s={table.selector}" for table in tables)
    return f"{NOT_ORIGINATING} (no --originating): {names} signs only the mail of the MTA's own users"


def signature(table: DkimSettings, wire: bytes) -> bytes:
    """One DKIM-Signature field (CRLF line ends) for the wire form of a message."""
    from .dkim_linear import install

    install()
    import dkim

    signer = dkim.DKIM(wire, signature_algorithm=table.algorithm.encode(), linesep=b"\r\n")
    signed = [name for name, _ in signer.headers if name.lower().decode("ascii", "replace") in table.headers]
    # over-signed: each name once more than the message has it (absent ones too), so that
    # a field added on the way above the signed ones breaks the signature
    oversigned = [name.encode() for name in table.oversigned]
    return signer.sign(table.selector.encode(), table.domain.encode(), table.key.secret,
                       canonicalize=tuple(part.encode() for part in table.canonicalization),
                       include_headers=[name.lower() for name in signed] + oversigned)


def failure_status(error: BaseException) -> str:
    """The enhanced status code of a failed signature: the message's own fault for good
    (5.6.0: a header block dkimpy cannot read, or past MAX_FIELDS), else the key (4.3.5) or
    anything else (4.3.0), which defer the run."""
    name = type(error).__name__
    if isinstance(error, Unsignable) or name == "MessageFormatError":
        return UNSIGNABLE
    return MISCONFIGURED if name in ("KeyFormatError", "NaClNotFoundError", "ParameterError") else LOCAL_TROUBLE


def _crlf(data: bytes | bytearray) -> bytes:
    """The wire form, as SmtpHop sends it."""
    from .delivery.wire import wire_chunks

    return b"".join(wire_chunks(data, b"\r\n"))
