"""How every ``ispmailgate quarantine`` command starts and ends: the rule file read (as
root, where it is root's), the log, privileges dropped as in a one-shot run, then each
quarantine the rule file names opened -- or refused, and said so."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

from ispmailgate_filters.base import ConfigError

from ...logs import add_log_file, configure_logging
from ...process import drop_privileges
from ...rules import Config, find_config, load_config
from ...status import EX_CONFIG, EX_OK, EX_UNAVAILABLE, MISCONFIGURED, Stop
from ...text import one_line
from ..output import Output
from .store import Entry, Quarantine, Refused, user


class Refusal(Exception):
    """Ends a command: its exit status and one line for the administrator."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


class Session:
    """One command on the quarantines of one rule file."""

    def __init__(self, config: Config, who: str, stdout: BinaryIO, stderr: TextIO) -> None:
        self.config, self.who = config, who
        self.out, self.stderr = Output(stdout), stderr
        self.quarantines: list[Quarantine] = []
        self.refused: list[str] = []

    def open(self) -> None:
        for quarantine in named_quarantines(self.config, self.refused):
            try:
                if quarantine.open():
                    self.quarantines.append(quarantine)
            except Refused as refused:
                self.refused.append(f"{quarantine.path} ({quarantine.label}): {refused}")
        for line in self.refused:
            self.say(f"refused to read quarantine {line}")

    def close(self) -> None:
        for quarantine in self.quarantines:
            quarantine.close()
        try:
            self.out.close()
        except (BrokenPipeError, ValueError):      # a reader that had enough (list | head)
            pass

    def say(self, text: str) -> None:
        """A line on stderr, apart from the output scripts read on stdout."""
        try:
            self.stderr.write(f"ispmailgate quarantine: {one_line(text)}\n")
            self.stderr.flush()
        except (OSError, ValueError):       # stderr closed: the exit status still says it
            pass

    @property
    def status(self) -> int:
        """0, or 78 when a quarantine had to be refused."""
        return EX_CONFIG if self.refused else EX_OK

    def entries(self) -> list[Entry]:
        """Every entry of every quarantine, oldest first (one that cannot be read is said)."""
        found = [entry for quarantine in self.quarantines for id in quarantine.ids()
                 if (entry := self.entry(quarantine, id)) is not None]
        return sorted(found, key=lambda entry: (entry.record.time, entry.id))

    def entry(self, quarantine: Quarantine, id: str) -> Entry | None:
        """The entry ``id`` of ``quarantine``; one that cannot be read is said, and None."""
        try:
            return quarantine.entry(id)
        except Refused as refused:
            self.refused.append(str(refused))
            self.say(f"skipped {id}: {refused}")
            return None

    def find(self, id: str) -> Entry:
        """The entry ``id`` (validated as the gateway's own name before it gets here)."""
        for quarantine in self.quarantines:
            entry = self.entry(quarantine, id)
            if entry is not None:
                return entry
        if self.refused:
            raise Refusal(EX_CONFIG, f"{id}: not found in the quarantines that could be read")
        where = ", ".join(q.path for q in self.quarantines) or "no quarantine holds anything yet"
        raise Refusal(EX_UNAVAILABLE, f"{id}: no such entry ({where})")


def named_quarantines(config: Config, problems: list[str]) -> list[Quarantine]:
    """Each directory a filter step keeps copies in, once, and the gateway's own keep/; a
    step that cannot say where it keeps them goes into ``problems``."""
    steps = [*config.filters.values(), *config.default_chain, *(s for rule in config.rules for s in rule.chain)]
    found: dict[str, Quarantine] = {}
    for step in dict.fromkeys(steps):
        for directory in _quarantine_dirs(step, problems):
            path = os.path.abspath(directory)
            found.setdefault(path, Quarantine(path, step.title))
    keep = os.path.abspath(os.path.join(config.tmp_dir, "keep"))
    found.setdefault(keep, Quarantine(keep, "keep", delivered=True))
    return list(found.values())


def _quarantine_dirs(step, problems: list[str]) -> tuple[str, ...]:
    try:
        return tuple(step.quarantine_dirs())
    except Exception as error:      # a plug-in's fault must not hide the other quarantines
        problems.append(f"of {step.title}: it cannot say where it keeps copies: {error!r}")
        return ()


def run_command(requested: Path | None, stdout: BinaryIO, stderr: TextIO,
                body: Callable[[Session], int]) -> int:
    """Start a session, run ``body`` in it, end it: ``body``'s exit status, or a refusal's."""
    who = invoker()
    config = _config(requested)
    umask = os.umask(0o077)
    configure_logging(config.facility, False, "", [], os.urandom(5).hex().upper())
    session = Session(config, who, stdout, stderr)
    try:
        drop_privileges(config)
        add_log_file(config.log_file)
        session.open()
        return body(session)
    except Refusal as refusal:
        session.say(refusal.text)
        return refusal.code
    except Refused as refused:      # an entry that changed under the command
        session.say(str(refused))
        return EX_CONFIG
    except BrokenPipeError:         # stdout's reader had enough (list | head): no fault
        return session.status
    finally:
        session.close()
        os.umask(umask)


def _config(requested: Path | None) -> Config:
    try:
        return load_config(find_config(requested))
    except ConfigError as error:
        raise Stop(EX_CONFIG, MISCONFIGURED, f"config error: {error} (ispmailgate check lists every problem)") from None


def invoker() -> str:
    """Who runs the command, for the log: the real user, and sudo's caller as sudo names it."""
    import re

    name = user(os.getuid())
    caller = os.environ.get("SUDO_USER", "") if os.getuid() == 0 else ""
    if re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}", caller):
        name += f" (sudo by {caller})"
    return name
