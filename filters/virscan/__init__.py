"""virscan: scans every part and every archive member with ClamAV or another scanner.

Every leaf part's decoded body is scanned, and so is every member of the archives inside
it, recursively and within limits (see :mod:`.archives`); an embedded message sent with
a transfer encoding (message/rfc822 in base64) is parsed and its parts scanned the same
way.  The message gets one of three verdicts:

- ``clean``: ``X-ispMailGate-VirScan: scanned`` is added at the top, nothing else changes;
- ``infected``: the scanner found something; ``on_infected`` decides;
- ``unscannable``: something could not be looked into (a limit, an encrypted member, a
  corrupt archive, an object past the scanner's stream limit, a clamd limit reported as
  ``Heuristics.Limits.Exceeded``, an encrypted object reported as ``Heuristics.Encrypted``);
  ``on_unscannable`` decides.  Infected wins.

Actions: ``reject`` (the MTA bounces), ``discard`` (dropped, a copy kept in
``quarantine_dir``), ``tag`` (the header says what was found, the subject gets a prefix,
delivered), ``pass`` (delivered as it is).  An incoming ``X-ispMailGate-VirScan`` field is
always removed, so downstream can trust the one it sees.  The scanner being down, timing
out or answering nonsense defers the message (exit 75) unless ``on_scanner_error = "pass"``,
which delivers it marked ``not scanned``; it is never marked clean.

A message the MIME parser cannot handle is not let through unscanned: its raw bytes go to
the scanner (clamd parses MIME itself) and it is at best ``unscannable``.  A message whose
parts nest past the parser's limits is scanned part by part and as a whole, and is
``unscannable`` as well.

A 7z left to the scanner (``scanner_unpacks``) is first listed and tested with 7-Zip
(``sevenzip``), because clamd answers OK for one it cannot open: encrypted members,
encrypted headers, damage, or declared sizes past the limits make it ``unscannable``.

Entries an archive holds without content (tar links, devices, fifos) and hostile member
names are logged as notes; they are not a verdict.

clamd's own limits are silent by default (``AlertExceedsMax no``): past MaxFileSize,
MaxRecursion or MaxFiles it answers OK.  Run it with ``AlertExceedsMax yes`` so that such
skips come back as unscannable, and with ``AlertEncryptedArchive yes`` for encrypted
archives inside a 7z; ``ispmailgate check`` warns if its configuration does not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archives import Item, Limits, Unpacker
from ..base import (Context, Discard, Filter, OptionError, Reject, TempFail, argv, choice, count,
                   option, parse_size, printable, seconds)
from ..mime import Message, Part, ParseError, decode_words
from .inline import reader_views
from .scanners import INFECTED, UNSCANNABLE, Clamd, Command, Finding, ScannerError
from .sevenzip import SevenZip, sevenzip_problems

HEADER = "X-ispMailGate-VirScan"
ACTIONS = ("reject", "discard", "tag", "pass")
CLAMSCAN_PATTERN = r"^(?P<path>.+?): (?P<name>\S+) FOUND$"


def _exit_codes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              and 0 <= v < 256 for v in value):
        raise ValueError("expected a list of exit codes (0-255), e.g. [1]")
    return tuple(value)


def _regex(value: Any) -> str:
    import re

    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string, got {value!r}")
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"bad regex: {error}") from None
    return value


def _subset(*allowed: str):
    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(v in allowed for v in value):
            raise ValueError(f"expected a list of {', '.join(allowed)}, got {value!r}")
        return tuple(dict.fromkeys(value))
    return convert


@dataclass
class Report:
    """What scanning one message found."""
    findings: list[Finding] = field(default_factory=list)
    scanner_error: str = ""
    notes: list[tuple[str, str]] = field(default_factory=list)     # (label, reason): no verdict

    def of(self, verdict: str) -> list[Finding]:
        return [f for f in self.findings if f.verdict == verdict]

    @property
    def verdict(self) -> str:
        if self.of(INFECTED):
            return INFECTED
        if self.scanner_error:
            return "not scanned"
        return UNSCANNABLE if self.findings else "clean"

    def details(self, verdict: str, most: int = 3) -> str:
        names = list(dict.fromkeys(f.detail for f in self.of(verdict)))
        return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


@dataclass(frozen=True)
class VirScan(Filter):
    """Scans parts and archive members; acts on infected and unscannable mail."""

    name = "virscan"
    description = "scan every part and archive member for viruses (clamd or a command)"
    lazy_modules = ("bz2", "gzip", "json", "lzma", "select", "socket", "subprocess", "tarfile",
                    "unicodedata", "zipfile", "zlib", "ispmailgate_filters.processes")
    unparsed_mail = "process"       # scanned raw, at best unscannable

    scanner: str = option("clamd", "clamd | command", convert=choice("clamd", "command"))
    socket: str = option("/run/clamav/clamd.ctl", "clamd's Unix socket")
    host: str = option("", "clamd over TCP as HOST:PORT, used instead of socket when set")
    command: tuple[str, ...] = option((), "scanner argv; {path}: once per object, {paths}: "
                                      "once per batch (e.g. [\"clamscan\", \"--no-summary\", \"{paths}\"])",
                                      convert=argv)
    clean_exit_codes: tuple[int, ...] = option((0,), "command exit codes meaning clean", convert=_exit_codes)
    infected_exit_codes: tuple[int, ...] = option((1,), "command exit codes meaning infected; others "
                                                  "are scanner errors", convert=_exit_codes)
    virus_pattern: str = option(CLAMSCAN_PATTERN, "regex for virus names in the command's output "
                                "(groups name, path; AntiVir: '!Virus! (?P<path>\\S+) (?P<name>.*)')",
                                convert=_regex)
    timeout: float = option(60.0, "seconds to wait for the scanner per object (per run for a command)",
                            convert=seconds())
    max_stream: int = option(25 * 1024 * 1024, "largest object sent to clamd; set it to clamd's "
                             "StreamMaxLength (bigger objects are unscannable)", convert=parse_size)
    clamd_config: str = option("/etc/clamav/clamd.conf", "clamd's configuration, read by "
                               "'ispmailgate check' only (\"\": do not look)")
    max_depth: int = option(8, "archives (and encoded attached messages) nested deeper are "
                            "unscannable (at most 32)", convert=count(0, 32))
    max_members: int = option(1000, "archives with more members are unscannable", convert=count(1))
    max_member_size: int = option(50 * 1024 * 1024, "a bigger unpacked member is unscannable",
                                  convert=parse_size)
    max_unpacked: int = option(200 * 1024 * 1024, "bytes unpacked per message; past it unpacking "
                               "stops and the message is unscannable", convert=parse_size)
    max_ratio: int = option(100, "unpacked/packed size above which a member (over 1M), or an attachment as a whole, is "
                            "unscannable", convert=count(1, 1_000_000))
    scanner_unpacks: tuple[str, ...] = option(("7z",), "archive kinds left whole to the scanner "
                                              "(7z, rar); other kinds not unpacked here are "
                                              "unscannable", convert=_subset("7z", "rar"))
    sevenzip: str = option("/usr/bin/7z", "7-Zip (p7zip-full), which lists and tests a 7z before "
                           "the scanner gets it; encrypted, damaged or missing: unscannable")
    on_infected: str = option("reject", " | ".join(ACTIONS), convert=choice(*ACTIONS))
    on_unscannable: str = option("tag", " | ".join(ACTIONS), convert=choice(*ACTIONS))
    on_scanner_error: str = option("tempfail", "tempfail (exit 75) | pass (deliver marked "
                                   "'not scanned')", convert=choice("tempfail", "pass"))
    quarantine_dir: str = option("/var/spool/ispmailgate/quarantine", "where discarded mail is "
                                 "kept (directory 0700, files 0600)")
    notify: tuple[str, ...] = option(("postmaster",), "who hears of infected and unscannable "
                                     "mail: postmaster, sender, recipients",
                                     convert=_subset("postmaster", "sender", "recipients"))
    infected_prefix: str = option("[VIRUS]", "subject prefix of tagged infected mail (\"\": none)")
    unscannable_prefix: str = option("[UNSCANNED]", "subject prefix of tagged unscannable mail")

    def __post_init__(self) -> None:
        if self.scanner == "command":
            per_object = any("{path}" in word for word in self.command)
            if per_object == ("{paths}" in self.command):
                raise OptionError("command", "the command scanner needs an argv with either {path} "
                                  "(once per object) or {paths} (once per batch)")
        if "discard" in (self.on_infected, self.on_unscannable) and not self.quarantine_dir:
            raise OptionError("quarantine_dir", "discard keeps a copy: give a quarantine directory")
        if self.host and not _is_hop(self.host):
            raise OptionError("host", f"expected HOST:PORT, got {self.host!r}")

    # -- the filter ------------------------------------------------------------------------

    def process(self, message: Message, ctx: Context) -> None:
        report = self.inspect(message, ctx)
        verdict = report.verdict
        if verdict == "not scanned" and self.on_scanner_error == "tempfail":
            ctx.log.error("%s: %s", self.title, report.scanner_error)
            raise TempFail(f"virus scanner unavailable: {report.scanner_error}", "4.7.0")
        for finding in report.findings:
            ctx.log.warning("%s: %s: %s", finding.verdict, finding.label, finding.detail)
        for label, reason in report.notes:
            ctx.log.info("note, not a verdict: %s: %s", label, reason)
        if verdict == "clean":
            self._mark(message, "scanned")
        elif verdict == "not scanned":
            ctx.log.warning("delivered unscanned: %s", report.scanner_error)
            self._mark(message, "not scanned (scanner unavailable)")
        else:
            self._act(verdict, report, message, ctx)

    def inspect(self, message: Message, ctx: Context) -> Report:
        """Scan the message; scanner faults end up in ``scanner_error``, never as clean."""
        report = Report()
        seven = SevenZip(self.sevenzip, timeout=self.timeout, directory=ctx.workdir)
        unpacker = Unpacker(self.limits(), frozenset(self.scanner_unpacks), {"7z": seven}, ctx.budget)
        try:
            for finding in self.back_end(ctx).scan(self._objects(message, unpacker, report)):
                report.findings.append(finding)
        except ScannerError as error:
            report.scanner_error = str(error)
        report.findings += [Finding(label, UNSCANNABLE, reason) for label, reason in unpacker.problems]
        report.notes = unpacker.notes
        return report

    def limits(self) -> Limits:
        return Limits(depth=self.max_depth, members=self.max_members, member=self.max_member_size,
                      ratio=self.max_ratio, unpacked=self.max_unpacked)

    def back_end(self, ctx: Context | None):
        if self.scanner == "command":
            return Command(self.command, clean_codes=self.clean_exit_codes,
                           infected_codes=self.infected_exit_codes, pattern=self.virus_pattern,
                           timeout=self.timeout, directory=ctx.workdir)
        return Clamd(self.host or self.socket, tcp=bool(self.host), timeout=self.timeout,
                     max_stream=self.max_stream)

    # -- what gets scanned -----------------------------------------------------------------

    def _objects(self, message: Message, unpacker: Unpacker, report: Report) -> Iterator[Item]:
        """Every part as this parser and a mail reader see it, then the whole message as
        the scanner's own MIME decoding sees it: part by part adds to that, never replaces it."""
        if message.unparsed is not None:
            report.findings.append(Finding("the message", UNSCANNABLE, f"cannot be parsed ({message.unparsed})"))
            yield Item("the whole message", bytes(message.to_bytes()))
            return
        yield from self._parts(message, unpacker, report)
        budget = unpacker.budget
        if budget.spent:        # the message's work budget: what was not looked into is unscannable
            if all(reason != budget.spent for _, reason in unpacker.problems):
                report.findings.append(Finding("the message", UNSCANNABLE, budget.spent))
            return
        if any("opaque" in defect for defect in message.defects):
            report.findings.append(Finding("the message", UNSCANNABLE, "MIME nesting beyond the "
                                           "parser's limits"))
        # Whole as well, unless an archive made it unscannable already: the scanner would
        # only meet that archive again (an encrypted one, a 100,000-member one: minutes).
        if message.defects or not unpacker.problems:
            yield Item("the whole message", bytes(message.to_bytes()), extra=not message.defects)

    def _parts(self, message: Message, unpacker: Unpacker, report: Report) -> Iterator[Item]:
        """Every leaf's content, and the leaves of each embedded message sent encoded
        (base64), parsed and labelled under it, its parts and levels counted as the outer
        message's (max_mime_*).  Each level keeps only the leaves still to come, so a
        decoded level is freed once it is done: nesting costs no memory per level."""
        budget = unpacker.budget
        levels = [(_numbered(message.root), "", 0)]
        while levels and not budget.spent:
            pending, prefix, depth = levels[-1]
            if not pending:
                levels.pop()
                continue
            number, part = pending.popleft()
            label = prefix + part_label(number, part)
            data = part.decoded()
            if budget.charge(objects=1, decoded=len(data)):
                return
            if not part.content_type.startswith("message/"):
                yield from unpacker.items(label, data, depth)
                for suffix, view in reader_views(part, data):   # what a reader extracts as well
                    if budget.charge(objects=1, decoded=len(view)):
                        return
                    yield from unpacker.items(label + suffix, view, depth)
            elif depth >= self.max_depth:
                report.findings.append(Finding(label, UNSCANNABLE, "messages nested deeper than max_depth"))
            else:
                try:
                    inner = message.parse_inner(data, part.depth + 1)
                except ParseError as error:
                    report.findings.append(Finding(label, UNSCANNABLE, f"cannot be parsed ({error})"))
                    yield Item(label, data)
                    continue
                levels.append((_numbered(inner), label + " > ", depth + 1))

    # -- actions -----------------------------------------------------------------------------

    def _act(self, verdict: str, report: Report, message: Message, ctx: Context) -> None:
        action = self.on_infected if verdict == INFECTED else self.on_unscannable
        summary = f"{verdict}: {report.details(verdict)}"
        ctx.log.warning("%s, action %s", summary, action)
        kept = self._quarantine(message, report, ctx) if action == "discard" else None
        self._notify(verdict, action, report, ctx, kept)
        if action == "reject":
            raise Reject(f"message {summary}", "5.7.1")
        if action == "discard":
            raise Discard(f"{summary}; {'would be kept' if ctx.dry_run else 'kept'} in {kept}")
        if action == "tag":
            prefix = self.infected_prefix if verdict == INFECTED else self.unscannable_prefix
            self._mark(message, f"{verdict} ({report.details(verdict)})", prefix)
        else:
            self._mark(message, None)

    def _mark(self, message: Message, value: str | None, prefix: str = "") -> None:
        """Replace any incoming verdict field by ours (None: none at all)."""
        headers = message.headers       # a message the parser gave up on has them too
        if HEADER in headers:
            headers.remove(HEADER)
        if value is not None:
            headers.add(HEADER, printable(value, 300))
        if prefix and not headers.get_all("Subject"):
            headers.add("Subject", prefix, top=False)
        elif prefix:        # every Subject field: a reader may show any one of them
            headers.update_each("Subject", lambda raw: _prefixed(prefix, raw))

    def _quarantine(self, message: Message, report: Report, ctx: Context) -> Path:
        """Keep a copy of discarded mail with its envelope and findings (see ..kept);
        failing that, defer.  The copy is what a delivery would carry: without an incoming
        verdict field, so a message released from quarantine shows no verdict a sender forged."""
        from ..kept import MESSAGE, keep, new_id

        if ctx.dry_run:                 # --dry-run decides but keeps nothing
            return Path(self.quarantine_dir) / (new_id(ctx.message_id) + MESSAGE)
        self._mark(message, None)
        findings = tuple({"object": printable(f.label, 400), "verdict": f.verdict, "detail": f.detail}
                         for f in report.findings)
        try:       # in a directory of our own, never through a link (root: see .files)
            return keep(self.quarantine_dir, bytes(message.to_bytes()), run_id=ctx.message_id,
                        sender=ctx.envelope.sender, recipients=ctx.envelope.recipients, kept_by=self.title,
                        action="discarded", verdict=report.verdict, findings=findings)
        except OSError as error:
            raise TempFail(f"cannot quarantine in {self.quarantine_dir}: {error.strerror or error}") from None

    def _notify(self, verdict: str, action: str, report: Report, ctx: Context, kept: Path | None) -> None:
        """The postmaster and the sender hear of all the message's recipients (the sender
        chose them); each recipient gets a notice of its own that names only itself, so
        nobody learns of a Bcc through it."""
        envelope = ctx.envelope
        subject = f"ispmailgate: {verdict} message ({report.details(verdict, 2)})"
        told = tuple(dict.fromkeys(address for who, address in (("postmaster", ctx.postmaster),
                                                                ("sender", envelope.sender))
                                   if who in self.notify and address))
        if told:
            ctx.notify(told, subject, self._notice(verdict, action, report, ctx, kept, envelope.recipients))
        if "recipients" in self.notify:
            for recipient in dict.fromkeys(envelope.recipients):
                if recipient not in told:
                    ctx.notify((recipient,), subject, self._notice(verdict, action, report, ctx, kept,
                                                                   (recipient,)))

    def _notice(self, verdict: str, action: str, report: Report, ctx: Context, kept: Path | None,
                recipients: tuple[str, ...]) -> str:
        lines = [f"ispmailgate's virus scanner ({self.title}) judged a message {verdict}.", "",
                 f"Message:    {ctx.message_id}", f"Sender:     <{printable(ctx.envelope.sender)}>",
                 f"Recipients: {', '.join(printable(r) for r in recipients)}",
                 f"Action:     {ACTION_WORDS[action]}" + (f" ({kept})" if kept else ""), ""]
        lines += [f"- {printable(f.label, 400)}: {f.verdict}: {printable(f.detail, 200)}"
                  for f in report.findings]
        return "\n".join(lines) + "\n"

    # -- ispmailgate check -----------------------------------------------------------------

    def breaks_dkim(self) -> bool:
        return "tag" in (self.on_infected, self.on_unscannable)   # the subject prefix

    def quarantine_dirs(self) -> tuple[str, ...]:
        return (self.quarantine_dir,)

    def trusted_files(self) -> dict[str, str]:
        files = {"command[0]": self.command[0]} if self.scanner == "command" else {}
        if "7z" in self.scanner_unpacks:
            files["sevenzip"] = self.sevenzip
        return files

    def problems(self) -> list[str]:
        found = []
        if self.scanner == "command":
            import shutil
            if not shutil.which(self.command[0]):
                found.append(f"scanner command not found or not executable: {self.command[0]}")
        else:
            found += self.back_end(None).problems(self.clamd_config, self.scanner_unpacks)
        if "7z" in self.scanner_unpacks:
            found += sevenzip_problems(self.sevenzip)
        if "discard" in (self.on_infected, self.on_unscannable):
            found += _directory_problems(Path(self.quarantine_dir))
        return found


ACTION_WORDS = {"reject": "rejected (the MTA bounces it)", "discard": "discarded, kept in quarantine",
                "tag": "delivered with a warning in the subject", "pass": "delivered unchanged"}


def _numbered(root: Part):
    from collections import deque

    return deque(enumerate(root.leaves(), 1))


def part_label(number: int, part: Part) -> str:
    """How a part appears in reports: its number and file name, or its type."""
    name = part.filename
    return f'part {number} "{printable(name, 120)}"' if name else f"part {number} ({part.content_type})"


def _prefixed(prefix: str, raw: str) -> str | None:
    """A Subject value with ``prefix`` in front (decoded, shown as a reader shows it), or
    None if it starts with it already."""
    subject = decode_words(raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    return None if subject.startswith(prefix) else printable(f"{prefix} {subject}".strip(), 900)


def _is_hop(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _directory_problems(directory: Path) -> list[str]:
    if not directory.exists():
        return [] if os.access(directory.parent, os.W_OK) else [f"cannot create quarantine_dir {directory}"]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [f"quarantine_dir {directory} is not writable"]
    if directory.stat().st_mode & 0o077:
        return [f"quarantine_dir {directory} is accessible by others (make it 0700)"]
    return []
