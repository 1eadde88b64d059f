"""ispmailgate: a filtering mail delivery agent.

An MTA hands over one message on stdin, the envelope sender with ``-f`` and the
recipients as arguments.  Each recipient gets a chain of filters from the rule file;
every distinct filter step runs once however many recipients share it; each distinct
result goes to the next hop (SMTP, a sendmail-compatible command, or stdout) once, for
all of its recipients.  The exit status tells the MTA what happened: 0 delivered (or
discarded on purpose, and logged), 75 try again later, 69 bounce.

This module reads top to bottom in the order a message travels:
argv -> config -> envelope -> route -> run chains -> deliver -> exit status.
"""

# No "from __future__ import annotations" here: typer would then eval every annotation
# string of the CLI function at each start, a few milliseconds the one-shot path saves.

import functools
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NamedTuple, TextIO

import typer

from ispmailgate_delivery import (Delivery, Reports, Result, SmtpHop, StdoutHop, configured_hop,
                                  loggable, one_line, parse_hop)
from ispmailgate_filters.base import (Budget, ConfigError, Context, Envelope, Filter, FilterError,
                                      Notice, TempFail, Verdict, argv as argv_option, count,
                                      parse_size, seconds)
from ispmailgate_filters.mime import Message, ParseError

__version__ = "2.0.0"

# sysexits.h, as MTAs read them.  Postfix's pipe(8) defers only on 75 (and 71, or a
# signal) and bounces on every other non-zero status, so anything that is not the
# message's own fault must end in 75.
EX_OK, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 69, 75, 78

DEFAULT_CONFIG_PATH = "/etc/ispmailgate/ispmailgate.toml"
BUILT_IN_CONFIG = "<built-in default>"

log = logging.getLogger("ispmailgate")
log.addHandler(logging.NullHandler())   # until configured: never Python's last-resort stderr
log.propagate = False


class Stop(Exception):
    """Ends a run early with an exit status and the line the MTA puts into its DSN."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.code, self.status, self.text = code, status, text


def tempfail(status: str, text: str) -> Stop:
    return Stop(EX_TEMPFAIL, status, text)


# Records are NamedTuples: a frozen dataclass costs about 1 ms to create at import, and
# the one-shot path pays every millisecond on every message.

class Streams(NamedTuple):
    """Where a run reads the message and writes its output (a served run brings its own)."""
    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO


# =========================================================================================
# argv
# =========================================================================================

gate_cli = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})

ConfigOption = Annotated[Path | None, typer.Option(
    "-c", "--config", metavar="FILE", envvar="ISPMAILGATE_CONFIG",
    help=f"Rule file (TOML). Default: $ISPMAILGATE_CONFIG, else {DEFAULT_CONFIG_PATH} "
         "if present, else the built-in default (dummy chain).")]
SenderOption = Annotated[str | None, typer.Option(
    "-f", "--from", metavar="SENDER",
    help="Envelope sender; '' or '<>' is the null sender of bounces.")]


@gate_cli.command(epilog="Subcommands: ispmailgate serve | check | explain (see ispmailgate(1)).")
def deliver(
    ctx: typer.Context,
    recipients: Annotated[list[str] | None, typer.Argument(
        metavar="[RCPT]...", show_default=False,
        help="Envelope recipients. None (and no -f): shell test mode, the envelope is read "
             "from the message and the result written to stdout.")] = None,
    sender: SenderOption = None,
    config: ConfigOption = None,
    mail_host: Annotated[str | None, typer.Option(
        "-m", "--mail-host", metavar="HOST[:PORT]",
        help="Deliver by SMTP to this next hop (overrides mail_host and sendmail_command).")] = None,
    to_stdout: Annotated[bool, typer.Option(
        "--stdout", help="Write the result to stdout instead of delivering (procmail :0 fw).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "-n", "--dry-run", help="Run the chains and print what would be delivered to whom, with "
                                "each filter's verdict; deliver nothing.")] = False,
    debug: Annotated[bool, typer.Option("-d", "--debug", help="Log every step in detail.")] = False,
    tmp_dir: Annotated[str | None, typer.Option(
        "-t", "--tmp-dir", metavar="DIR", help="Directory for work files (overrides tmp_dir).")] = None,
    facility: Annotated[str | None, typer.Option(
        "-a", "--facility", metavar="FACILITY", help="Syslog facility (overrides facility).")] = None,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> int:
    """Filter one message from stdin and deliver it to the next hop."""
    if version:
        ctx.obj.streams.stdout.write(f"ispmailgate {__version__}\n".encode())
        return EX_OK
    if facility is not None:
        try:
            facility = _facility(facility)
        except ValueError as error:
            raise tempfail("4.3.5", f"usage: -a/--facility: {error}") from None
    request = Request(recipients=list(recipients or ()), sender=sender, config=config,
                      mail_host=mail_host, to_stdout=to_stdout, debug=debug,
                      tmp_dir=tmp_dir, facility=facility, dry_run=dry_run)
    return Gate(request, ctx.obj.streams, ctx.obj.preloaded).run()


admin_cli = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]},
                        help="Administration commands of ispmailgate.")


@admin_cli.callback()
def admin() -> None:
    """Administration commands; a first argument naming none of them is a recipient."""


@admin_cli.command("serve")
def serve(
    socket: Annotated[str | None, typer.Option(
        "--socket", metavar="PATH", help="Unix socket to listen on (overrides serve.socket).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, metavar="N", help="Worker processes (overrides serve.workers).")] = None,
    pidfile: Annotated[Path | None, typer.Option(
        "--pidfile", metavar="FILE", help="Write the master's pid here (overrides serve.pid_file).")] = None,
    foreground: Annotated[bool, typer.Option(
        "--foreground/--daemon", help="Stay in the foreground (systemd) or detach as a classic daemon.")] = True,
    config: ConfigOption = None,
) -> int:
    """Serve ispmailgate-client: pre-forked workers behind a Unix socket."""
    import ispmailgate_serve

    return ispmailgate_serve.serve(config, socket=socket, workers=workers, pidfile=pidfile,
                                   foreground=foreground)


@admin_cli.command("check")
def check_command(
    ctx: typer.Context,
    config: ConfigOption = None,
    config_only: Annotated[bool, typer.Option(
        "--config-only", help="Check the rule file alone (syntax, keys, types, regexes, filter "
                              "options): nothing on this machine, for a CI before the gateway.")] = False,
    client_user: Annotated[str | None, typer.Option(
        "--client-user", metavar="USER",
        help="Also check that USER, as whom the MTA runs ispmailgate-client, can connect to the "
             "socket of ispmailgate serve.")] = None,
) -> int:
    """Check the rule file and what its filters need; exit 0, or 78 with one line per problem."""
    from ispmailgate_admin import check

    if config_only and client_user is not None:
        raise typer.BadParameter("--client-user checks this machine; --config-only checks nothing on it")
    return check(config, ctx.obj.streams, config_only=config_only, client_user=client_user)


@admin_cli.command("explain")
def explain_command(
    ctx: typer.Context,
    recipients: Annotated[list[str], typer.Argument(metavar="RCPT...", show_default=False,
                                                    help="Envelope recipients to route.")],
    sender: SenderOption = None,
    config: ConfigOption = None,
) -> int:
    """Show the rule and chain each recipient gets, and the delivery groups; needs no message."""
    from ispmailgate_admin import explain

    return explain(config, sender, recipients, ctx.obj.streams)


class Invocation(NamedTuple):
    """What a run gets besides argv: its streams, and the config a server loaded once."""
    streams: Streams
    preloaded: "Config | None" = None


class Request(NamedTuple):
    """The command line of one filtering run, parsed."""
    recipients: list[str]
    sender: str | None = None
    config: Path | None = None
    mail_host: str | None = None
    to_stdout: bool = False
    debug: bool = False
    tmp_dir: str | None = None
    facility: str | None = None
    dry_run: bool = False

    @property
    def shell_mode(self) -> bool:
        """``ispmailgate < msg.eml``: no envelope given, so nothing is delivered."""
        return self.sender is None and not self.recipients


def run(argv: list[str], streams: Streams, preloaded: "Config | None" = None) -> int:
    """Run one command line; always returns an exit status an MTA understands."""
    try:
        cli = admin_cli if argv and argv[0] in admin_commands() else gate_cli
        command = click_command(cli)
        status = command.main(args=list(argv), prog_name="ispmailgate", standalone_mode=False,
                              obj=Invocation(streams, preloaded))
    except typer.TyperException as error:              # usage errors: never typer's exit 2
        return _status_line(streams, EX_TEMPFAIL, "4.3.5", f"usage: {error.format_message()}")
    except Stop as stop:
        return _status_line(streams, stop.code, stop.status, stop.text)
    except SystemExit as stop:          # typer's own exit when a reader closed stdout early
        return _status_line(streams, EX_TEMPFAIL, "4.3.0", f"stopped (exit {stop.code}): output closed")
    except BaseException as error:      # the last guard: no traceback ever reaches the MTA
        if not any(isinstance(h, SyslogHandler) for h in log.handlers):
            configure_logging("mail", False, "", [])
        log.error("internal error: %r", error, exc_info=True)
        return _status_line(streams, EX_TEMPFAIL, "4.3.0", f"internal error: {error!r}")
    if status in (EX_OK, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG):
        return status
    if status is None:
        return EX_OK
    return _status_line(streams, EX_TEMPFAIL, "4.3.0", f"interrupted (status {status})")


@functools.cache
def click_command(cli: typer.Typer):
    """The click command typer builds from an app: once, as it costs most of a served run."""
    return typer.main.get_command(cli)


def admin_commands() -> set[str]:
    """Subcommand names: only as the very first argument (``--`` makes anything a recipient)."""
    return {info.name or info.callback.__name__ for info in admin_cli.registered_commands}


def _status_line(streams: Streams, code: int, status: str, text: str) -> int:
    """The first line on stderr starts with the enhanced status code; pipe(8) quotes it."""
    try:
        streams.stderr.write(f"{status} {one_line(text)}\n")
        streams.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def main() -> int:
    """Console-script entry point: ``ispmailgate``."""
    streams = Streams(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    return run(sys.argv[1:], streams)


# =========================================================================================
# config
# =========================================================================================

class Setting(NamedTuple):
    """One top-level key of the rule file: default, reader, and its line of documentation."""
    default: Any
    convert: Any
    doc: str


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of filter names")
    return tuple(value)


def _domains(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip(". ") for v in value):
        raise ValueError("expected a list of domain names")
    return tuple(v.strip(". ").lower() for v in value)


_positive = seconds()      # a number of seconds: above 0, finite, at most a day

# Each MIME level costs a few stack frames in the parser and in the filters that walk the
# tree; 100 levels leave ample room below Python's recursion limit, also in a served run
# (tests/test_config_ranges.py runs every built-in filter at this depth).
MAX_MIME_DEPTH = 100


def _address(value: Any) -> str:
    """An address the gate itself sends to (the postmaster): usable as a recipient is."""
    address = canonical_address(_string(value))
    if not address or len(address.encode("utf-8")) > MAX_ADDRESS:
        raise ValueError(f"expected a mail address, got {value!r}")
    return address


def _word(pattern: str, what: str):
    """A string of what SMTP or an address can carry there (no space, control or <>)."""
    def convert(value: Any) -> str:
        if not re.fullmatch(pattern, _string(value)):
            raise ValueError(f"expected {what}, got {value!r}")
        return value
    return convert


def _one_of(*allowed: str):
    def convert(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value
    return convert


SYSLOG_FACILITIES = frozenset({"kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
                               "uucp", "cron", "authpriv", "ftp", *(f"local{n}" for n in range(8))})


def _facility(value: Any) -> str:
    import syslog       # loaded for the log anyway; it says which facilities this system has

    if not isinstance(value, str) or value.lower() not in SYSLOG_FACILITIES \
            or not hasattr(syslog, "LOG_" + value.upper()):
        raise ValueError(f"not a syslog facility: {value!r} (mail, daemon, local0 ... local7)")
    return value.lower()


def _hop(value: Any) -> str:
    parse_hop(_string(value))
    return value


SETTINGS: dict[str, Setting] = {
    "tmp_dir": Setting("/var/spool/ispmailgate", _string,
                       "Directory for per-message work directories (removed afterwards) and keep/."),
    "mail_host": Setting("localhost:26", _hop, "SMTP next hop, HOST[:PORT] (port 25 if omitted)."),
    "sendmail_command": Setting((), argv_option,
                                "Deliver through this sendmail-compatible argv instead of SMTP; "
                                "'-f SENDER -- RCPT...' is appended."),
    "loop_suffix": Setting(".ispmailgate", _word(r"[!-;=?-~]{0,100}", "up to 100 ASCII characters "
                                                 "without space, control characters or <>"),
                           "Appended to each recipient on SMTP re-injection; \"\" disables."),
    "postmaster": Setting("postmaster", _address, "Receives error reports and double bounces."),
    "facility": Setting("mail", _facility, "Syslog facility."),
    "log_file": Setting("", _string, "Also append log lines to this file (\"-\": stderr)."),
    "unqualified_domain": Setting("", _word(r"[^\s<>@\x00-\x1f\x7f]{0,253}", "a domain name"),
                                  "Domain appended to addresses without @domain."),
    "max_message_size": Setting(50 * 1024 * 1024, parse_size,
                                "Largest message accepted (bytes, or 10M / 2G)."),
    "on_oversize": Setting("tempfail", _one_of("tempfail", "reject"),
                           "What a message over max_message_size gets: tempfail (75) or reject (69)."),
    "on_filter_error": Setting("report", _one_of("report", "tempfail"),
                               "A filter error: report (postmaster gets the original) or tempfail."),
    "on_parse_error": Setting("deliver", _one_of("deliver", "tempfail"),
                              "A message the parser cannot handle: deliver it unchanged (kept in "
                              "tmp_dir/keep/, postmaster told) or tempfail."),
    "delivery_timeout": Setting(120.0, _positive, "Seconds to wait on each step of a delivery."),
    "time_limit": Setting(600.0, _positive,
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
    "mail_user": Setting("nobody", _string, "Started as root: the user to become before the message is "
                                            "read (never root unless spelled out; \"\" refuses to run)."),
    "mail_group": Setting("", _string, "Started as root: the group to become (default: mail_user's group)."),
    "helo_name": Setting("", _word(r"[A-Za-z0-9.-]{0,253}|\[[0-9A-Fa-f:.]{2,45}\]", "a host name"),
                         "Name for EHLO (default: this host's name)."),
    "default_filter": Setting(("dummy",), _strings, "Chain for recipients no rule matches."),
    "internal_domains": Setting((), _domains, "Our own domains (subdomains included), for the "
                                              "rule keys sender_is and recipient_is."),
}


class Condition(NamedTuple):
    """One test of a rule on the sender or a recipient: a pattern, or our own domains."""
    subject: str                        # "sender" | "recipient"
    pattern: Any = None                 # compiled regex, searched
    domains: tuple[str, ...] = ()       # with no pattern: is the address in these domains?
    negate: bool = False

    def holds(self, sender: str, recipient: str) -> bool:
        address = recipient if self.subject == "recipient" else sender
        found = (self.pattern.search(address) is not None if self.pattern is not None
                 else in_domains(address, self.domains))
        return found != self.negate


class Rule(NamedTuple):
    """One ``[[recipients]]`` entry: the first whose conditions all hold decides the chain."""
    label: str
    conditions: tuple[Condition, ...]
    chain: tuple[Filter, ...]

    def matches(self, sender: str, recipient: str) -> bool:
        return all(condition.holds(sender, recipient) for condition in self.conditions)


def in_domains(address: str, domains: tuple[str, ...]) -> bool:
    """Is the address's domain one of ``domains`` or below one?  The null sender is not."""
    domain = address.rpartition("@")[2].lower() if "@" in address else ""
    return bool(domain) and any(domain == d or domain.endswith("." + d) for d in domains)


class Config:
    """The rule file, checked as a whole when it is read (never first when mail arrives).

    Top-level settings read as attributes (``config.mail_host``); ``sections`` holds the
    tables other parts of the project own (``[serve]`` ...).
    """

    def __init__(self, path: str, values: dict[str, Any], rules: tuple[Rule, ...],
                 default_chain: tuple[Filter, ...], filters: dict[str, Filter],
                 sections: dict[str, Any] | None = None) -> None:
        self.path, self.values, self.rules = path, values, rules
        self.default_chain, self.filters, self.sections = default_chain, filters, sections or {}
        self.warnings: list[str] = []       # logged by each run once logging is set up

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


# Sections other parts of the project own: name -> loader(table, where) -> value.
def _arc_section(table: Any, where: str) -> Any:
    from ispmailgate_arc import load_section     # dkimpy and friends only when [arc] is used
    return load_section(table, where)


SECTIONS: dict[str, Any] = {"arc": _arc_section}


def _serve_section(table: Any, where: str) -> Any:
    from ispmailgate_serve import load_section     # only a rule file with [serve] pays for it

    return load_section(table, where)


SECTIONS["serve"] = _serve_section


def find_config(requested: Path | None) -> Path | None:
    """--config (or $ISPMAILGATE_CONFIG) must exist; the system file is used if present."""
    if requested is not None:
        return requested
    system = Path(DEFAULT_CONFIG_PATH)
    return system if system.exists() else None


def load_config(path: Path | None, problems: list[ConfigError] | None = None) -> Config | None:
    """Read and check a rule file; ``None`` gives the built-in default.

    Raises the first ConfigError; with a ``problems`` list (``ispmailgate check``) every
    error is collected there instead, and the result is None if the file cannot be read.
    """
    if path is None:
        return build_config({}, BUILT_IN_CONFIG, problems)
    checked = _Checked(problems)
    try:
        info, table = _read_rule_file(path)
    except ConfigError as error:
        return checked(_raise, error)
    distrust = _distrust(path, info)
    if distrust:        # not even its filter types are imported: that would run their code
        return checked(_raise, ConfigError("", distrust, str(path)))
    try:
        config = build_config(table, str(path), problems)
        if os.geteuid() == 0:
            checked(_mail_identity, config)
            for problem in _named_file_problems(config):
                checked(_raise, problem)
    except ConfigError as error:
        error.source = str(path)
        raise
    finally:
        for problem in problems or ():
            problem.source = problem.source or str(path)
    if info.st_mode & 0o004 and _holds_passphrases(table):
        config.warnings.append(f"{path} holds passphrases and is readable by others (chmod o-r)")
    return config


def _distrust(path: Path, info: os.stat_result) -> str:
    """Why this rule file must not be used: as root (Postfix and sendmail check theirs so),
    unless root alone can change it and every directory above it; else if anyone can."""
    if os.geteuid() == 0:
        from ispmailgate_filters.files import untrusted

        try:
            reason = untrusted(str(path), info)
            now = os.stat(path)
        except OSError as error:
            return f"cannot check who may change it: {error.strerror or error}"
        if reason:
            return f"{reason}: refused as root, whoever can change it could run commands as root"
        return "" if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino) else "replaced while it was read"
    if info.st_mode & 0o002:
        return f"writable by others: anyone could change what happens to mail (chmod o-w {path})"
    return ""


def _named_file_problems(config: "Config") -> list[ConfigError]:
    """Started as root: the commands the rule file runs and the secret files it names must
    be files only root can change, like the rule file itself."""
    import shutil

    from ispmailgate_filters.files import untrusted

    named = [("sendmail_command[0]", config.sendmail_command[0])] if config.sendmail_command else []
    for where, step in _steps_with_places(config):
        named += [(f"{where}.{key}", path) for key, path in step.trusted_files().items()]
    problems = []
    for where, name in dict.fromkeys(named):
        found = name if "/" in name else shutil.which(name)
        try:
            reason = untrusted(found) if found is not None else ""
        except FileNotFoundError:
            reason = ""     # a missing file is the filter's own problem (check reports it)
        except OSError as error:
            reason = f"cannot check who may change {found}: {error.strerror or error}"
        if reason:
            problems.append(ConfigError(where, f"{reason}: refused as root"))
    return problems


def _steps_with_places(config: "Config") -> list[tuple[str, Filter]]:
    places = [(f"filter.{name}", step) for name, step in config.filters.items()]
    places += [(f"{rule.label}.filters[{i}]", step) for rule in config.rules for i, step in enumerate(rule.chain)]
    places += [(f"default_filter[{i}]", step) for i, step in enumerate(config.default_chain)]
    seen: set[int] = set()
    return [(where, step) for where, step in places if id(step) not in seen and not seen.add(id(step))]


def _mail_identity(config: "Config") -> tuple[int, int] | None:
    """Started as root: the (uid, gid) to become, None to stay root (spelled out)."""
    user, group = config.mail_user, config.mail_group
    if not user:
        raise ConfigError("mail_user", "empty: refusing to run as root")
    if user == "root":
        return None
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError("mail_user", f"no such user: {user!r}") from None
    try:
        return entry.pw_uid, grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise ConfigError("mail_group", f"no such group: {group!r}") from None


def _read_rule_file(path: Path) -> tuple[os.stat_result, dict[str, Any]]:
    import tomllib

    try:
        with open(path, "rb") as stream:
            return os.fstat(stream.fileno()), tomllib.load(stream)
    except OSError as error:
        raise ConfigError("", f"cannot read: {error.strerror or error}", str(path)) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("", f"TOML syntax: {error}", str(path)) from None


class _Checked:
    """Calls a config reader: raises its ConfigError, or, given a list, collects it there
    (``failures`` counts them, so a reader of several parts can tell that one failed)."""

    def __init__(self, problems: list[ConfigError] | None) -> None:
        self.problems = problems
        self.failures = 0

    def __call__(self, read, *args, fallback: Any = None) -> Any:
        try:
            return read(*args)
        except ConfigError as error:
            if self.problems is None:
                raise
            self.problems.append(error)
            self.failures += 1
            return fallback


def _raise(error: ConfigError) -> None:
    raise error


def _holds_passphrases(table: Any) -> bool:
    if isinstance(table, dict):
        return any("passphrase" in str(key).lower() or _holds_passphrases(value)
                   for key, value in table.items())
    return isinstance(table, list) and any(_holds_passphrases(item) for item in table)


def build_config(table: dict[str, Any], source: str,
                 problems: list[ConfigError] | None = None) -> Config:
    checked = _Checked(problems)
    values = {key: setting.default for key, setting in SETTINGS.items()}
    sections: dict[str, Any] = {}
    for key, value in table.items():
        if key not in ("recipients", "filter"):
            checked(_top_level_key, key, value, values, sections)
    filters = _named_filters(table.get("filter", {}), checked)
    domains = values["internal_domains"]
    rules = tuple(rule for i, entry in enumerate(checked(_rule_list, table, fallback=[]))
                  if (rule := _rule(entry, i, filters, domains, checked)) is not None)
    default_chain = resolve_chain(values["default_filter"], "default_filter", filters, checked)
    return Config(source, values, rules, default_chain, filters, sections)


def _top_level_key(key: str, value: Any, values: dict[str, Any], sections: dict[str, Any]) -> None:
    if key in SECTIONS:
        sections[key] = SECTIONS[key](value, key)
    elif key in SETTINGS:
        try:
            values[key] = SETTINGS[key].convert(value)
        except (ValueError, TypeError) as error:
            raise ConfigError(key, str(error)) from None
    else:
        raise ConfigError(key, "unknown key")


def _rule_list(table: dict[str, Any]) -> list[dict[str, Any]]:
    rules = table.get("recipients", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError("recipients", "expected [[recipients]] tables")
    return rules


RULE_KEYS = {
    "recipient": "Regex the recipient must match (searched, case-insensitive; \"\" matches all).",
    "sender": "Regex the envelope sender must match (the null sender is \"\").",
    "recipient_not": "Regex the recipient must not match.",
    "sender_not": "Regex the sender must not match.",
    "recipient_is": "internal | external: the recipient's domain is (not) in internal_domains.",
    "sender_is": "internal | external: the sender's domain is (not) in internal_domains; "
                 "the null sender is external.",
    "filters": "The chain: filter instance names or filter types, in order.",
}


def _rule(entry: dict[str, Any], index: int, filters: dict[str, Filter],
          internal_domains: tuple[str, ...], checked: _Checked) -> Rule | None:
    """One ``[[recipients]]`` entry, or None: every problem of it goes to ``checked`` (a bad
    regex must not hide a misspelt filter name in the same rule), a run stops at the first."""
    where, failures = f"recipients[{index}]", checked.failures
    for key in sorted(set(entry) - set(RULE_KEYS)):
        checked(_raise, ConfigError(f"{where}.{key}", f"unknown key ({', '.join(RULE_KEYS)})"))
    chain = resolve_chain(checked(_chain_names, entry, where, fallback=()), f"{where}.filters",
                          filters, checked)
    conditions = []
    for subject in ("recipient", "sender"):
        for key, negate in ((subject, False), (f"{subject}_not", True)):
            pattern = checked(_pattern, entry.get(key, ""), f"{where}.{key}")
            if pattern is not None:
                conditions.append(Condition(subject, pattern, negate=negate))
        if f"{subject}_is" in entry:
            conditions.append(checked(_domain_condition, subject, entry[f"{subject}_is"],
                                      f"{where}.{subject}_is", internal_domains))
    return None if checked.failures > failures else Rule(where, tuple(conditions), chain)


def _chain_names(entry: dict[str, Any], where: str) -> tuple[str, ...]:
    if "filters" not in entry:
        raise ConfigError(f"{where}.filters", "missing: the chain for matching recipients")
    try:
        return _strings(entry["filters"])
    except ValueError as error:
        raise ConfigError(f"{where}.filters", str(error)) from None


def _domain_condition(subject: str, value: Any, where: str, domains: tuple[str, ...]) -> Condition:
    if value not in ("internal", "external"):
        raise ConfigError(where, f"expected internal or external, got {value!r}")
    if not domains:
        raise ConfigError(where, "needs internal_domains (the domains that are ours)")
    return Condition(subject, domains=domains, negate=value == "external")


def _pattern(value: Any, where: str):
    """A Python regex searched case-insensitively (domains are); "" matches everything."""
    if not isinstance(value, str):
        raise ConfigError(where, f"expected a regular expression string, got {value!r}")
    if not value:
        return None
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as error:
        raise ConfigError(where, f"bad regex: {error}") from None


def _named_filters(table: Any, checked: _Checked) -> dict[str, Filter]:
    """``[filter.NAME]`` tables: configured instances, each with a ``type``.

    When errors are being collected, a broken instance is kept as a bare placeholder so
    the chains naming it do not report it a second time as an unknown filter.
    """
    return {name: checked(_named_filter, name, options, fallback=Filter(label=name))
            for name, options in checked(_filter_tables, table, fallback={}).items()}


def _filter_tables(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError("filter", "expected [filter.NAME] tables")
    return table


def _named_filter(name: str, options: Any) -> Filter:
    where = f"filter.{name}"
    if not isinstance(options, dict):
        raise ConfigError(where, "expected a table")
    options = dict(options)
    kind = options.pop("type", None)
    if not isinstance(kind, str):
        raise ConfigError(f"{where}.type", "missing: the filter type (dummy, banner, ...)")
    return _built(filter_class(kind, f"{where}.type"), options, where, name)


def resolve_chain(names: tuple[str, ...], where: str, filters: dict[str, Filter],
                  checked: _Checked | None = None) -> tuple[Filter, ...]:
    """A chain's names: each a ``[filter.NAME]`` instance or a type with its defaults.

    With ``checked`` collecting problems, every unknown name is one; the chain is then ()."""
    checked = checked or _Checked(None)
    failures = checked.failures
    chain = tuple(checked(_chain_step, name, f"{where}[{i}]", filters) for i, name in enumerate(names))
    return () if checked.failures > failures else chain


def _chain_step(name: str, where: str, filters: dict[str, Filter]) -> Filter:
    return filters[name] if name in filters else _built(filter_class(name, where), {}, where)


def _built(cls: type[Filter], options: dict[str, Any], where: str, label: str = "") -> Filter:
    """A plugin failing in a way of its own is a config error too: ``check`` reports it, and
    a server's reload refuses it instead of dying."""
    try:
        return cls.from_options(options, where, label)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(where, f"cannot build filter {cls.__module__}:{cls.__qualname__}: "
                                 f"{type(error).__name__}: {error}") from None


def filter_class(kind: str, where: str) -> type[Filter]:
    """A filter type: built-in short name, then entry point, then ``module:Class``."""
    from ispmailgate_filters import BUILTIN

    target = BUILTIN.get(kind)
    if target is None:
        target = _entry_point(kind) or (kind if ":" in kind else None)
    if target is None:
        raise ConfigError(where, f"unknown filter {kind!r} (built in: {', '.join(sorted(BUILTIN))}; "
                                 "or a [filter.NAME] table, an entry point, or module:Class)")
    module_name, _, class_name = target.partition(":")
    try:
        import importlib
        cls = getattr(importlib.import_module(module_name), class_name)
    except (Exception, SystemExit) as error:    # ImportError, whatever the module raises
        raise ConfigError(where, f"cannot load filter {kind!r} from {target}: "
                                 f"{type(error).__name__}: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise ConfigError(where, f"{target} is not a Filter class")
    return cls


def _entry_point(kind: str) -> str | None:
    from importlib.metadata import entry_points

    found = entry_points(group="ispmailgate.filters", name=kind)
    return next((ep.value for ep in found), None)


# =========================================================================================
# envelope
# =========================================================================================

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


def envelope_addresses(config: "Config", sender: str,
                       recipients: list[str]) -> "tuple[str, list[str], dict[str, Result]]":
    """The envelope as it is delivered, checked before anything is: the sender, the usable
    recipients (canonical, each once), and a permanent failure (5.1.3) for each recipient
    that no next hop could be given -- reported like one a next hop refused, so the others
    are still delivered.  An unusable sender refuses the message (69, 5.1.7)."""
    try:
        sender = "" if sender in ("", "<>") else usable_address(sender, config)
    except ValueError as error:
        raise Stop(EX_UNAVAILABLE, "5.1.7", f"bad sender address: {error}") from None
    usable, refused = [], {}
    for recipient in recipients:
        try:
            usable.append(usable_address(recipient, config))
        except ValueError as error:
            refused[recipient] = Result("rejected", "5.1.3", f"bad recipient address: {error}")
    if "" in usable:
        raise tempfail("4.1.3", "empty recipient address")
    return sender, list(dict.fromkeys(usable)), refused


def usable_address(text: str, config: "Config") -> str:
    """``canonical_address``, and short enough for an SMTP command with the loop suffix."""
    address = canonical_address(text, config.unqualified_domain)
    if len(address.encode("utf-8")) + len(config.loop_suffix.encode("utf-8")) > MAX_ADDRESS:
        raise ValueError(f"longer than {MAX_ADDRESS} octets with the loop suffix: {text[:60]!r}...")
    return address


def split_from_line(data: bytearray) -> str | None:
    """Remove a leading mbox ``From sender date`` line; return it, or None if there is none."""
    if not data.startswith(b"From "):
        return None
    end = data.find(b"\n")
    end = len(data) if end < 0 else end + 1
    line = bytes(data[:end]).decode("utf-8", "surrogateescape")
    del data[:end]
    return line


def sender_of_from_line(line: str | None) -> str | None:
    """The sender of an mbox From_ line; MAILER-DAEMON is the null sender, "-" is unknown."""
    words = (line or "").split()
    sender = words[1] if len(words) > 1 else "-"
    if sender == "-":
        return None
    return "" if sender.upper() == "MAILER-DAEMON" else sender


def envelope_from_headers(message: Message, from_line: str | None) -> tuple[str, list[str]]:
    """Shell test mode: sender from From_, Return-Path or From:; recipients as ``sendmail -t``."""
    from email.utils import getaddresses

    headers = message.top_headers()
    sender = sender_of_from_line(from_line)
    if sender is None:
        sender = headers.get("Return-Path") or headers.get("From") or ""
        sender = getaddresses([sender])[0][1] if sender.strip() not in ("", "<>") else ""
    fields = [v for name in ("To", "Cc", "Bcc") for v in headers.get_all(name)]
    return sender, [address for _, address in getaddresses(fields) if address]


# =========================================================================================
# route and run chains
# =========================================================================================

class Route(NamedTuple):
    rule: str
    chain: tuple[Filter, ...]

    @property
    def chain_label(self) -> str:
        return ",".join(step.title for step in self.chain) or "-"


def route(config: Config, sender: str, recipient: str) -> Route:
    for rule in config.rules:
        if rule.matches(sender, recipient):
            return Route(rule.label, rule.chain)
    return Route("default", config.default_chain)


class Leaf(NamedTuple):
    """Where a set of recipients ended up after their chains: a message, or a verdict."""
    recipients: list[str]
    message: Message | None
    verdict: Verdict | None = None
    step: str = ""
    unparsed: bool = False          # the parser gave up: delivered unchanged, see on_parse_error


class ChainRunner:
    """Runs every recipient's chain, each distinct step once per distinct input.

    The chains form a tree: recipients whose chains start with equal steps (same type
    and options, same per-recipient variant) share those steps' work, and their paths
    split where their chains differ.  A verdict ends the path for its recipients.
    """

    def __init__(self, make_context, log, trace: "list[StepTrace] | None" = None) -> None:
        self.make_context = make_context
        self.log = log
        self.trace = trace          # --dry-run: what each step did, for whom

    def run(self, message: Message, sender: str, routes: dict[str, Route]) -> list[Leaf]:
        leaves: list[Leaf] = []
        pending = [(message, list(routes), 0)]
        while pending:
            current, recipients, depth = pending.pop()
            finished, branches = self.split(routes, recipients, depth)
            if finished:
                leaves.append(Leaf(finished, current))
            shared = len(branches) + bool(finished) > 1
            for (step, _), members in branches.items():
                work = current.fork() if shared else current
                leaf = self._step(step, work, Envelope(sender, tuple(members)), message)
                if leaf is None:
                    pending.append((work, members, depth + 1))
                else:
                    leaves.append(leaf)
        return leaves

    @classmethod
    def split(cls, routes: dict[str, Route], recipients: list[str],
              depth: int) -> "tuple[list[str], dict[tuple[Filter, Any], list[str]]]":
        """Who is done after ``depth`` steps, and who takes which (step, variant) next."""
        finished = [r for r in recipients if len(routes[r].chain) == depth]
        branches: dict[tuple[Filter, Any], list[str]] = {}
        for recipient in recipients:
            if len(routes[recipient].chain) > depth:
                step = routes[recipient].chain[depth]
                branches.setdefault((step, cls._variant(step, recipient)), []).append(recipient)
        return finished, branches

    @staticmethod
    def _variant(step: Filter, recipient: str) -> Any:
        try:
            return step.variant(recipient)
        except Exception as error:    # decided in _step: the step will fail for them
            return ("variant-error", repr(error))

    def _step(self, step: Filter, work: Message, envelope: Envelope, original: Message) -> Leaf | None:
        members = list(envelope.recipients)
        started = time.monotonic()
        before = bytes(work.to_bytes()) if self.trace is not None else None
        try:
            step.process(work, self.make_context(envelope, step))
        except Verdict as verdict:
            # the summary line carries the verdict; this is the detail of -d
            self.log.debug("%s: %s for %s: %s", step.title, verdict.outcome, ",".join(members), verdict)
            return self._record(step, started, Leaf(members, None, verdict, step.title))
        except ParseError as error:
            self.log.error("%s: cannot parse the message: %s", step.title, error)
            return self._record(step, started, Leaf(members, Message(original.raw), None, step.title,
                                                    unparsed=True), f"cannot parse the message: {error}")
        except (OSError, MemoryError) as error:    # the machine's trouble, not the message's
            self.log.error("%s: %r", step.title, error, exc_info=True)
            status = "4.3.1" if getattr(error, "errno", None) in (28, 122) or isinstance(error, MemoryError) \
                else "4.3.0"
            return self._record(step, started, Leaf(members, None, TempFail(str(error), status), step.title))
        except Exception as error:
            self.log.error("%s: filter error for %s: %r", step.title, ",".join(members), error,
                           exc_info=True)
            verdict = FilterError(f"filter {step.title} failed: {error!r}")
            return self._record(step, started, Leaf(members, None, verdict, step.title))
        self.log.debug("%s: %.1f ms for %s%s", step.title, (time.monotonic() - started) * 1000,
                       ",".join(members), " (changed)" if work.changed else "")
        if before is not None:
            self._record(step, started, Leaf(members, work),
                         "changed the message" if work.to_bytes() != before else "passed")
        return None

    def _record(self, step: Filter, started: float, leaf: Leaf, outcome: str = "") -> Leaf:
        """For --dry-run: what this step did (a verdict speaks for itself)."""
        if self.trace is not None:
            if leaf.verdict is not None:
                outcome = f"{leaf.verdict.outcome}: {leaf.verdict.status} {leaf.verdict}"
            self.trace.append(StepTrace(step.title, tuple(leaf.recipients), outcome,
                                        (time.monotonic() - started) * 1000))
        return leaf


class StepTrace(NamedTuple):
    """What one filter step did for its recipients (``--dry-run`` prints these)."""
    step: str
    recipients: tuple[str, ...]
    outcome: str
    ms: float


# =========================================================================================
# the process: privileges and time
# =========================================================================================

def drop_privileges(config: Config) -> None:
    """Started as root: become mail_user/mail_group (default nobody), groups cleared.

    Called after the rule file is read and before the message is: nothing in a message is
    ever handled with root's rights.
    """
    if os.geteuid() != 0:
        return
    user, group = config.mail_user, config.mail_group
    try:
        identity = _mail_identity(config)       # load_config checked it already, as check does
    except ConfigError as error:
        raise tempfail("4.3.5", f"config error: {config.path}: {error}") from None
    if identity is None:      # mail_user = "root", spelled out: allowed, never silently
        log.warning("mail_user is root: this message is handled with root's rights")
        return
    uid, gid = identity
    if not readable_by(uid, gid, os.path.dirname(os.__file__), os.path.dirname(__file__)):
        log.debug("%s cannot read this Python installation: importing everything first", user)
        preload(config)
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as error:
        raise tempfail("4.3.5", f"cannot become {user}:{group or '-'}: {error}") from None
    if os.geteuid() == 0 or os.getegid() == 0 and gid != 0:
        raise tempfail("4.3.5", f"still root after switching to {user}")
    log.debug("running as %s (uid %d, gid %d)", user, os.getuid(), os.getgid())


def readable_by(uid: int, gid: int, *directories: str) -> bool:
    """Can this user list and read these directories, every parent directory included?"""
    import stat

    for directory in directories:
        path = os.path.abspath(directory)
        while True:
            info = os.stat(path)
            bits = (stat.S_IRUSR | stat.S_IXUSR if info.st_uid == uid else
                    stat.S_IRGRP | stat.S_IXGRP if info.st_gid == gid else stat.S_IROTH | stat.S_IXOTH)
            if info.st_mode & bits != bits:
                return False
            if path == os.path.dirname(path):
                break
            path = os.path.dirname(path)
    return True


def preload(config: Config) -> None:
    """Import now what the run imports lazily later, for every filter in the rule file.

    Done before privileges are dropped (an interpreter installed under a private home is
    not readable by mail_user) and before ``serve`` forks its workers (load once).
    """
    import importlib

    for module in ("email.utils", "email.header", "email.message", "email.parser", "codecs",
                   "encodings.idna", "hashlib", "importlib.metadata", "shutil", "socket", "subprocess",
                   "syslog", "tomllib", "unicodedata", "urllib.parse"):
        importlib.import_module(module)
    import codecs

    for charset in MAIL_CHARSETS:   # codecs load their modules on first lookup, then cache
        codecs.lookup(charset)
    for step in {*config.filters.values(), *config.default_chain,
                 *(step for rule in config.rules for step in rule.chain)}:
        step.preload()


# The charsets mail is written in, looked up before privileges are dropped.
MAIL_CHARSETS = ("ascii", "latin-1", "utf-8", "utf-16", "utf-32", "utf-7", "koi8-r", "koi8-u",
                 "mac-roman", "gb2312", "gbk", "gb18030", "big5", "big5hkscs", "shift_jis",
                 "euc-jp", "iso2022-jp", "euc-kr", "cp932", "cp949", "cp950", "hz", "tis-620",
                 "cp437", "cp850", "cp866", *(f"cp125{i}" for i in range(9)),
                 *(f"iso8859-{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)))


class TimeLimitExceeded(BaseException):
    """Raised by SIGALRM in the middle of whatever the run was doing (a BaseException,
    like a verdict, so no ``except Exception`` on the way swallows it)."""


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP before the first delivery: the run stops, its children are
    killed on the way out (``finally``), and the MTA keeps the message (75)."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} before delivery")


class time_limit:
    """Wall-clock limit for one message, with SIGALRM (main thread only; elsewhere only
    :meth:`check` applies it).

    Until :meth:`shield` the alarm interrupts whatever runs.  From the first delivery on
    it no longer does: it must never land inside a transaction the next hop may already
    have accepted, so the limit is checked (:meth:`check`) before each delivery starts,
    and a delivery, bounded by ``delivery_timeout`` per step, runs to its end.  A
    terminating signal is treated alike when nobody else handles it (a one-shot run; a
    ``serve`` worker handles its own).
    """

    SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = float("inf")
        self.shielded = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "time_limit":
        import signal
        import threading

        self.deadline = time.monotonic() + self.seconds
        if threading.current_thread() is not threading.main_thread():
            return self
        self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._expired)
        for name in self.SIGNALS:
            number = getattr(signal, name)
            if signal.getsignal(number) in (signal.SIG_DFL, signal.default_int_handler):
                self.previous[number] = signal.signal(number, self._signalled)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous:
            import signal
            signal.setitimer(signal.ITIMER_REAL, 0)
            for number, handler in self.previous.items():
                signal.signal(number, handler)
            self.previous.clear()

    def shield(self) -> None:
        """From now on the alarm and signals no longer interrupt the run (see the class)."""
        self.shielded = True

    def check(self) -> None:
        if time.monotonic() >= self.deadline:
            raise TimeLimitExceeded()

    def _expired(self, signum, frame) -> None:
        if not self.shielded:
            raise TimeLimitExceeded()

    def _signalled(self, signum, frame) -> None:
        if not self.shielded:       # once delivering, the run finishes (each step is bounded)
            raise Interrupted(signum)


# =========================================================================================
# one run, from argv to exit status
# =========================================================================================

def _absolute(path: Path) -> str | None:
    """``path`` made absolute; None where the working directory is gone (a served request
    from a client directory the worker cannot enter runs in a removed one)."""
    try:
        return os.path.abspath(path)
    except OSError:
        return None


class Gate:
    """One message through the gate."""

    def __init__(self, request: Request, streams: Streams, preloaded: Config | None = None) -> None:
        self.request = request
        self.streams = streams
        self.preloaded = preloaded
        self.id = os.urandom(5).hex().upper()
        self.started = time.monotonic()
        self.workdir_path: Path | None = None
        self.notices: list[Notice] = []
        self.summary: list[str] = []
        self.errors: list[str] = []
        self.message_id = "-"
        self.clock = time_limit(0)
        # Set once a next hop accepted anything of this message (or the postmaster the
        # report that carries it): the commit point.  From then on nothing the gate does
        # itself -- logging, reports, the time limit, an exception -- may end in 75.
        self.delivered = False
        self.unlogged = False           # no syslog daemon and no log_file: say so once

    def run(self) -> int:
        config = self._config()
        self.config = config
        configure_logging(self.request.facility or config.facility, self.request.debug,
                          "", self.errors, self.id)
        syslog_up = syslog_reachable(probe=False)
        self.unlogged = not syslog_up and not config.log_file
        for warning in config.warnings:
            log.warning("%s", warning)
        umask = os.umask(0o077)     # what the gate and its filters write is theirs alone
        try:
            drop_privileges(config)
            opened = add_log_file(config.log_file, self.id)     # opened as mail_user, never as root
            self.unlogged = not syslog_up and not opened
            with time_limit(config.time_limit) as self.clock:
                return self._run(config)
        except TimeLimitExceeded:       # raised only before the first delivery starts
            log.error("time limit of %s s exceeded", config.time_limit)
            return self._stopped(EX_TEMPFAIL, "4.4.7", f"time limit of {config.time_limit:.0f} s exceeded")
        except Interrupted as interrupted:
            log.error("%s", interrupted)
            return self._stopped(EX_TEMPFAIL, "4.3.0", str(interrupted))
        except Stop as stop:
            return self._stopped(stop.code, stop.status, stop.text)
        except Exception as error:
            log.error("internal error: %r", error, exc_info=True)
            return self._stopped(EX_TEMPFAIL, "4.3.0", f"internal error: {error!r}")
        finally:
            self._remove_workdir()
            os.umask(umask)

    def _stopped(self, code: int, status: str, text: str) -> int:
        """A run that ended early; if something was already delivered, it ends in 0."""
        if self.delivered and code != EX_OK:
            log.error("after the next hop accepted this message: %s %s; exit 0, for a retry "
                      "would deliver it again", status, text)
            code, status, text = EX_OK, "2.0.0", "delivered"
        self._log_summary(f"status={_outcome_word(code)}" + ("" if code == EX_OK else f" ({status} {text})"))
        return self._finish(code, status, text)

    def _config(self) -> Config:
        path = find_config(self.request.config)
        if self.preloaded is not None and (path is None or _absolute(path) == self.preloaded.path):
            return self.preloaded
        try:
            return load_config(path)
        except ConfigError as error:
            configure_logging(self.request.facility or "mail", self.request.debug, "", self.errors, self.id)
            log.error("config error: %s", error)
            raise tempfail("4.3.5", f"config error: {error}") from None

    def _run(self, config: Config) -> int:
        data = read_message(self.streams.stdin, config.max_message_size, config.on_oversize)
        self.size = len(data)
        self.message_id = message_id_of(data)       # for the log line, whatever happens later
        from_line = split_from_line(data)
        self.message = message = Message(data, max_depth=config.max_mime_depth,
                                         max_parts=config.max_mime_parts)
        self.budget = Budget(config.max_objects, config.max_decoded)
        sender, recipients, refused = self._envelope(message, from_line, config)
        self.sender, self.recipients = sender, recipients
        hop = self._next_hop(config, from_line)
        routes = {recipient: route(config, sender, recipient) for recipient in recipients}
        trace: list[StepTrace] | None = [] if self.request.dry_run else None
        leaves = ChainRunner(self._context, log, trace).run(message, sender, routes) if routes else []
        if trace is not None:
            return self._dry_run(leaves, routes, hop, trace)
        deferred = [leaf for leaf in leaves if self.defers(leaf, hop)]
        if deferred:        # deliver nothing: the retry then does everything once
            leaf = deferred[0]
            self._log_groups(leaves, routes, {})
            text = f"{leaf.step}: {leaf.verdict}" if leaf.verdict else f"{leaf.step}: cannot parse the message"
            raise tempfail(leaf.verdict.status if leaf.verdict else "4.6.0", text)
        delivery = Delivery(self, hop, config)
        transfers = delivery.prepare(leaves, message)       # all the work, under the time limit
        results = delivery.deliver(transfers, message, refused)     # the commit point is in here
        return self._conclude(leaves, routes, results, hop)

    def _conclude(self, leaves: "list[Leaf]", routes: "dict[str, Route]", results: "dict[str, Result]",
                  hop) -> int:
        """After the deliveries: the bounce, the log line, the exit status.  Never raises, and
        ends in 75 only for a recipient whose message no next hop accepted."""
        try:
            self._log_groups(leaves, routes, results)
        except Exception as error:      # noqa: BLE001 -- past the commit point nothing raises
            log.error("cannot describe the delivery groups: %r", error)
        try:
            code, status, text = self._exit_status(results, hop)
        except Exception as error:      # noqa: BLE001
            log.error("internal error after delivery: %r", error, exc_info=True)
            code, status, text = (EX_OK, "2.0.0", "delivered") if self.delivered else \
                (EX_TEMPFAIL, "4.3.0", f"internal error: {error!r}")
        self._log_summary(f"status={_outcome_word(code)}" + ("" if code == EX_OK else f" ({status} {text})"))
        return self._finish(code, status, text)

    def _dry_run(self, leaves: list[Leaf], routes: dict[str, Route], hop, trace: list[StepTrace]) -> int:
        from ispmailgate_admin import dry_run_report

        report = dry_run_report(self, leaves, routes, hop, trace)
        self.streams.stdout.write(report.encode("utf-8", "surrogateescape"))
        self.streams.stdout.flush()
        self._log_groups(leaves, routes, {})
        self._log_summary("status=dry-run")
        return self._finish(EX_OK, "2.0.0", "dry run")

    def _envelope(self, message: Message, from_line: str | None,
                  config: Config) -> "tuple[str, list[str], dict[str, Result]]":
        request = self.request
        if request.shell_mode:
            sender, recipients = envelope_from_headers(message, from_line)
        elif request.sender is not None:
            sender, recipients = request.sender, request.recipients
        elif sender_of_from_line(from_line) is not None:
            sender, recipients = sender_of_from_line(from_line), request.recipients
        else:
            raise tempfail("4.5.1", "no envelope sender: give -f SENDER (-f '' for the null sender) "
                                    "or an mbox From_ line")
        if not recipients:
            raise tempfail("4.5.3", "no recipients: give them as arguments")
        sender, usable, refused = envelope_addresses(config, sender, recipients)
        for recipient, result in refused.items():
            log.warning("<%s>: %s %s", one_line(recipient), result.status, result.text)
        return sender, usable, refused

    def defers(self, leaf: Leaf, hop) -> bool:
        """A leaf that makes the whole run a tempfail, before anything is delivered."""
        if isinstance(leaf.verdict, TempFail):
            return True
        if isinstance(leaf.verdict, FilterError):      # stdout cannot carry a postmaster report
            return self.config.on_filter_error == "tempfail" or isinstance(hop, StdoutHop)
        return leaf.unparsed and self.config.on_parse_error == "tempfail"

    def original_headers(self) -> bytes:
        """The original's header block as it came, for a bounce (at most 64 KB, cut at a line
        end): a slice, never a parse, as a bounce goes out after delivery."""
        block = bytes(self.message.raw[:min(header_block_end(self.message.raw), 64 * 1024)])
        return block if block.endswith(b"\n") or b"\n" not in block else block[:block.rindex(b"\n") + 1]

    def _next_hop(self, config: Config, from_line: str | None):
        request = self.request
        if request.to_stdout or request.shell_mode:
            return StdoutHop(self.streams.stdout, from_line)
        if request.mail_host:
            try:
                host, port = parse_hop(request.mail_host)
            except ValueError as error:
                raise tempfail("4.3.5", f"--mail-host: {error}") from None
            return SmtpHop(host, port, config)
        return configured_hop(config)

    def _context(self, envelope: Envelope, step: Filter) -> Context:
        return Context(envelope, message_id=self.id, log=log.getChild(step.name),
                       workdir=self.workdir, postmaster=self.config.postmaster, notices=self.notices,
                       dry_run=self.request.dry_run, budget=self.budget)

    def workdir(self) -> Path:
        """This message's work directory under tmp_dir, created 0700 on first use."""
        if self.workdir_path is None:
            from ispmailgate_filters.files import refuse_untrusted_directories

            base = Path(self.request.tmp_dir or self.config.tmp_dir)
            try:
                path = base / f"ispmailgate-{self.id}"
                refuse_untrusted_directories(str(path))     # mail_user = "root": filters write here
                path.mkdir(mode=0o700)
            except OSError as error:
                raise TempFail(f"cannot create a work directory in {base}: {error.strerror}",
                               "4.3.1" if error.errno == 28 else "4.3.0") from None
            self.workdir_path = path
        return self.workdir_path

    def _remove_workdir(self) -> None:
        if self.workdir_path is not None:
            import shutil
            try:
                shutil.rmtree(self.workdir_path, ignore_errors=True)
            except Exception as error:      # noqa: BLE001 -- after delivery nothing raises
                log.error("cannot remove %s: %r", self.workdir_path, error)

    def keep_backup(self, data: bytes | bytearray) -> Path | None:
        """The original's tmp_dir/keep/: a copy of a message the parser could not handle."""
        from ispmailgate_filters.files import create_in, private_directory

        keep = Path(self.request.tmp_dir or self.config.tmp_dir) / "keep"
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{self.id}.eml"
        try:
            directory = private_directory(str(keep))
            try:
                create_in(directory, name, bytes(data))
            finally:
                os.close(directory)
            return keep / name
        except OSError as error:
            log.error("cannot keep a backup in %s: %s", keep, error)
            return None

    def _exit_status(self, results: "dict[str, Result]", hop) -> tuple[int, str, str]:
        deferred = [r for r in results.values() if r.state == "deferred"]
        rejected = {rcpt: r for rcpt, r in results.items() if r.state == "rejected"}
        if deferred:        # a next hop did not take it for these: only the MTA's retry can
            return EX_TEMPFAIL, deferred[0].status, deferred[0].text
        if rejected and len(rejected) == len(results):
            first = next(iter(rejected.values()))
            return EX_UNAVAILABLE, first.status, first.text
        if rejected and not isinstance(hop, StdoutHop):
            # Some recipients got the message: a 69 would bounce them too, so the sender
            # gets our own delivery status notification for the others.
            if not Reports(self, hop, self.config).bounce(rejected) and not self.delivered:
                return EX_TEMPFAIL, "4.3.0", ("could not send the bounce for " + ",".join(rejected)
                                              + "; the MTA will retry all recipients")
        return EX_OK, "2.0.0", "ok"

    def _finish(self, code: int, status: str, text: str) -> int:
        try:
            if code != EX_OK:
                _status_line(self.streams, code, status, text)
            if self.errors and (code != EX_OK or self.request.shell_mode):
                # the MTA puts every line into its queue's reason: what the status line said, once
                for line in [line for line in self.errors if code == EX_OK or one_line(text) not in line][:20]:
                    self.streams.stderr.write(f"ispmailgate: {line}\n")
            if self.request.shell_mode or self.request.debug:
                for line in self.summary[:1000]:
                    self.streams.stderr.write(f"ispmailgate: {line}\n")
            if self.unlogged:
                self.streams.stderr.write(f"ispmailgate: {UNLOGGED}\n")
            self.streams.stderr.flush()
        except (OSError, ValueError):       # stderr closed: the exit status still says it
            pass
        return code

    def _log_groups(self, leaves: "list[Leaf]", routes: "dict[str, Route]", results: "dict[str, Result]") -> None:
        for leaf in leaves:
            first = routes[leaf.recipients[0]]
            outcome = (leaf.verdict.outcome + f" by {leaf.step}: {leaf.verdict}" if leaf.verdict
                       else results.get(leaf.recipients[0], Result("not delivered", "", "")).describe())
            self.summary.append(f"to={','.join('<%s>' % r for r in leaf.recipients)} rule={first.rule} "
                                f"chain={first.chain_label} outcome={outcome}")
        for recipient, result in results.items():
            if recipient not in routes:     # refused before any chain: an unusable address
                self.summary.append(f"to=<{one_line(recipient)[:100]}> outcome={result.describe()}")

    def _log_summary(self, status: str) -> None:
        """The one line per message: run id, Message-ID, sender, size, groups, status, time.
        Linear in what it prints and never raises: it runs after delivery too."""
        try:
            took = (time.monotonic() - self.started) * 1000
            sender = getattr(self, "sender", None)
            log.info("msgid=%s from=<%s> size=%s %s %s ms=%.0f", self.message_id,
                     sender if sender is not None else "?", getattr(self, "size", "?"),
                     "; ".join(self.summary[:1000]) or "-", status, took)
        except Exception:       # noqa: BLE001 -- logging is never what changes an outcome
            pass


def _outcome_word(code: int) -> str:
    return {EX_OK: "done", EX_TEMPFAIL: "deferred", EX_UNAVAILABLE: "rejected"}.get(code, str(code))


_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(?:\r?\n[ \t]+)?([^\r\n]{0,200})", re.I | re.M)


def header_block_end(data: bytes | bytearray) -> int:
    """Where the top header block ends (after its blank line), by a linear scan."""
    ends = [found + len(blank) for blank in (b"\n\n", b"\n\r\n") if (found := data.find(blank)) >= 0]
    return min(ends, default=len(data))


def message_id_of(data: bytes | bytearray) -> str:
    """The Message-ID for the log line: one linear scan of the top header block, done as
    the message is read, so that no log line ever parses a header (after delivery, a slow
    parse would be work the time limit no longer bounds)."""
    match = _MESSAGE_ID.search(data, 0, header_block_end(data))
    return one_line(match.group(1).decode("utf-8", "surrogateescape"))[:200] or "-" if match else "-"


def read_message(stream: BinaryIO, limit: int, on_oversize: str) -> bytearray:
    """All of stdin, in one buffer grown in place (no second copy of a large message)."""
    data = bytearray()
    try:
        while chunk := stream.read(1 << 20):
            data += chunk
            if len(data) > limit:
                if on_oversize == "reject":
                    raise Stop(EX_UNAVAILABLE, "5.3.4", f"message larger than {limit} bytes")
                raise tempfail("4.3.4", f"message larger than max_message_size ({limit} bytes)")
    except OSError as error:
        raise tempfail("4.3.0", f"cannot read the message: {error}") from None
    return data


# =========================================================================================
# logging
# =========================================================================================

class SyslogHandler(logging.Handler):
    """Syslog through the C library (no socket juggling); one syslog line per text line."""

    PRIORITIES = {logging.DEBUG: "LOG_DEBUG", logging.INFO: "LOG_INFO", logging.WARNING: "LOG_WARNING",
                  logging.ERROR: "LOG_ERR", logging.CRITICAL: "LOG_CRIT"}

    def __init__(self, facility: str) -> None:
        import syslog

        super().__init__()
        self.syslog = syslog
        syslog.openlog("ispmailgate", syslog.LOG_PID, getattr(syslog, "LOG_" + facility.upper()))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            priority = getattr(self.syslog, self.PRIORITIES.get(record.levelno, "LOG_INFO"))
            for line in self.format(record).splitlines() or [""]:
                self.syslog.syslog(priority, loggable(line))
        except Exception:       # logging must never be what loses a message
            self.handleError(record)


class _Collector(logging.Handler):
    """Error lines kept for stderr, written after the status line the MTA reads first."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(one_line(record.getMessage()))


UNLOGGED = ("nothing of this run was logged: syslog is not reachable (nothing listens on /dev/log) "
            "and log_file is unset or cannot be opened (ispmailgate check says more)")


def syslog_reachable(path: str = "/dev/log", probe: bool = True) -> bool:
    """Does anything listen where syslog(3) sends its lines?  With no daemon (containers,
    minimal hosts) the C library drops every line without a word.  ``probe=False``, for
    every run: a socket there is taken for a daemon (a stat, no import, no connect)."""
    import stat

    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    if not probe:
        return True
    import _socket      # the C module: socket.py would cost its enum import

    for kind in (_socket.SOCK_DGRAM, _socket.SOCK_STREAM):
        probe = _socket.socket(_socket.AF_UNIX, kind)
        try:
            probe.connect(path)
            return True
        except OSError:
            continue
        finally:
            probe.close()
    return False


def configure_logging(facility: str, debug: bool, log_file: str, errors: list[str],
                      run_id: str = "") -> bool:
    """Syslog (and log_file); every line of one message starts with its run id.  False when
    the lines go nowhere: syslog unreachable, and no log_file (or one that cannot be opened)."""
    prefix = f"{run_id}: " if run_id else ""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        if not isinstance(handler, _Collector):
            handler.close()
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    logging.raiseExceptions = False     # a failing handler never writes a traceback to stderr
    syslog_handler = SyslogHandler(facility)
    syslog_handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.addHandler(syslog_handler)
    log.addHandler(_Collector(errors))
    log.addHandler(_Early())
    return (bool(log_file) and add_log_file(log_file, run_id)) or syslog_reachable(probe=False)


class _Early(logging.Handler):
    """Lines logged before log_file is open (it opens once privileges are dropped), for it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 100:
            self.records.append(record)


class _FileLog(logging.StreamHandler):
    """The log_file handler: its lines made loggable as syslog's are, its stream closed with it."""

    def format(self, record: logging.LogRecord) -> str:
        return loggable(super().format(record))

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def add_log_file(log_file: str, run_id: str = "") -> bool:
    """Also log to ``log_file`` ("-": stderr); False when there is none or it cannot be
    opened.  A run calls this after it dropped root, so the file is opened as mail_user;
    opened as root it must pass ``open_log_file``."""
    early = [h for h in log.handlers if isinstance(h, _Early)]
    for buffer in early:
        log.removeHandler(buffer)
    if not log_file:
        return False
    from ispmailgate_filters.files import open_log_file

    try:
        handler = logging.StreamHandler(sys.stderr) if log_file == "-" else _FileLog(open_log_file(log_file))
    except OSError as error:
        log.warning("cannot open log_file %s: %s", log_file, error.strerror or error)
        return False
    prefix = f"{run_id}: " if run_id else ""
    handler.setFormatter(logging.Formatter("%(asctime)s ispmailgate[%(process)d]: " + prefix + "%(message)s"))
    handler.setLevel(log.level)
    for record in (record for buffer in early for record in buffer.records):
        handler.handle(record)
    log.addHandler(handler)
    return True


if __name__ == "__main__":
    sys.exit(main())
