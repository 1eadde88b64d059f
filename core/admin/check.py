"""``ispmailgate check``: every problem of the rule file, then of what it needs from this host."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from ispmailgate_filters.base import ConfigError, Filter

from ..addresses import parse_hop
from ..delivery.smtp import SmtpSession, socket_reason
from ..logs import syslog_reachable
from ..rules import BUILT_IN_CONFIG, Config, find_config, load_config
from ..status import EX_CONFIG, EX_OK
from .output import Output


NEXT_HOP_PROBE_TIMEOUT = 10.0


def check(requested: Path | None, stdout: BinaryIO, *, config_only: bool = False,
          client_user: str | None = None) -> int:
    """Every problem of the rule file (and, unless ``config_only``, of what it needs from
    this host), one line each, then the warnings, each said once: exit 0 or 78."""
    out = Output(stdout)
    path = find_config(requested)
    if path is None:
        out.line("no rule file given and none installed: checking the built-in default")
    problems: list[ConfigError] = []
    config = load_config(path, problems)
    warnings = []
    if config is not None:
        problems += _located(config, _shadowed_rules(config))
        if not config_only:
            problems += environment_problems(config)
        if client_user is not None:
            problems += _located(config, socket_problems(config, client_user))
        # the rule file's own (said by every run in its log), then what check alone sees
        warnings = list(config.warnings)
        if "dkim" in config.sections:
            from .dkim_keys import signing_findings     # dkimpy (and DNS) only for [[dkim]]

            found, signing = signing_findings(config.sections["dkim"], probe_dns=not config_only)
            problems += _located(config, found)
            warnings += signing
        warnings += dkim_warnings(config)
    for line in [*map(str, problems), *(_with_source(config.path, warning) for warning in warnings)]:
        out.line(line)
    out.line(_summary(path, config, problems, warnings, config_only))
    out.close()
    return EX_CONFIG if problems else EX_OK


def _with_source(path: str, warning: str) -> str:
    """``path: warning: ...`` (a rule file's own warning starts with its path already)."""
    text = warning[len(path) + 1:] if warning.startswith(f"{path} ") else warning
    return f"{path}: {text}" if text.startswith("warning: ") else f"{path}: warning: {text}"


def _summary(path: Path | None, config: Config | None, problems: list, warnings: list[str],
             config_only: bool) -> str:
    source = str(path) if path is not None else BUILT_IN_CONFIG
    if problems:
        verdict = _count(len(problems), "problem")
    else:
        scope = "; the rule file alone: nothing on this machine was checked" if config_only else ""
        verdict = f"OK ({len(config.rules)} rules, {len(config.filters)} named filters{scope})"
    return f"{source}: {verdict}" + (f", {_count(len(warnings), 'warning')}" if warnings else "")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"


def _located(config: Config, problems: list[ConfigError]) -> list[ConfigError]:
    for problem in problems:
        problem.source = config.path
    return problems


def environment_problems(config: Config) -> list[ConfigError]:
    """What a valid rule file still needs from this host, each under its key path."""
    problems = _directory_problems("tmp_dir", Path(config.tmp_dir))
    problems += _log_problems(config)
    if config.sendmail_command:
        problems += _command_problems("sendmail_command", config.sendmail_command[0])
    else:
        problems += _next_hop_problems("mail_host", config.mail_host, config.delivery_timeout)
    problems += _filter_problems(config)
    return _located(config, problems)


def dkim_warnings(config: Config) -> list[str]:
    """One warning for all the steps that can change DKIM-signed mail with nothing to vouch
    for it; the banner's way out only where a step has it."""
    if "arc" in config.sections:
        return []
    steps = [step for step in _distinct_steps(config) if step.breaks_dkim()]
    if not steps:
        return []
    skippable = [step.title for step in steps if "on_dkim_signed" in type(step).options()]
    remedy = "add [arc] to seal what they change"
    if skippable:
        remedy += f', or set on_dkim_signed = "skip" in {", ".join(skippable)}'
    return [f"warning: no [arc] is configured, and {_count(len(steps), 'filter step')} can change "
            f"DKIM-signed mail ({', '.join(step.title for step in steps)}): receivers that enforce "
            f"DMARC may refuse what they changed; {remedy}"]


def _directory_problems(key: str, path: Path) -> list[ConfigError]:
    if not path.is_dir():
        return [ConfigError(key, f"{path}: no such directory")]
    if not os.access(path, os.W_OK | os.X_OK):
        return [ConfigError(key, f"{path}: not writable for uid {os.getuid()}")]
    return []


def _log_problems(config: Config) -> list[ConfigError]:
    """Somewhere the log lines go: syslog needs a daemon on /dev/log (containers and minimal
    hosts have none, and syslog(3) then drops every line without a word)."""
    if config.log_file == "-":
        return []
    if config.log_file:
        problems = _log_file_problems("log_file", Path(config.log_file))
        if problems and not syslog_reachable():
            problems[0].message += "; syslog is not reachable either (nothing listens on /dev/log)"
        return problems
    if syslog_reachable():
        return []
    return [ConfigError("log_file", "unset, and syslog is not reachable (nothing listens on /dev/log): "
                                    "every log line would be lost; run a syslog daemon or set log_file "
                                    "to a file the mail user can write")]


def _log_file_problems(key: str, path: Path) -> list[ConfigError]:
    if path.exists():
        writable = path.is_file() and os.access(path, os.W_OK)
        return [] if writable else [ConfigError(key, f"{path}: not a writable file for uid {os.getuid()}")]
    if not path.parent.is_dir():
        return [ConfigError(key, f"{path}: cannot be created: {path.parent}: no such directory")]
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return [ConfigError(key, f"{path}: cannot be created: {path.parent} is not writable "
                                 f"for uid {os.getuid()}")]
    return []


def _command_problems(key: str, program: str) -> list[ConfigError]:
    found = program if "/" in program else shutil.which(program)
    if found is None or not os.path.isfile(found):
        return [ConfigError(key, f"{program}: no such program")]
    if not os.access(found, os.X_OK):
        return [ConfigError(key, f"{program}: not executable for uid {os.getuid()}")]
    return []


def _next_hop_problems(key: str, hop: str, timeout: float) -> list[ConfigError]:
    """Connects and reads the greeting: a next hop that is down defers every message."""
    host, port = parse_hop(hop)
    try:
        session = SmtpSession(host, port, min(timeout, NEXT_HOP_PROBE_TIMEOUT))
    except OSError as error:
        return [ConfigError(key, f"cannot connect to {host}:{port}: {socket_reason(error)} "
                                 "(every message would wait in the MTA's queue)")]
    try:
        greeting = session.reply()
    except Exception as error:
        return [ConfigError(key, f"{host}:{port} does not greet: {socket_reason(error)}")]
    finally:
        session.close()
    if greeting.code != 220:
        return [ConfigError(key, f"{host}:{port} greets with {greeting}")]
    return []


def _shadowed_rules(config: Config) -> list[ConfigError]:
    """Rules after one that matches everybody can never match."""
    catch_all = next((rule for rule in config.rules if not rule.conditions), None)
    if catch_all is None:
        return []
    later = config.rules[config.rules.index(catch_all) + 1:]
    return [ConfigError(rule.label, f"never used: {catch_all.label} before it matches every message")
            for rule in later]


def _filter_problems(config: Config) -> list[ConfigError]:
    problems = []
    for step, where in _distinct_steps(config).items():
        try:
            found = step.problems()
        except Exception as error:      # a filter's own check must not end the others'
            found = [f"cannot check: {error!r}"]
        try:
            step.preload()              # what a run imports later (serve: before its workers)
        except (Exception, SystemExit) as error:
            found.append(f"cannot import what it needs: {type(error).__name__}: {error}")
        problems += [ConfigError(where, problem) for problem in found]
    return problems


def socket_problems(config: Config, user: str) -> list[ConfigError]:
    """Can ``user``, as whom the MTA runs ispmailgate-client, connect to the server's socket?

    Asked of the kernel: a child process takes on the user's ids and groups and tries."""
    import pwd

    from ..serve.section import settings_of

    settings = settings_of(config.sections)
    path, key = settings.socket, "serve.socket"
    falls_back = ("ispmailgate-client would fall back to one-shot runs" if settings.fallback == "oneshot"
                  else "ispmailgate-client would defer every message (fallback = tempfail)")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return [ConfigError(key, f"--client-user: no such user: {user!r}")]
    if not os.path.exists(path):
        return [ConfigError(key, f"{path}: no such socket (is ispmailgate serve running?): {falls_back}")]
    denied = _denied_to(entry, path)
    if denied is None:
        return []
    return [ConfigError(key, f"{path}: {user} cannot connect ({denied}): {falls_back}; make the "
                             f"socket's group one of {user}'s groups (serve.socket_group, or "
                             "SocketGroup= in the systemd socket unit)")]


def _denied_to(entry, path: str) -> str | None:
    """None if the user ``entry`` may connect to ``path``, else what stands in the way."""
    import grp
    import pwd
    import stat

    if os.geteuid() != 0 and os.geteuid() != entry.pw_uid:
        return f"only root can check this for another user; run check as root or as {entry.pw_name}"
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)     # before the fork: no NSS in the child
    child = os.fork()
    if child == 0:          # become the user, ask the kernel, answer with the exit status
        allowed = False
        try:
            if os.geteuid() == 0:
                os.setgroups(groups)
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)
            allowed = os.access(path, os.W_OK)
        finally:
            os._exit(0 if allowed else 1)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    info = os.stat(path)
    owner = _name(lambda: pwd.getpwuid(info.st_uid).pw_name, info.st_uid)
    group = _name(lambda: grp.getgrgid(info.st_gid).gr_name, info.st_gid)
    kind = "socket" if stat.S_ISSOCK(info.st_mode) else "not a socket:"
    names = sorted({_name(lambda g=g: grp.getgrgid(g).gr_name, g) for g in groups})
    return (f"{kind} {owner}:{group} {stat.S_IMODE(info.st_mode):04o}, or a folder above it "
            f"closed; {entry.pw_name}'s groups: {', '.join(names)}")


def _name(lookup, number: int) -> str:
    try:
        return lookup()
    except KeyError:
        return str(number)


def _distinct_steps(config: Config) -> dict[Filter, str]:
    """Every distinct filter step, with the key path where it first appears."""
    steps: dict[Filter, str] = {}
    for name, step in config.filters.items():
        steps.setdefault(step, f"filter.{name}")
    for rule in config.rules:
        for i, step in enumerate(rule.chain):
            steps.setdefault(step, f"{rule.label}.filters[{i}]")
    for i, step in enumerate(config.default_chain):
        steps.setdefault(step, f"default_filter[{i}]")
    return steps
