"""The rule file's top-level keys: each with its default, its reader and its documentation.

The readers (``string``, ``positive``, ``one_of`` ...) serve the tables other parts own too
(``[serve]``); each raises ValueError with what it expected.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ispmailgate_filters.base import argv as argv_option
from ispmailgate_filters.base import count, parse_size, seconds

from .addresses import MAX_ADDRESS, canonical_address, parse_hop


class Setting(NamedTuple):
    """One top-level key of the rule file: default, reader, and its line of documentation."""
    default: Any
    convert: Any
    doc: str


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of filter names")
    return tuple(value)


def _domains(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip(". ") for v in value):
        raise ValueError("expected a list of domain names")
    return tuple(v.strip(". ").lower() for v in value)


positive = seconds()      # a number of seconds: above 0, finite, at most a day


# Each MIME level costs a few stack frames in the parser and in the filters that walk the
# tree; 100 levels leave ample room below Python's recursion limit, also in a served run
# (tests/test_config_ranges.py runs every built-in filter at this depth).
MAX_MIME_DEPTH = 100


def _address(value: Any) -> str:
    """An address the gate itself sends to (the postmaster): usable as a recipient is."""
    address = canonical_address(string(value))
    if not address or len(address.encode("utf-8")) > MAX_ADDRESS:
        raise ValueError(f"expected a mail address, got {value!r}")
    return address


def _word(pattern: str, what: str):
    """A string of what SMTP or an address can carry there (no space, control or <>)."""
    def convert(value: Any) -> str:
        if not re.fullmatch(pattern, string(value)):
            raise ValueError(f"expected {what}, got {value!r}")
        return value
    return convert


def one_of(*allowed: str):
    def convert(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value
    return convert


SYSLOG_FACILITIES = frozenset({"kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
                               "uucp", "cron", "authpriv", "ftp", *(f"local{n}" for n in range(8))})


def facility(value: Any) -> str:
    import syslog       # loaded for the log anyway; it says which facilities this system has

    if not isinstance(value, str) or value.lower() not in SYSLOG_FACILITIES \
            or not hasattr(syslog, "LOG_" + value.upper()):
        raise ValueError(f"not a syslog facility: {value!r} (mail, daemon, local0 ... local7)")
    return value.lower()


def _hop(value: Any) -> str:
    parse_hop(string(value))
    return value


SETTINGS: dict[str, Setting] = {
    "tmp_dir": Setting("/var/spool/ispmailgate", string,
                       "Directory for per-message work directories (removed afterwards) and keep/."),
    "mail_host": Setting("localhost:26", _hop, "SMTP next hop, HOST[:PORT] (port 25 if omitted)."),
    "sendmail_command": Setting((), argv_option,
                                "Deliver through this sendmail-compatible argv instead of SMTP; "
                                "'-f SENDER -- RCPT...' is appended."),
    "loop_suffix": Setting(".ispmailgate", _word(r"[!-;=?-~]{0,100}", "up to 100 ASCII characters "
                                                 "without space, control characters or <>"),
                           "Appended to each recipient on SMTP re-injection; \"\" disables."),
    "postmaster": Setting("postmaster", _address, "Receives error reports and double bounces."),
    "facility": Setting("mail", facility, "Syslog facility."),
    "log_file": Setting("", string, "Also append log lines to this file (\"-\": stderr)."),
    "unqualified_domain": Setting("", _word(r"[^\s<>@\x00-\x1f\x7f]{0,253}", "a domain name"),
                                  "Domain appended to addresses without @domain."),
    "max_message_size": Setting(50 * 1024 * 1024, parse_size,
                                "Largest message accepted (bytes, or 10M / 2G)."),
    "on_oversize": Setting("tempfail", one_of("tempfail", "reject"),
                           "What a message over max_message_size gets: tempfail (75) or reject (69)."),
    "on_filter_error": Setting("report", one_of("report", "tempfail"),
                               "A filter error: report (postmaster gets the original) or tempfail."),
    "on_parse_error": Setting("deliver", one_of("deliver", "tempfail"),
                              "A message the parser cannot handle: deliver it unchanged (kept in "
                              "tmp_dir/keep/, postmaster told) or tempfail."),
    "delivery_timeout": Setting(120.0, positive, "Seconds to wait on each step of a delivery."),
    "time_limit": Setting(600.0, positive,
                          "Wall-clock seconds one message may take in all; past it: tempfail (75)."),
    "max_mime_depth": Setting(64, count(1, MAX_MIME_DEPTH),
                              "MIME nesting deeper than this is kept as one opaque part (at most 100; "
                              "messages a filter parses inside the message count on)."),
    "max_mime_parts": Setting(10_000, count(1, 1_000_000),
                              "MIME parts beyond this many are kept in one opaque part "
                              "(parts of messages a filter parses inside it count too)."),
    "max_objects": Setting(10_000, count(1, 100_000_000),
                           "Objects the filters may look into per message, all together "
                           "(archive members, attached messages' parts, scanned objects); "
                           "past it: unscannable."),
    "max_decoded": Setting(512 * 1024 * 1024, parse_size, "Bytes the filters may decode and unpack per "
                                                          "message, all together; past it: unscannable."),
    "mail_user": Setting("nobody", string, "Started as root: the user to become before the message is "
                                            "read (never root unless spelled out; \"\" refuses to run)."),
    "mail_group": Setting("", string, "Started as root: the group to become (default: mail_user's group)."),
    "helo_name": Setting("", _word(r"[A-Za-z0-9.-]{0,253}|\[[0-9A-Fa-f:.]{2,45}\]", "a host name"),
                         "Name for EHLO (default: this host's name)."),
    "default_filter": Setting(("dummy",), strings, "Chain for recipients no rule matches."),
    "internal_domains": Setting((), _domains, "Our own domains (subdomains included), for the "
                                              "rule keys sender_is and recipient_is."),
}
