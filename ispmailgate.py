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

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TextIO

import typer

from ispmailgate_filters.base import (ConfigError, Context, Discard, Envelope, Filter, FilterError,
                                      Notice, Reject, TempFail, Verdict, argv as argv_option,
                                      parse_size)
from ispmailgate_filters.mime import Message, ParseError

__version__ = "2.0.0"

# sysexits.h, as MTAs read them.  Postfix's pipe(8) defers only on 75 (and 71, or a
# signal) and bounces on every other non-zero status, so anything that is not the
# message's own fault must end in 75.
EX_OK, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 69, 75, 78

DEFAULT_CONFIG_PATH = "/etc/ispmailgate/ispmailgate.toml"

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


@dataclass
class Streams:
    """Where a run reads the message and writes its output (a served run brings its own)."""
    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO


# =========================================================================================
# argv
# =========================================================================================

gate_cli = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})


@gate_cli.command(epilog="Subcommands: ispmailgate serve | check | explain (see ispmailgate(1)).")
def deliver(
    ctx: typer.Context,
    recipients: Annotated[list[str] | None, typer.Argument(
        metavar="[RCPT]...", show_default=False,
        help="Envelope recipients. None (and no -f): shell test mode, the envelope is read "
             "from the message and the result written to stdout.")] = None,
    sender: Annotated[str | None, typer.Option(
        "-f", "--from", metavar="SENDER",
        help="Envelope sender; '' or '<>' is the null sender of bounces.")] = None,
    config: Annotated[Path | None, typer.Option(
        "-c", "--config", metavar="FILE", envvar="ISPMAILGATE_CONFIG",
        help=f"Rule file (TOML). Default: $ISPMAILGATE_CONFIG, else {DEFAULT_CONFIG_PATH} "
             "if present, else the built-in default (dummy chain).")] = None,
    mail_host: Annotated[str | None, typer.Option(
        "-m", "--mail-host", metavar="HOST[:PORT]",
        help="Deliver by SMTP to this next hop (overrides mail_host and sendmail_command).")] = None,
    to_stdout: Annotated[bool, typer.Option(
        "--stdout", help="Write the result to stdout instead of delivering (procmail :0 fw).")] = False,
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
    request = Request(recipients=list(recipients or ()), sender=sender, config=config,
                      mail_host=mail_host, to_stdout=to_stdout, debug=debug,
                      tmp_dir=tmp_dir, facility=facility)
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
    config: Annotated[Path | None, typer.Option(
        "-c", "--config", metavar="FILE", envvar="ISPMAILGATE_CONFIG", help="Rule file (TOML).")] = None,
) -> int:
    """Serve ispmailgate-client: pre-forked workers behind a Unix socket."""
    import ispmailgate_serve

    return ispmailgate_serve.serve(config, socket=socket, workers=workers, pidfile=pidfile,
                                   foreground=foreground)


@dataclass
class Invocation:
    """What a run gets besides argv: its streams, and the config a server loaded once."""
    streams: Streams
    preloaded: Config | None = None


@dataclass
class Request:
    """The command line of one filtering run, parsed."""
    recipients: list[str]
    sender: str | None = None
    config: Path | None = None
    mail_host: str | None = None
    to_stdout: bool = False
    debug: bool = False
    tmp_dir: str | None = None
    facility: str | None = None

    @property
    def shell_mode(self) -> bool:
        """``ispmailgate < msg.eml``: no envelope given, so nothing is delivered."""
        return self.sender is None and not self.recipients


def run(argv: list[str], streams: Streams, preloaded: Config | None = None) -> int:
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
        streams.stderr.write(f"{status} {_one_line(text)}\n")
        streams.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:900]


def main() -> int:
    """Console-script entry point: ``ispmailgate``."""
    streams = Streams(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    return run(sys.argv[1:], streams)


# =========================================================================================
# config
# =========================================================================================

@dataclass(frozen=True)
class Setting:
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


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _one_of(*allowed: str):
    def convert(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value
    return convert


def _facility(value: Any) -> str:
    import syslog

    if not isinstance(value, str) or not hasattr(syslog, "LOG_" + value.upper()):
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
    "loop_suffix": Setting(".ispmailgate", _string,
                           "Appended to each recipient on SMTP re-injection; \"\" disables."),
    "postmaster": Setting("postmaster", _string, "Receives error reports and double bounces."),
    "facility": Setting("mail", _facility, "Syslog facility."),
    "log_file": Setting("", _string, "Also append log lines to this file (\"-\": stderr)."),
    "unqualified_domain": Setting("", _string, "Domain appended to addresses without @domain."),
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
    "helo_name": Setting("", _string, "Name for EHLO (default: this host's name)."),
    "default_filter": Setting(("dummy",), _strings, "Chain for recipients no rule matches."),
}


@dataclass(frozen=True)
class Rule:
    """One ``[[recipients]]`` entry: the first whose patterns match decides the chain."""
    label: str
    recipient: Any          # compiled pattern or None (matches everybody)
    sender: Any
    chain: tuple[Filter, ...]

    def matches(self, sender: str, recipient: str) -> bool:
        return ((self.recipient is None or self.recipient.search(recipient) is not None)
                and (self.sender is None or self.sender.search(sender) is not None))


@dataclass(frozen=True)
class Config:
    """The rule file, checked as a whole when it is read (never first when mail arrives)."""
    path: str
    values: dict[str, Any]
    rules: tuple[Rule, ...]
    default_chain: tuple[Filter, ...]
    filters: dict[str, Filter]
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


# Sections other parts of the project own: name -> loader(table, where) -> value.
SECTIONS: dict[str, Any] = {}


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


def load_config(path: Path | None) -> Config:
    """Read and check a rule file; ``None`` gives the built-in default."""
    if path is None:
        return build_config({}, "<built-in default>")
    import tomllib

    try:
        with open(path, "rb") as stream:
            table = tomllib.load(stream)
    except OSError as error:
        raise ConfigError("", f"cannot read: {error.strerror or error}", str(path)) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("", f"TOML syntax: {error}", str(path)) from None
    try:
        return build_config(table, str(path))
    except ConfigError as error:
        error.source = str(path)
        raise


def build_config(table: dict[str, Any], source: str) -> Config:
    values, sections = {}, {}
    for key, setting in SETTINGS.items():
        values[key] = setting.default
    for key, value in table.items():
        if key in ("recipients", "filter"):
            continue
        if key in SECTIONS:
            sections[key] = SECTIONS[key](value, key)
        elif key in SETTINGS:
            try:
                values[key] = SETTINGS[key].convert(value)
            except (ValueError, TypeError) as error:
                raise ConfigError(key, str(error)) from None
        else:
            raise ConfigError(key, "unknown key")
    filters = _named_filters(table.get("filter", {}))
    rules = tuple(_rule(entry, i, filters) for i, entry in enumerate(_rule_list(table)))
    default_chain = resolve_chain(values["default_filter"], "default_filter", filters)
    return Config(source, values, rules, default_chain, filters, sections)


def _rule_list(table: dict[str, Any]) -> list[dict[str, Any]]:
    rules = table.get("recipients", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError("recipients", "expected [[recipients]] tables")
    return rules


def _rule(entry: dict[str, Any], index: int, filters: dict[str, Filter]) -> Rule:
    where = f"recipients[{index}]"
    unknown = set(entry) - {"recipient", "sender", "filters"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key (recipient, sender, filters)")
    if "filters" not in entry:
        raise ConfigError(f"{where}.filters", "missing: the chain for matching recipients")
    try:
        chain_names = _strings(entry["filters"])
    except ValueError as error:
        raise ConfigError(f"{where}.filters", str(error)) from None
    return Rule(where, _pattern(entry.get("recipient", ""), f"{where}.recipient"),
                _pattern(entry.get("sender", ""), f"{where}.sender"),
                resolve_chain(chain_names, f"{where}.filters", filters))


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


def _named_filters(table: Any) -> dict[str, Filter]:
    """``[filter.NAME]`` tables: configured instances, each with a ``type``."""
    if not isinstance(table, dict):
        raise ConfigError("filter", "expected [filter.NAME] tables")
    filters = {}
    for name, options in table.items():
        where = f"filter.{name}"
        if not isinstance(options, dict):
            raise ConfigError(where, "expected a table")
        options = dict(options)
        kind = options.pop("type", None)
        if not isinstance(kind, str):
            raise ConfigError(f"{where}.type", "missing: the filter type (dummy, banner, ...)")
        filters[name] = filter_class(kind, f"{where}.type").from_options(options, where, name)
    return filters


def resolve_chain(names: tuple[str, ...], where: str, filters: dict[str, Filter]) -> tuple[Filter, ...]:
    """A chain's names: each a ``[filter.NAME]`` instance or a type with its defaults."""
    return tuple(filters[name] if name in filters
                 else filter_class(name, f"{where}[{i}]").from_options({}, f"{where}[{i}]")
                 for i, name in enumerate(names))


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
    except (ImportError, AttributeError) as error:
        raise ConfigError(where, f"cannot load filter {kind!r} from {target}: {error}") from None
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
    if address and "@" not in address and unqualified_domain:
        address = f"{address}@{unqualified_domain}"
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

@dataclass(frozen=True)
class Route:
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


@dataclass
class Leaf:
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

    def __init__(self, make_context, log) -> None:
        self.make_context = make_context
        self.log = log

    def run(self, message: Message, sender: str, routes: dict[str, Route]) -> list[Leaf]:
        leaves: list[Leaf] = []
        pending = [(message, list(routes), 0)]
        while pending:
            current, recipients, depth = pending.pop()
            finished = [r for r in recipients if len(routes[r].chain) == depth]
            branches: dict[Any, list[str]] = {}
            for recipient in recipients:
                if len(routes[recipient].chain) > depth:
                    step = routes[recipient].chain[depth]
                    branches.setdefault((step, self._variant(step, recipient)), []).append(recipient)
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

    def _variant(self, step: Filter, recipient: str) -> Any:
        try:
            return step.variant(recipient)
        except Exception as error:    # decided in _step: the step will fail for them
            return ("variant-error", repr(error))

    def _step(self, step: Filter, work: Message, envelope: Envelope, original: Message) -> Leaf | None:
        members = list(envelope.recipients)
        started = time.monotonic()
        try:
            step.process(work, self.make_context(envelope, step))
        except Verdict as verdict:
            self.log.info("%s: %s for %s: %s", step.title, verdict.outcome, ",".join(members), verdict)
            return Leaf(members, None, verdict, step.title)
        except ParseError as error:
            self.log.error("%s: cannot parse the message: %s", step.title, error)
            return Leaf(members, Message(original.raw), None, step.title, unparsed=True)
        except Exception as error:
            self.log.error("%s: filter error for %s: %r", step.title, ",".join(members), error,
                           exc_info=True)
            return Leaf(members, None, FilterError(f"filter {step.title} failed: {error!r}"), step.title)
        self.log.debug("%s: %.1f ms for %s%s", step.title, (time.monotonic() - started) * 1000,
                       ",".join(members), " (changed)" if work.changed else "")
        return None


# =========================================================================================
# one run, from argv to exit status
# =========================================================================================

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

    def run(self) -> int:
        config = self._config()
        self.config = config
        configure_logging(self.request.facility or config.facility, self.request.debug,
                          config.log_file, self.errors)
        try:
            return self._run(config)
        except Stop as stop:
            self._log_summary(f"status={_outcome_word(stop.code)} ({stop.status} {stop.text})")
            return self._finish(stop.code, stop.status, stop.text)
        except Exception as error:
            log.error("internal error: %r", error, exc_info=True)
            self._log_summary(f"status=deferred (internal error {error!r})")
            return self._finish(EX_TEMPFAIL, "4.3.0", f"internal error: {error!r}")
        finally:
            self._remove_workdir()

    def _config(self) -> Config:
        path = find_config(self.request.config)
        if self.preloaded is not None and (path is None or str(path) == self.preloaded.path):
            return self.preloaded
        try:
            return load_config(path)
        except ConfigError as error:
            configure_logging(self.request.facility or "mail", self.request.debug, "", self.errors)
            log.error("config error: %s", error)
            raise tempfail("4.3.5", f"config error: {error}") from None

    def _run(self, config: Config) -> int:
        data = read_message(self.streams.stdin, config.max_message_size, config.on_oversize)
        self.size = len(data)
        from_line = split_from_line(data)
        self.message = message = Message(data)
        sender, recipients = self._envelope(message, from_line, config)
        self.sender, self.recipients = sender, recipients
        hop = self._next_hop(config, from_line)
        routes = {recipient: route(config, sender, recipient) for recipient in recipients}
        leaves = ChainRunner(self._context, log).run(message, sender, routes)
        deferred = [leaf for leaf in leaves if self._defers(leaf, hop)]
        if deferred:        # deliver nothing: the retry then does everything once
            leaf = deferred[0]
            self._log_groups(leaves, routes, {})
            text = f"{leaf.step}: {leaf.verdict}" if leaf.verdict else f"{leaf.step}: cannot parse the message"
            raise tempfail(leaf.verdict.status if leaf.verdict else "4.6.0", text)
        results = Delivery(self, hop, config).deliver(leaves, message)
        self._log_groups(leaves, routes, results)
        return self._exit_status(results, hop)

    def _envelope(self, message: Message, from_line: str | None, config: Config) -> tuple[str, list[str]]:
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
        try:
            sender = "" if sender in ("", "<>") else canonical_address(sender, config.unqualified_domain)
            recipients = [canonical_address(r, config.unqualified_domain) for r in recipients]
        except ValueError as error:
            raise tempfail("4.1.7", str(error)) from None
        if "" in recipients:
            raise tempfail("4.1.3", "empty recipient address")
        return sender, list(dict.fromkeys(recipients))

    def _defers(self, leaf: Leaf, hop) -> bool:
        """A leaf that makes the whole run a tempfail, before anything is delivered."""
        if isinstance(leaf.verdict, TempFail):
            return True
        if isinstance(leaf.verdict, FilterError):      # stdout cannot carry a postmaster report
            return self.config.on_filter_error == "tempfail" or isinstance(hop, StdoutHop)
        return leaf.unparsed and self.config.on_parse_error == "tempfail"

    def original_headers(self) -> bytes:
        return self.message.top_headers().to_bytes()

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
        if config.sendmail_command:
            return SendmailHop(config.sendmail_command, config.delivery_timeout)
        return SmtpHop(*parse_hop(config.mail_host), config)

    def _context(self, envelope: Envelope, step: Filter) -> Context:
        return Context(envelope, message_id=self.id, log=log.getChild(step.name),
                       workdir=self.workdir, postmaster=self.config.postmaster, notices=self.notices)

    def workdir(self) -> Path:
        """This message's work directory under tmp_dir, created 0700 on first use."""
        if self.workdir_path is None:
            base = Path(self.request.tmp_dir or self.config.tmp_dir)
            try:
                path = base / f"ispmailgate-{self.id}"
                path.mkdir(mode=0o700)
            except OSError as error:
                raise TempFail(f"cannot create a work directory in {base}: {error.strerror}",
                               "4.3.1" if error.errno == 28 else "4.3.0") from None
            self.workdir_path = path
        return self.workdir_path

    def _remove_workdir(self) -> None:
        if self.workdir_path is not None:
            import shutil
            shutil.rmtree(self.workdir_path, ignore_errors=True)

    def keep_backup(self, data: bytes | bytearray) -> Path | None:
        """The original's tmp_dir/keep/: a copy of a message the parser could not handle."""
        keep = Path(self.request.tmp_dir or self.config.tmp_dir) / "keep"
        try:
            keep.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = keep / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.id}.eml"
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(data)
            return path
        except OSError as error:
            log.error("cannot keep a backup in %s: %s", keep, error)
            return None

    def _exit_status(self, results: dict[str, Result], hop) -> int:
        deferred = [r for r in results.values() if r.state == "deferred"]
        rejected = {rcpt: r for rcpt, r in results.items() if r.state == "rejected"}
        if deferred:
            return self._done(EX_TEMPFAIL, deferred[0].status, deferred[0].text)
        if rejected and len(rejected) == len(results):
            first = next(iter(rejected.values()))
            return self._done(EX_UNAVAILABLE, first.status, first.text)
        if rejected and not isinstance(hop, StdoutHop):
            # Some recipients got the message: a 69 would bounce them too, so the sender
            # gets our own delivery status notification for the others.
            if not Reports(self, hop, self.config).bounce(rejected):
                return self._done(EX_TEMPFAIL, "4.3.0", "could not send the bounce for "
                                  + ",".join(rejected) + "; the MTA will retry all recipients")
        return self._done(EX_OK, "2.0.0", "ok")

    def _done(self, code: int, status: str, text: str) -> int:
        self._log_summary(f"status={_outcome_word(code)}" + ("" if code == EX_OK else f" ({status} {text})"))
        return self._finish(code, status, text)

    def _finish(self, code: int, status: str, text: str) -> int:
        if code != EX_OK:
            _status_line(self.streams, code, status, text)
        if self.errors and (code != EX_OK or self.request.shell_mode):
            for line in self.errors[:20]:
                self.streams.stderr.write(f"ispmailgate: {line}\n")
        if self.request.shell_mode or self.request.debug:
            for line in self.summary:
                self.streams.stderr.write(f"ispmailgate: {line}\n")
        self.streams.stderr.flush()
        return code

    def _log_groups(self, leaves: list[Leaf], routes: dict[str, Route], results: dict[str, Result]) -> None:
        for leaf in leaves:
            first = routes[leaf.recipients[0]]
            outcome = (leaf.verdict.outcome + f" by {leaf.step}: {leaf.verdict}" if leaf.verdict
                       else results.get(leaf.recipients[0], Result("not delivered", "", "")).describe())
            self.summary.append(f"to={','.join('<%s>' % r for r in leaf.recipients)} rule={first.rule} "
                                f"chain={first.chain_label} outcome={outcome}")

    def _log_summary(self, status: str) -> None:
        took = (time.monotonic() - self.started) * 1000
        sender = getattr(self, "sender", None)
        log.info("%s: from=<%s> size=%s %s %s ms=%.0f", self.id, sender if sender is not None else "?",
                 getattr(self, "size", "?"), "; ".join(self.summary) or "-", status, took)


def _outcome_word(code: int) -> str:
    return {EX_OK: "done", EX_TEMPFAIL: "deferred", EX_UNAVAILABLE: "rejected"}.get(code, str(code))


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
# deliver
# =========================================================================================

@dataclass(frozen=True)
class Result:
    """What happened to one recipient in the end."""
    state: str          # sent | discarded | rejected | deferred | reported
    status: str
    text: str

    def describe(self) -> str:
        return f"{self.state} ({self.status} {self.text})" if self.text else self.state


@dataclass(frozen=True)
class Reply:
    """One SMTP reply (or the equivalent from another next hop)."""
    code: int
    text: str
    lines: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def status(self) -> str:
        match = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.text)
        return match.group(1) if match else f"{str(self.code)[0]}.0.0"

    def result(self) -> Result:
        state = {2: "sent", 4: "deferred", 5: "rejected"}.get(self.code // 100, "deferred")
        status = self.status
        text = self.text[len(status):].strip() if self.text.startswith(status) else self.text
        return Result(state, status, text)


class Delivery:
    """Hands each distinct result to the next hop once, for all of its recipients."""

    def __init__(self, gate: Gate, hop, config: Config) -> None:
        self.gate, self.hop, self.config = gate, hop, config

    def deliver(self, leaves: list[Leaf], original: Message) -> dict[str, Result]:
        results: dict[str, Result] = {}
        groups = self._groups(leaves)
        if isinstance(self.hop, StdoutHop):
            self.hop.mbox = sum(1 for _, _, leaf in groups if leaf.verdict is None) > 1
        for recipients, message, leaf in groups:
            if leaf.verdict is not None:
                results.update(self._verdict(leaf, original))
                continue
            if leaf.unparsed:
                self._unparsed(leaf, original)
            replies = self.hop.deliver(self.gate.sender, recipients, message.to_bytes())
            results.update({r: reply.result() for r, reply in replies.items()})
        if isinstance(self.hop, StdoutHop):
            for notice in self.gate.notices:
                log.warning("not sent in stdout mode: %r to %s", notice.subject, ",".join(notice.recipients))
        elif self.gate.notices:
            Reports(self.gate, self.hop, self.config).send_notices(original)
        return results

    @staticmethod
    def _groups(leaves: list[Leaf]) -> list[tuple[list[str], Message | None, Leaf]]:
        """Merge leaves whose resulting bytes are identical: one transaction for them all."""
        groups: list[tuple[list[str], Message | None, Leaf]] = []
        merged: dict[Any, list[str]] = {}
        for leaf in leaves:
            if leaf.message is None or leaf.unparsed:
                groups.append((leaf.recipients, leaf.message, leaf))
                continue
            key = leaf.message.to_bytes() if leaf.message.changed else "unchanged"
            if key in merged:
                merged[key].extend(leaf.recipients)
            else:
                merged[key] = list(leaf.recipients)
                groups.append((merged[key], leaf.message, leaf))
        return groups

    def _verdict(self, leaf: Leaf, original: Message) -> dict[str, Result]:
        verdict = leaf.verdict
        if isinstance(verdict, Discard):
            return {r: Result("discarded", verdict.status, f"by {leaf.step}: {verdict}") for r in leaf.recipients}
        if isinstance(verdict, Reject):
            return {r: Result("rejected", verdict.status, f"{leaf.step}: {verdict}") for r in leaf.recipients}
        # FilterError with on_filter_error = "report": the postmaster gets the original.
        if isinstance(self.hop, StdoutHop):
            return {r: Result("deferred", "4.3.0", f"{leaf.step}: {verdict}") for r in leaf.recipients}
        sent = Reports(self.gate, self.hop, self.config).filter_error(leaf, original)
        state = ("reported", "2.0.0", f"to the postmaster: {leaf.step}: {verdict}") if sent else \
                ("deferred", "4.3.0", f"{leaf.step}: {verdict}; the report to the postmaster failed")
        return {r: Result(*state) for r in leaf.recipients}

    def _unparsed(self, leaf: Leaf, original: Message) -> None:
        kept = self.gate.keep_backup(original.raw)
        text = (f"ispmailgate could not parse message {self.gate.id} (from <{self.gate.sender}> to "
                f"{', '.join(leaf.recipients)}) in filter {leaf.step}.\nIt was delivered unchanged."
                f"\nA copy is kept in {kept or '(nowhere: keeping failed, see the log)'}.\n")
        self.gate.notices.append(Notice((self.config.postmaster,), "ispmailgate: message delivered "
                                        "unfiltered (parse error)", text))


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


class SmtpHop:
    """The next hop by SMTP: one transaction per distinct result, a reply per recipient.

    A small client of its own rather than smtplib: it keeps the one-shot path free of the
    email and ssl packages, streams DATA without copying the message, and maps every
    reply to its recipients.  The next hop is a trusted MTA on this host or LAN, so it
    speaks neither TLS nor AUTH.
    """

    def __init__(self, host: str, port: int, config: Config) -> None:
        self.host, self.port = host, port
        self.timeout = config.delivery_timeout
        self.suffix = config.loop_suffix
        self.helo = config.helo_name

    def __str__(self) -> str:
        return f"smtp:{self.host}:{self.port}"

    def deliver(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        """A reply per recipient; one whose fate is unknown when the connection fails is 4xx."""
        settled: dict[str, Reply] = {}
        session = None
        try:
            session = SmtpSession(self.host, self.port, self.timeout)
            self._transaction(session, sender, recipients, data, settled)
        except (OSError, SmtpError) as error:
            reason = _socket_reason(error)
            log.error("%s: %s", self, reason)
            status = "4.4.1" if session is None else "4.4.2"
            for recipient in recipients:
                settled.setdefault(recipient, Reply(451, f"{status} {self}: {reason}"))
        finally:
            if session is not None:
                session.close()
        return settled

    def _transaction(self, session: SmtpSession, sender: str, recipients: list[str],
                     data: bytes | bytearray, settled: dict[str, Reply]) -> None:
        """Fills ``settled`` as replies become final: a refused RCPT at once, the rest at the end."""
        greeting = session.reply()
        if greeting.code != 220:      # even a 554 greeting is the next hop's state, not the message's
            settled.update(dict.fromkeys(recipients, Reply(451, f"4.4.2 {self} greeted: {greeting}")))
            return
        extensions = session.hello(self.helo or _hostname())
        params = self._mail_params(extensions, sender, recipients, data)
        reply = session.command(b"MAIL FROM:<" + _wire_address(sender) + b">" + params)
        if reply.code != 250:
            settled.update(dict.fromkeys(recipients, reply))
            return
        accepted = []
        for recipient in recipients:
            reply = session.command(b"RCPT TO:<" + _wire_address(self._suffixed(recipient)) + b">")
            if reply.code // 100 == 2:
                accepted.append(recipient)
            else:
                settled[recipient] = reply
        if not accepted:
            session.command(b"RSET")
            return
        reply = session.command(b"DATA")
        if reply.code == 354:
            session.send_data(data)
            reply = session.reply()
        settled.update(dict.fromkeys(accepted, reply))

    def _suffixed(self, recipient: str) -> str:
        """The loop suffix, as the original appended it (never twice)."""
        if not self.suffix or recipient.endswith(self.suffix):
            return recipient
        return recipient + self.suffix

    def _mail_params(self, extensions: set[str], sender: str, recipients: list[str],
                     data: bytes | bytearray) -> bytes:
        params = b""
        if "SIZE" in extensions:
            params += b" SIZE=%d" % len(data)
        if "8BITMIME" in extensions and not data.isascii():
            params += b" BODY=8BITMIME"
        if "SMTPUTF8" in extensions and not all(a.isascii() for a in [sender, *recipients]):
            params += b" SMTPUTF8"
        return params


class SmtpError(Exception):
    """The next hop broke the protocol or the connection."""


class SmtpSession:
    """One SMTP connection: commands out as bytes, replies in, nothing copied twice."""

    MAX_REPLY_LINES = 100

    def __init__(self, host: str, port: int, timeout: float) -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        # Commands and the final dot are small writes that follow one another: with Nagle's
        # algorithm each waits for the delayed ACK of the last (40 ms a message on Linux).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.input = self.sock.makefile("rb")

    def reply(self) -> Reply:
        lines = []
        while True:
            line = self.input.readline(2048)
            if not line:
                raise SmtpError("connection closed by the next hop")
            if len(line) < 3 or not line[:3].isdigit():
                raise SmtpError(f"not an SMTP reply: {line[:60]!r}")
            lines.append(line[4:].strip().decode("utf-8", "replace"))
            if line[3:4] != b"-" or len(lines) >= self.MAX_REPLY_LINES:
                return Reply(int(line[:3]), " ".join(lines), tuple(lines))

    def command(self, line: bytes) -> Reply:
        if b"\r" in line or b"\n" in line:      # addresses are checked before; never send one
            raise SmtpError("refusing to send a command containing CR or LF")
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def hello(self, name: str) -> set[str]:
        name_bytes = name.encode("ascii", "ignore") or b"localhost"
        reply = self.command(b"EHLO " + name_bytes)
        if reply.code == 250:
            return {line.split()[0].upper() for line in reply.lines[1:] if line.split()}
        reply = self.command(b"HELO " + name_bytes)
        if reply.code != 250:
            raise SmtpError(f"HELO refused: {reply.code} {reply.text}")
        return set()

    def send_data(self, data: bytes | bytearray) -> None:
        """The message with CRLF line ends and dot-stuffing, in chunks, then the final dot."""
        for chunk in wire_chunks(data, b"\r\n"):
            self.sock.sendall(_DOT_STUFF.sub(b"..", chunk))
        self.sock.sendall(b".\r\n")

    def close(self) -> None:
        try:
            self.sock.settimeout(5)
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, SmtpError):
            pass
        finally:
            self.input.close()
            self.sock.close()


_DOT_STUFF = re.compile(rb"^\.", re.M)
_BARE_LF = re.compile(rb"(?<!\r)\n")


def wire_chunks(data: bytes | bytearray, eol: bytes, size: int = 1 << 20):
    """``data`` in chunks of whole lines with every line ending as ``eol``; ends with one."""
    position, total = 0, len(data)
    while position < total:
        end = min(position + size, total)
        if end < total:
            newline = data.find(b"\n", end)
            end = total if newline < 0 else newline + 1
        chunk = bytes(data[position:end])
        yield _BARE_LF.sub(b"\r\n", chunk) if eol == b"\r\n" else chunk.replace(b"\r\n", b"\n")
        position = end
    if not data.endswith(b"\n"):
        yield eol


def _wire_address(address: str) -> bytes:
    return address.encode("utf-8")


def _socket_reason(error: BaseException) -> str:
    import socket

    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError):
        return error.strerror or repr(error)
    return str(error)


def _hostname() -> str:
    import socket
    return socket.gethostname() or "localhost"


class SendmailHop:
    """A sendmail-compatible command, run from an argv list (never a shell)."""

    # sysexits a sendmail uses for a message or address it will never accept
    PERMANENT = {65: "5.6.0", 67: "5.1.1", 68: "5.1.2", 69: "5.0.0"}

    def __init__(self, command: tuple[str, ...], timeout: float) -> None:
        self.command, self.timeout = command, timeout

    def __str__(self) -> str:
        return f"sendmail:{self.command[0]}"

    def deliver(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        import subprocess

        argv = [*self.command, "-f", sender, "--", *recipients]
        native = data if b"\r\n" not in data else b"".join(wire_chunks(data, b"\n"))
        try:
            process = subprocess.run(argv, input=native, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            return self._all(recipients, 451, f"4.4.7 {self} timed out after {self.timeout:.0f} s")
        except OSError as error:
            return self._all(recipients, 451, f"4.3.0 cannot run {self.command[0]}: {error.strerror}")
        if process.returncode == 0:
            return self._all(recipients, 250, "2.0.0 accepted by " + str(self))
        complaint = _one_line(process.stderr.decode("utf-8", "replace"))[:300]
        if process.returncode in self.PERMANENT:
            return self._all(recipients, 550, f"{self.PERMANENT[process.returncode]} {self} "
                             f"refused (exit {process.returncode}): {complaint}")
        return self._all(recipients, 451, f"4.3.0 {self} failed (exit {process.returncode}): {complaint}")

    @staticmethod
    def _all(recipients: list[str], code: int, text: str) -> dict[str, Reply]:
        reply = Reply(code, text)
        return {r: reply for r in recipients}


class StdoutHop:
    """Writes the result to stdout: for procmail ``:0 fw`` and for testing in a shell.

    The mbox From_ line goes back in front (procmail expects its filter to keep it).  If
    recipients got different results, each is written as an mboxrd message.
    """

    def __init__(self, stream: BinaryIO, from_line: str | None, *, mbox: bool = False) -> None:
        # mbox is set by Delivery once it knows how many distinct results there are
        self.stream, self.from_line, self.mbox = stream, from_line, mbox

    def __str__(self) -> str:
        return "stdout"

    def deliver(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        try:
            if self.mbox:
                stamp = time.strftime("%a %b %d %H:%M:%S %Y")
                self.stream.write(f"From {sender or 'MAILER-DAEMON'} {stamp}\n".encode())
                self.stream.write(re.sub(rb"(?m)^(>*From )", rb">\1", bytes(data)))
                self.stream.write(b"\n" if data.endswith(b"\n") else b"\n\n")
            else:
                if self.from_line is not None:
                    self.stream.write(self.from_line.encode("utf-8", "surrogateescape"))
                self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError) as error:
            return {r: Reply(451, f"4.3.0 cannot write to stdout: {error}") for r in recipients}
        return {r: Reply(250, "2.0.0 written to stdout") for r in recipients}


# =========================================================================================
# reports: postmaster, notices, bounces
# =========================================================================================

class Reports:
    """Messages the gate writes itself, sent with the null sender through the same next hop."""

    def __init__(self, gate: Gate, hop, config: Config) -> None:
        self.gate, self.hop, self.config = gate, hop, config

    def filter_error(self, leaf: Leaf, original: Message) -> bool:
        text = (f"A filter failed on message {self.gate.id}.\n\n"
                f"Sender:     <{self.gate.sender}>\nRecipients: {', '.join(leaf.recipients)}\n"
                f"Filter:     {leaf.step}\nError:      {leaf.verdict}\n\n"
                "The message was not delivered to these recipients; the original is attached.\n"
                "Forward it to them once the problem is understood.\n")
        return self._send((self.config.postmaster,), f"ispmailgate: filter {leaf.step} failed",
                          text, original.raw)

    def send_notices(self, original: Message) -> None:
        for notice in self.gate.notices:
            recipients = tuple(r for r in notice.recipients if r)
            if recipients:
                self._send(recipients, notice.subject, notice.text,
                           original.raw if notice.attach_original else None)

    def bounce(self, rejected: dict[str, Result]) -> bool:
        """A delivery status notification (RFC 3464) to the sender for rejected recipients."""
        to = self.gate.sender or self.config.postmaster     # never bounce a bounce to <>
        lines = [f"Your message could not be delivered to {len(rejected)} recipient(s):", ""]
        lines += [f"<{rcpt}>: {result.status} {result.text}" for rcpt, result in rejected.items()]
        status = [f"Reporting-MTA: dns; {_hostname()}", ""]
        for rcpt, result in rejected.items():
            status += [f"Final-Recipient: rfc822; {rcpt}", "Action: failed",
                       f"Status: {result.status}", f"Diagnostic-Code: smtp; {_one_line(result.text)}", ""]
        report = _multipart_report("\n".join(lines) + "\n", "\n".join(status),
                                   self.gate.original_headers())
        return self._send((to,), "Undelivered Mail Returned to Sender", None, None, body=report)

    def _send(self, recipients: tuple[str, ...], subject: str, text: str | None,
              attachment: bytes | bytearray | None, body: tuple[str, bytes] | None = None) -> bool:
        data = _report_message(self.config.postmaster, recipients, subject, text, attachment, body)
        replies = self.hop.deliver("", list(recipients), data)
        bad = {r: reply for r, reply in replies.items() if reply.code // 100 != 2}
        for rcpt, reply in bad.items():
            log.error("%s: report %r to %s failed: %s %s", self.gate.id, subject, rcpt, reply.code, reply.text)
        return not bad


def _report_message(postmaster: str, recipients: tuple[str, ...], subject: str, text: str | None,
                    attachment: bytes | bytearray | None, body: tuple[str, bytes] | None) -> bytes:
    """A report assembled as bytes, so an attached original stays exactly as it came."""
    from email.utils import formatdate, make_msgid

    from ispmailgate_filters.mime import fold_field, new_boundary

    head = b"".join(fold_field(name, value) for name, value in (
        ("From", f"Mail Delivery System <{postmaster}>"), ("To", ", ".join(recipients)),
        ("Subject", subject), ("Date", formatdate(localtime=True)),
        ("Message-ID", make_msgid("ispmailgate")), ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0")))
    if body is not None:
        content_type, payload = body
        return head + fold_field("Content-Type", content_type) + b"\n" + payload
    text_part = (b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
                 + text.encode("utf-8"))
    if attachment is None:
        return head + text_part
    boundary = new_boundary().encode()
    return (head + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\n\n'
            + b"--" + boundary + b"\n" + text_part + b"\n--" + boundary + b"\n"
            + b"Content-Type: message/rfc822\nContent-Disposition: attachment\n\n"
            + bytes(attachment) + (b"" if attachment.endswith(b"\n") else b"\n")
            + b"--" + boundary + b"--\n")


def _multipart_report(text: str, status: str, headers: bytes) -> tuple[str, bytes]:
    from ispmailgate_filters.mime import new_boundary

    boundary = new_boundary()
    mark = f"--{boundary}\n".encode()
    payload = (mark + b"Content-Type: text/plain; charset=utf-8\n\n" + text.encode("utf-8") + b"\n"
               + mark + b"Content-Type: message/delivery-status\n\n" + status.encode("utf-8") + b"\n"
               + mark + b"Content-Type: text/rfc822-headers\n\n" + headers
               + f"\n--{boundary}--\n".encode())
    return f'multipart/report; report-type=delivery-status; boundary="{boundary}"', payload


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
                self.syslog.syslog(priority, line)
        except Exception:       # logging must never be what loses a message
            self.handleError(record)


class _Collector(logging.Handler):
    """Error lines kept for stderr, written after the status line the MTA reads first."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(_one_line(record.getMessage()))


def configure_logging(facility: str, debug: bool, log_file: str, errors: list[str]) -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        if not isinstance(handler, _Collector):
            handler.close()
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    log.addHandler(SyslogHandler(facility))
    log.addHandler(_Collector(errors))
    if log_file:
        try:
            handler = (logging.StreamHandler(sys.stderr) if log_file == "-"
                       else logging.FileHandler(log_file, encoding="utf-8"))
        except OSError as error:
            log.warning("cannot open log_file %s: %s", log_file, error)
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s ispmailgate[%(process)d]: %(message)s"))
            log.addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
