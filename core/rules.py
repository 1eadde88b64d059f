"""The rule file: read, trusted (or refused), checked as a whole, turned into rules and chains.

A rule file is checked when it is read, never first when mail arrives: a run stops at the
first problem, ``ispmailgate check`` collects them all.  Started as root, a rule file (and
every command and secret file it names) is used only if root alone can change it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from ispmailgate_filters.base import ConfigError, Filter

from .addresses import in_domains
from .settings import SETTINGS, strings

DEFAULT_CONFIG_PATH = "/etc/ispmailgate/ispmailgate.toml"
BUILT_IN_CONFIG = "<built-in default>"


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
    dkim: bool = True                   # false: results for its recipients are not DKIM-signed

    def matches(self, sender: str, recipient: str) -> bool:
        return all(condition.holds(sender, recipient) for condition in self.conditions)


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


# Tables other parts of the project own: name -> loader(table, where) -> value, each
# imported only when a rule file has that table.
def _arc_section(table: Any, where: str) -> Any:
    from .arc import load_section     # dkimpy and friends only when [arc] is used
    return load_section(table, where)


def _serve_section(table: Any, where: str) -> Any:
    from .serve.section import load_section     # only a rule file with [serve] pays for it

    return load_section(table, where)


def _dkim_section(tables: Any, where: str) -> Any:
    from .signing import load_section     # the [[dkim]] tables: keys read, dkimpy not imported

    return load_section(tables, where)


SECTIONS: dict[str, Any] = {"arc": _arc_section, "dkim": _dkim_section, "serve": _serve_section}


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
            checked(mail_identity, config)
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


def mail_identity(config: "Config") -> tuple[int, int] | None:
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
    """Does the table hold a passphrase?  A key that names a file (``passphrase_file``) holds
    a path, and the file is checked where it is read."""
    if isinstance(table, dict):
        return any("passphrase" in str(key).lower() and not str(key).lower().endswith("_file")
                   or _holds_passphrases(value) for key, value in table.items())
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
    "dkim": "false: results for matching recipients are not DKIM-signed (mail that stays inside); "
            "default true.",
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
    signed = entry.get("dkim", True)
    if not isinstance(signed, bool):
        checked(_raise, ConfigError(f"{where}.dkim", f"expected true or false, got {signed!r}"))
    return None if checked.failures > failures else Rule(where, tuple(conditions), chain, signed)


def _chain_names(entry: dict[str, Any], where: str) -> tuple[str, ...]:
    if "filters" not in entry:
        raise ConfigError(f"{where}.filters", "missing: the chain for matching recipients")
    try:
        return strings(entry["filters"])
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
    return {name: checked(_named_filter, name, options, checked, fallback=Filter(label=name))
            for name, options in checked(_filter_tables, table, fallback={}).items()}


def _filter_tables(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError("filter", "expected [filter.NAME] tables")
    return table


def _named_filter(name: str, options: Any, checked: _Checked) -> Filter:
    where = f"filter.{name}"
    if not isinstance(options, dict):
        raise ConfigError(where, "expected a table")
    options = dict(options)
    kind = options.pop("type", None)
    if not isinstance(kind, str):
        raise ConfigError(f"{where}.type", "missing: the filter type (dummy, banner, ...)")
    cls = filter_class(kind, f"{where}.type")
    *earlier, last = _option_problems(cls, options, where) or [None]
    for problem in earlier:         # collected (check), or the first raised (a run)
        checked(_raise, problem)
    if last is not None:
        raise last
    return _built(cls, options, where, name)


def _option_problems(cls: type[Filter], options: dict[str, Any], where: str) -> list[ConfigError]:
    """Every unknown or ill-typed option of a table, each under its key path (building the
    filter stops at the first; ``check`` lists them all)."""
    known, problems = cls.options(), []
    for key, value in options.items():
        if key not in known:
            problems.append(ConfigError(f"{where}.{key}", f"unknown option for filter type {cls.name!r}"
                                                          f" (known: {', '.join(sorted(known)) or 'none'})"))
            continue
        try:
            known[key].metadata["convert"](value)
        except (ValueError, TypeError) as error:
            problems.append(ConfigError(f"{where}.{key}", str(error)))
        except Exception:       # noqa: BLE001 -- a plugin's own converter: from_options reports it
            pass
    return problems


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

    from ispmailgate_filters import ENTRY_POINT_GROUPS

    for group in ENTRY_POINT_GROUPS:
        found = next((ep.value for ep in entry_points(group=group, name=kind)), None)
        if found is not None:
            return found
    return None
