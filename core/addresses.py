"""Mail addresses (an envelope's sender and recipients) and next-hop addresses (HOST[:PORT])."""

from __future__ import annotations

import re


def canonical_address(text: str, unqualified_domain: str = "") -> str:
    """``Name <a@b>`` and ``a@b (Name)`` -> ``a@b``; ``<>`` and "" -> "" (null sender).

    Raises ValueError for anything that could smuggle a line into a header or an SMTP
    command (CR, LF, NUL, other control characters, angle brackets).
    """
    if re.search(r"[\r\n\0]", text):
        raise ValueError(f"address contains CR, LF or NUL: {text!r}")
    address = text.strip()
    if "<" in address:
        address = address[address.rindex("<") + 1:].split(">", 1)[0]
    else:
        address = re.sub(r"\s*\([^()]*\)\s*$", "", address)
    address = address.strip()
    if re.search(r"[\x00-\x1f\x7f<>]", address) or (
            re.search(r"\s", address) and not re.match(r'"[^"]*"@\S+\Z', address)):
        raise ValueError(f"not a mail address: {text!r}")
    if not address.isascii():       # (the usual ASCII address skips compiling these)
        if re.search("[\udc80-\udcff]", address):    # argv bytes that were not UTF-8
            raise ValueError(f"bytes that are not UTF-8: {text!r}")
        if re.search("[\x80-\x9f\u2028\u2029\ud800-\udfff]", address):
            raise ValueError(f"control characters: {text!r}")
    if address and "@" not in address and unqualified_domain:
        address = f"{address}@{unqualified_domain}"
    return address


# "RCPT TO:<address>" with the loop suffix must fit RFC 5321's command line of 512 octets.
MAX_ADDRESS = 500


def in_domains(address: str, domains: tuple[str, ...]) -> bool:
    """Is the address's domain one of ``domains`` or below one?  The null sender is not."""
    domain = address.rpartition("@")[2].lower() if "@" in address else ""
    return bool(domain) and any(domain == d or domain.endswith("." + d) for d in domains)


def parse_hop(value: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6addr]:port`` -> (host, port); port 25 by default."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "25"
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, "25"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST[:PORT]: {value!r}")
    return host, int(port)


def parse_dns_server(value: str) -> tuple[str, int]:
    """A DNS server: ``host``, ``host:port``, ``[v6addr]:port`` or a bare IPv6 address; port
    53 unless given."""
    text = value.strip()
    host, port = parse_hop(text)
    explicit = "]:" in text or text.count(":") == 1
    return host, port if explicit else 53
