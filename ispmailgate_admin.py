"""The administrator's commands: ``check``, ``explain`` and the report of ``--dry-run``.

None of them delivers anything.  ``check`` reads the rule file the way a run does, but
collects every problem instead of stopping at the first, then (unless ``--config-only``)
asks each filter about its environment (``Filter.problems()``) and looks at what the core
itself needs: the work directory, somewhere to log, the next hop; given ``--client-user``,
whether that user can reach the socket of ``ispmailgate serve``.  ``explain`` routes recipients without a message;
``dry_run_report`` describes a run whose chains have run but whose delivery did not.

Imported only by those commands, so the delivery path never pays for it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ispmailgate import (BUILT_IN_CONFIG, EX_CONFIG, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE,
                         ChainRunner, Config, Gate, Leaf, Route, StepTrace, Streams,
                         envelope_addresses, find_config, load_config, route, syslog_reachable)
from ispmailgate_delivery import (Delivery, SmtpHop, SmtpSession, _socket_reason, configured_hop,
                                  parse_hop)
from ispmailgate_filters.base import ConfigError, Filter, Reject
from ispmailgate_filters import mime
from ispmailgate_filters.mime import Message

NEXT_HOP_PROBE_TIMEOUT = 10.0


def printable(text: str) -> str:
    """No control characters from a message or a rule file reach the administrator's terminal."""
    return mime.printable(text, limit=len(text) + 1)


class Output:
    """Lines of text for an administrator, on the run's stdout."""

    def __init__(self, streams: Streams) -> None:
        self.stream = streams.stdout

    def line(self, text: str = "") -> None:
        self.stream.write(printable(text).encode("utf-8", "replace") + b"\n")

    def close(self) -> None:
        self.stream.flush()


# =========================================================================================
# check
# =========================================================================================

def check(requested: Path | None, streams: Streams, *, config_only: bool = False,
          client_user: str | None = None) -> int:
    """Every problem of the rule file (and, unless ``config_only``, of what it needs from
    this host), one line each, then the warnings, each said once: exit 0 or 78."""
    out = Output(streams)
    path = find_config(requested)
    if path is None:
        out.line("no rule file given and none installed: checking the built-in default")
    problems: list[ConfigError] = []
    config = load_config(path, problems)
    if config is not None:
        problems += _located(config, _shadowed_rules(config))
        if not config_only:
            problems += environment_problems(config)
        if client_user is not None:
            problems += _located(config, socket_problems(config, client_user))
    warnings = dkim_warnings(config) if config is not None else []
    for line in [*map(str, problems), *(f"{config.path}: {warning}" for warning in warnings)]:
        out.line(line)
    out.line(_summary(path, config, problems, warnings, config_only))
    out.close()
    return EX_CONFIG if problems else EX_OK


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
        return [ConfigError(key, f"cannot connect to {host}:{port}: {_socket_reason(error)} "
                                 "(every message would wait in the MTA's queue)")]
    try:
        greeting = session.reply()
    except Exception as error:
        return [ConfigError(key, f"{host}:{port} does not greet: {_socket_reason(error)}")]
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

    from ispmailgate_serve import settings_of

    settings = settings_of(config)
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


# =========================================================================================
# explain
# =========================================================================================

def explain(requested: Path | None, sender: str | None, recipients: list[str], streams: Streams) -> int:
    """Per recipient the rule and chain; the filter steps they share; the delivery groups."""
    out = Output(streams)
    path = find_config(requested)
    try:
        config = load_config(path)
    except ConfigError as error:
        out.line(str(error))
        out.line("(ispmailgate check lists every problem)")
        out.close()
        return EX_CONFIG
    sender, recipients, refused = envelope_addresses(config, sender or "", recipients)
    routes = {recipient: route(config, sender, recipient) for recipient in recipients}
    out.line(f"rule file: {config.path}")
    out.line(f"sender: <{sender}>")
    rules = {rule.label: rule for rule in config.rules}
    for recipient, chosen in routes.items():
        out.line(f"<{recipient}>: {_describe_rule(rules.get(chosen.rule))} -> {chosen.chain_label}")
    for recipient, result in refused.items():       # as a run refuses them: each for good
        out.line(f"<{recipient}>: refused, {result.status} {result.text}")
    out.line()
    out.line("filter steps, each run once for the recipients listed:")
    groups = _plan(routes, list(routes), 0, "  ", out)
    out.line()
    out.line("delivery groups (a verdict can end a chain early; identical results are merged):")
    for number, members in enumerate(groups, 1):
        chain = routes[members[0]].chain
        out.line(f"  {number}. {_addresses(members)}: {routes[members[0]].chain_label}; "
                 f"{_sealing(config, chain)}")
    out.line(f"next hop: {_describe_hop(configured_hop(config))}")
    out.close()
    return EX_OK


def _describe_rule(rule) -> str:
    if rule is None:
        return "default_filter (no rule matched)"
    return f"{rule.label} ({', '.join(map(_describe_condition, rule.conditions)) or 'matches everybody'})"


def _describe_condition(condition) -> str:
    """As the rule file says it: recipient '...', sender_not '...', sender_is external."""
    if condition.pattern is None:
        return f"{condition.subject}_is {'external' if condition.negate else 'internal'}"
    return f"{condition.subject}{'_not' if condition.negate else ''} '{condition.pattern.pattern}'"


def _plan(routes: dict[str, Route], recipients: list[str], depth: int, indent: str,
          out: Output) -> list[list[str]]:
    """Walks the chains as the runner does, printing each step run; returns the groups."""
    finished, branches = ChainRunner.split(routes, recipients, depth)
    groups = [finished] if finished else []
    if depth == 0 and not branches:
        out.line(f"{indent}(none: an empty chain delivers the message as it came)")
    for (step, variant), members in branches.items():
        notes = (["differs per recipient"] if variant is not None else []) + _explained(step, variant)
        note = f"  ({'; '.join(notes)})" if notes else ""
        out.line(f"{indent}{step.title}: {_addresses(members)}{note}")
        groups += _plan(routes, members, depth + 1, indent + "  ", out)
    return groups


def _explained(step: Filter, variant) -> list[str]:
    """What the step says it does for these recipients (the certificate they are encrypted to)."""
    try:
        detail = step.explain(variant)
    except Exception as error:      # explain must show the rest whatever one filter does
        detail = f"cannot tell: {error!r}"
    return [detail] if detail else []


def _sealing(config: Config, chain) -> str:
    if "arc" not in config.sections:
        return "not sealed (no [arc])"
    if any(step.changes_messages for step in chain):
        return "ARC-sealed if a filter changes the message"
    return "never sealed (nothing in the chain changes messages)"


def _describe_hop(hop) -> str:
    if isinstance(hop, SmtpHop) and hop.suffix:
        return f"{hop} (each recipient gets the loop suffix {hop.suffix})"
    return str(hop)


def _addresses(recipients) -> str:
    return ", ".join(f"<{r}>" for r in recipients)


# =========================================================================================
# --dry-run
# =========================================================================================

def dry_run_report(gate: Gate, leaves: list[Leaf], routes: dict[str, Route], hop,
                   trace: list[StepTrace]) -> str:
    """What a run would have delivered to whom, after its chains ran; nothing was sent."""
    lines = [f"dry run {gate.id}: nothing was delivered",
             f"message: {gate.size} bytes from <{gate.sender}>, next hop {_describe_hop(hop)}",
             "filter steps:"]
    lines += [f"  {t.step} for {_addresses(t.recipients)}: {t.outcome} ({t.ms:.1f} ms)" for t in trace]
    if not trace:
        lines.append("  (none)")
    lines.append("delivery:")
    original = Message(gate.message.raw).top_headers().items()
    for recipients, message, leaf in Delivery.groups(leaves):
        chains = sorted({f"rule {routes[r].rule}, chain {routes[r].chain_label}" for r in recipients})
        lines.append(f"  {_addresses(recipients)} ({'; '.join(chains)}):")
        lines.append(f"    {_fate(gate, leaf, message, hop)}")
        if message is not None and message.changed and not leaf.unparsed:
            lines += _header_changes(original, message.top_headers().items())
    lines += [f"notice to {_addresses(n.recipients)}: {n.subject}" for n in gate.notices]
    status = _would_exit(gate, leaves, hop)
    if _hands_over(gate, leaves, hop):
        lines.append(f"a real run would exit {status} if the next hop accepted what it was given")
    else:
        lines.append(f"a real run would exit {status}, handing nothing to the next hop")
    return "".join(printable(line) + "\n" for line in lines)


def _hands_over(gate: Gate, leaves: list[Leaf], hop) -> bool:
    """Would the next hop get anything: a message, a postmaster report, a notice?"""
    if any(gate.defers(leaf, hop) for leaf in leaves):
        return False        # a deferral delivers nothing, not even the others
    return bool(gate.notices) or any(leaf.verdict is None or leaf.verdict.outcome == "error"
                                     for leaf in leaves)


def _fate(gate: Gate, leaf: Leaf, message: Message | None, hop) -> str:
    verdict, step = leaf.verdict, leaf.step
    if gate.defers(leaf, hop):
        reason = f"{verdict.status} {verdict}" if verdict else "cannot parse the message"
        return f"deferred by {step}: {reason}; the run would deliver nothing and exit 75"
    if verdict is not None and verdict.outcome == "error":
        return (f"error in {step}: {verdict}; the postmaster <{gate.config.postmaster}> would get "
                "a report with the original attached, these recipients nothing")
    if verdict is not None:
        return f"{verdict.outcome} by {step}: {verdict.status} {verdict}"
    if leaf.unparsed:
        return (f"would be delivered unchanged ({len(message.raw)} bytes): the parser gave up in "
                f"{step}; a copy would be kept in tmp_dir/keep/ and the postmaster told")
    data = message.to_bytes()
    state = "changed" if message.changed else "unchanged, byte for byte"
    return f"would be delivered: {len(data)} bytes, {state}"


def _header_changes(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> list[str]:
    """Top-level header fields a chain added or removed (values shortened)."""
    lines = [f"    - {name}: {value}" for name, value in before if (name, value) not in after]
    lines += [f"    + {name}: {value}" for name, value in after if (name, value) not in before]
    return [line if len(line) <= 100 else line[:97] + "..." for line in lines[:20]]


def _would_exit(gate: Gate, leaves: list[Leaf], hop) -> int:
    if any(gate.defers(leaf, hop) for leaf in leaves):
        return EX_TEMPFAIL
    if all(isinstance(leaf.verdict, Reject) for leaf in leaves):
        return EX_UNAVAILABLE
    return EX_OK

