"""Which requests a server runs, and for whom: never one that gives a client more than the
one-shot ispmailgate would give that same user.

A worker runs as mail_user, with what mail_user may read (the gateway's keys) and run.  A
one-shot run started by any other user runs with that user's rights; one started by root
trusts only a rule file root alone can change, then becomes mail_user.  So, by the client's
uid (SO_PEERCRED, from the kernel):

- **a rule file other than the server's** (``-c``, or the client's $ISPMAILGATE_CONFIG) is
  run only if root alone can change it and every directory above it -- the trust a one-shot
  run as root requires -- unless the client is mail_user itself (who could run any file of
  its own); with ``other_rule_files = false``, never;
- **a user other than root and mail_user** may, with ``client_options = "restricted"`` (the
  default), only hand in mail for the configured next hop: ``-f``, ``-c``, ``-a``, ``-d``,
  ``--help``, ``--version`` and recipients.  ``--stdout``, ``--mail-host``, ``--tmp-dir``,
  ``--dry-run``, shell test mode, ``check`` and ``explain`` would hand it what only
  mail_user may see (decrypted mail, signatures by the gateway's keys, files in a directory
  of its choosing), and are declined.

A declined request is not an error: a client of protocol 4 follows its fallback, and the
one-shot run then does the same with the user's own rights.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ispmailgate_client import CONFIG_VARIABLE

from .section import ServeSettings

# Options that take a value, of every command a request can name (the one-shot parser's
# own table is not imported: the server never imports the command line).
VALUED = {"-f", "--from", "-c", "--config", "-m", "--mail-host", "-t", "--tmp-dir", "-a",
          "--facility", "--client-user"}
# What a user other than root and mail_user may give, with "restricted" client options.
HARMLESS = {"-f", "--from", "-c", "--config", "-a", "--facility", "-d", "--debug", "-h", "--help",
            "--version"}
ADMIN = ("check", "explain")
SHORT = {"--from": "-f", "--config": "-c", "--mail-host": "-m", "--tmp-dir": "-t", "--facility": "-a"}


class Arguments(NamedTuple):
    """A command line read as the one-shot parser (click) reads it: options, their values
    (by their short name; the last one given wins), and the positional arguments."""
    options: list[str]
    values: dict[str, str]
    positional: list[str]


def scan(argv: list[str]) -> Arguments:
    """Short options clustered (``-df SENDER``, ``-fSENDER``), long ones with ``=`` or the
    next argument as value, positional arguments anywhere, everything after ``--``
    positional; a value is taken whatever it looks like, as click takes it."""
    options, values, positional = [], {}, []
    words = iter(argv)
    for word in words:
        if word == "--":
            positional += list(words)
        elif word.startswith("--"):
            name, has_value, value = word.partition("=")
            options.append(name)
            if name in VALUED:
                values[SHORT.get(name, name)] = value if has_value else next(words, "")
        elif word.startswith("-") and len(word) > 1:
            for index, letter in enumerate(word[1:], 1):
                name = "-" + letter
                options.append(name)
                if name in VALUED:
                    values[name] = word[index + 1:] or next(words, "")
                    break
        else:
            positional.append(word)
    return Arguments(options, values, positional)


def decline_reason(argv: list[str], uid: int, workers_uid: int, server_rules: str | None,
                   settings: ServeSettings) -> str:
    """Why the server does not run ``argv`` for ``uid`` ("" when it does).  Called in the
    client's working directory, with the client's $ISPMAILGATE_CONFIG, as the run would be."""
    subcommand = argv[0] if argv and argv[0] in ADMIN else None
    arguments = scan(argv[1:] if subcommand else argv)
    rules = arguments.values.get("-c") or os.environ.get(CONFIG_VARIABLE) or None
    problem = rule_file_problem(rules, uid, workers_uid, server_rules, settings)
    if problem or uid in (0, workers_uid) or settings.client_options == "any":
        return problem
    if subcommand:
        return f"'{subcommand}' is for root and mail_user (serve.client_options = \"restricted\")"
    asks_for_help = {"-h", "--help", "--version"} & set(arguments.options)
    odd = [name for name in dict.fromkeys(arguments.options) if name not in HARMLESS]
    if odd and not asks_for_help:
        return f"{', '.join(odd)}: for root and mail_user only (serve.client_options = \"restricted\")"
    if not asks_for_help and not arguments.positional and not {"-f", "--from"} & set(arguments.options):
        return "shell test mode writes the result to stdout: for root and mail_user only " \
               "(serve.client_options = \"restricted\")"
    return ""


def rule_file_problem(path: str | None, uid: int, workers_uid: int, server_rules: str | None,
                      settings: ServeSettings) -> str:
    """Why the rule file a request names may not run for ``uid`` ("" if it may, or if it is
    the server's own, or if it cannot be found: then the run says so, as a one-shot run)."""
    if path is None:
        return ""
    try:
        info = os.stat(path)
        if server_rules is not None and os.path.samestat(info, os.stat(server_rules)):
            return ""
    except OSError:
        return ""
    if not settings.other_rule_files:
        return f"the rule file {path} is not the server's (serve.other_rule_files = false)"
    if uid == workers_uid:
        return ""
    from ispmailgate_filters.files import untrusted

    try:
        reason = untrusted(path, info)
    except OSError as error:
        reason = f"cannot check who may change it: {error.strerror or error}"
    return f"the rule file {path}: {reason}" if reason else ""
