"""One run: one message from stdin to the next hop, and the exit status the MTA reads.

:meth:`Gate.run` reads top to bottom in the order a message travels: rule file, log,
privileges and time limit, then (``_run``) the message, its envelope, the routes, the
chains, delivery, and the exit status.  Whatever happens, it returns a status an MTA
understands, and once a next hop accepted anything it never returns 75.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import BinaryIO, NamedTuple, TextIO

from ispmailgate_filters.base import Budget, ConfigError, Context, Envelope, Filter, Notice, TempFail
from ispmailgate_filters.mime import Message

from .addresses import parse_hop
from .delivery.groups import Delivery
from .delivery.handover import Handover, Job
from .delivery.hops import NextHop, StdoutHop, configured_hop
from .delivery.spool import Spool
from .delivery.smtp import SmtpHop
from .envelope import envelope_addresses, envelope_from_headers, refused_untold, sender_of_from_line
from .logs import UNLOGGED, add_log_file, configure_logging, syslog_reachable
from .outcome import Result, exit_status
from .process import Interrupted, TimeLimitExceeded, drop_privileges, time_limit
from .reading import message_id_of, read_message, split_from_line
from .routing import ChainRunner, Leaf, Route, StepTrace, route
from .rules import Config, find_config, load_config
from .status import (DONE, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, LOCAL_TROUBLE, MISCONFIGURED, NO_SENDER,
                     RECIPIENT_COUNT, TIMED_OUT, UNPARSABLE, Stop, of_error, tempfail)
from .text import one_line

log = logging.getLogger("ispmailgate")


# Records are NamedTuples: a frozen dataclass costs about 1 ms to create at import, and
# the one-shot path pays every millisecond on every message.

class Streams(NamedTuple):
    """Where a run reads the message and writes its output (a served run brings its own)."""
    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO


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
    originating: bool = False       # the MTA vouches that the mail is its own users' ([[dkim]] signs it)
    # The caller takes a status per recipient (LMTP): a recipient that must wait for a retry
    # holds back only itself, and refused ones are the caller's to bounce.
    per_recipient: bool = False

    @property
    def shell_mode(self) -> bool:
        """``ispmailgate < msg.eml``: no envelope given, so nothing is delivered."""
        return self.sender is None and not self.recipients


def status_line(streams: Streams, code: int, status: str, text: str) -> int:
    """The first line on stderr starts with the enhanced status code; pipe(8) quotes it."""
    try:
        streams.stderr.write(f"{status} {one_line(text)}\n")
        streams.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


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
        self.handover: Handover | None = None       # made when delivery starts
        self.unlogged = False           # no syslog daemon and no log_file: say so once
        self.results: dict[str, Result] = {}        # per recipient, once delivery is over
        self.final: tuple[int, str, str] = (EX_TEMPFAIL, LOCAL_TROUBLE, "not run")     # exit status, code, text

    @property
    def delivered(self) -> bool:
        """Has a next hop accepted anything of this message (or the postmaster the report
        that carries it)?  The commit point: from then on nothing the gate does itself --
        logging, reports, the time limit, an exception -- may end in 75."""
        return self.handover is not None and self.handover.delivered

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
            return self._stopped(EX_TEMPFAIL, TIMED_OUT, f"time limit of {config.time_limit:.0f} s exceeded")
        except Interrupted as interrupted:
            log.error("%s", interrupted)
            return self._stopped(EX_TEMPFAIL, LOCAL_TROUBLE, str(interrupted))
        except Stop as stop:
            return self._stopped(stop.code, stop.status, stop.text)
        except Exception as error:
            log.error("internal error: %r", error, exc_info=True)
            return self._stopped(EX_TEMPFAIL, LOCAL_TROUBLE, f"internal error: {error!r}")
        finally:
            self._remove_workdir()
            os.umask(umask)

    def _stopped(self, code: int, status: str, text: str) -> int:
        """A run that ended early; if something was already delivered, it ends in 0."""
        if self.delivered and code != EX_OK:
            log.error("after the next hop accepted this message: %s %s; exit 0, for a retry "
                      "would deliver it again", status, text)
            code, status, text = EX_OK, DONE, "delivered"
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
            raise tempfail(MISCONFIGURED, f"config error: {error}") from None

    def _run(self, config: Config) -> int:
        data = read_message(self.streams.stdin, config.max_message_size, config.on_oversize)
        self.size = len(data)
        self.message_id = message_id_of(data)       # for the log line, whatever happens later
        from_line = split_from_line(data)
        self.message = message = Message(data, max_depth=config.max_mime_depth,
                                         max_parts=config.max_mime_parts)
        self.budget = Budget(config.max_objects, config.max_decoded, config.max_message_size)
        sender, recipients, refused = self._envelope(message, from_line, config)
        self.sender, self.recipients = sender, recipients
        hop = self._next_hop(config, from_line)
        hop.per_recipient = self.request.per_recipient
        if refused and not hop.carries_reports and not (self.request.shell_mode or self.request.dry_run):
            raise refused_untold(refused)
        routes = {recipient: route(config, sender, recipient) for recipient in recipients}
        trace: list[StepTrace] | None = [] if self.request.dry_run else None
        finish = Spool(self.workdir) if trace is None else None     # a dry run keeps what it shows
        leaves = ChainRunner(self._context, log, trace, finish).run(message, sender, routes) if routes else []
        job = Job(self.id, sender, message, config.postmaster, self.notices, self.keep_backup,
                  config.sections.get("arc"), config.sections.get("dkim"), _unsigned(config, routes),
                  self.request.originating, self.request.per_recipient)
        if trace is not None:
            return self._dry_run(job, hop, leaves, routes, refused, trace)
        deferred = [leaf for leaf in leaves if leaf.defers(config, hop.carries_reports)]
        deliverable = leaves
        if deferred and self.request.per_recipient:     # only their recipients wait for the retry
            refused.update({r: _deferred_by(leaf) for leaf in deferred for r in leaf.recipients})
            held = {id(leaf) for leaf in deferred}
            deliverable = [leaf for leaf in leaves if id(leaf) not in held]
        elif deferred:      # deliver nothing: the retry then does everything once
            self._log_groups(leaves, routes, {})
            first = _deferred_by(deferred[0])
            raise tempfail(first.status, first.text)
        self.handover = Handover(hop, self.clock)
        delivery = Delivery(job, self.handover)
        transfers = delivery.prepare(deliverable)   # all the work, under the time limit
        results, unbounced = delivery.deliver(transfers, refused)      # the commit point is in here
        return self._conclude(leaves, routes, results, unbounced)

    def _conclude(self, leaves: "list[Leaf]", routes: "dict[str, Route]", results: "dict[str, Result]",
                  unbounced: tuple[str, ...]) -> int:
        """After the deliveries: the log line, the exit status.  Never raises, and ends in 75
        only for a recipient whose message no next hop accepted."""
        try:
            self._log_groups(leaves, routes, results)
        except Exception as error:      # noqa: BLE001 -- past the commit point nothing raises
            log.error("cannot describe the delivery groups: %r", error)
        try:
            code, status, text = exit_status(results, unbounced=unbounced, delivered=self.delivered)
        except Exception as error:      # noqa: BLE001
            log.error("internal error after delivery: %r", error, exc_info=True)
            code, status, text = (EX_OK, DONE, "delivered") if self.delivered else \
                (EX_TEMPFAIL, LOCAL_TROUBLE, f"internal error: {error!r}")
        self.results = results
        self._log_summary(f"status={_outcome_word(code)}" + ("" if code == EX_OK else f" ({status} {text})"))
        return self._finish(code, status, text)

    def _dry_run(self, job: Job, hop: NextHop, leaves: list[Leaf], routes: dict[str, Route],
                 refused: dict[str, Result], trace: list[StepTrace]) -> int:
        from .admin.dry_run import dry_run_report

        report = dry_run_report(job, self.size, self.config, hop, leaves, routes, refused, trace)
        self.streams.stdout.write(report.encode("utf-8", "surrogateescape"))
        self.streams.stdout.flush()
        self._log_groups(leaves, routes, {})
        self._log_summary("status=dry-run")
        return self._finish(EX_OK, DONE, "dry run")

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
            raise tempfail(NO_SENDER, "no envelope sender: give -f SENDER (-f '' for the null sender) "
                                    "or an mbox From_ line")
        if not recipients:
            raise tempfail(RECIPIENT_COUNT, "no recipients: give them as arguments")
        sender, usable, refused = envelope_addresses(config, sender, recipients)
        for recipient, result in refused.items():
            log.warning("<%s>: %s %s", one_line(recipient), result.status, result.text)
        return sender, usable, refused

    def _next_hop(self, config: Config, from_line: str | None) -> NextHop:
        request = self.request
        if request.to_stdout or request.shell_mode:
            return StdoutHop(self.streams.stdout, from_line)
        if request.mail_host:
            try:
                host, port = parse_hop(request.mail_host)
            except ValueError as error:
                raise tempfail(MISCONFIGURED, f"--mail-host: {error}") from None
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
                               of_error(error)) from None
            self.workdir_path = path
        return self.workdir_path

    def _remove_workdir(self) -> None:
        if self.workdir_path is not None:
            import shutil
            try:
                shutil.rmtree(self.workdir_path, ignore_errors=True)
            except Exception as error:      # noqa: BLE001 -- after delivery nothing raises
                log.error("cannot remove %s: %r", self.workdir_path, error)

    def keep_backup(self, data: bytes | bytearray, recipients: list[str], what: str,
                    failure: str | None = None) -> Path | None:
        """The original's tmp_dir/keep/, kept with its envelope (see ispmailgate_filters.kept):
        a copy of a message the parser gave up on (``what``: why), delivered after its chain
        ran on it unparsed; or, with a *failure*, of one filter ``what`` failed on and no one
        received (``quarantine release`` delivers it)."""
        from ispmailgate_filters.kept import keep

        directory = Path(self.request.tmp_dir or self.config.tmp_dir) / "keep"
        if failure is None:
            verdict, action, detail = "unparsable", "delivered", f"the parser gave up ({what})"
        else:
            verdict, action, detail = "failed", "discarded", f"filter {what} failed: {failure}"
        finding = {"object": "the message", "verdict": verdict, "detail": detail}
        try:
            return keep(str(directory), bytes(data), run_id=self.id, sender=self.sender, recipients=recipients,
                        kept_by="ispmailgate", action=action, verdict=verdict, findings=(finding,))
        except OSError as error:
            log.error("cannot keep a backup in %s: %s", directory, error)
            return None

    def _finish(self, code: int, status: str, text: str) -> int:
        self.final = (code, status, text)
        try:
            if code != EX_OK:
                status_line(self.streams, code, status, text)
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


def _deferred_by(leaf: Leaf) -> Result:
    """The result of a recipient whose chain ended in a tempfail (per-recipient runs)."""
    if leaf.verdict:
        return Result("deferred", leaf.verdict.status, f"{leaf.step}: {leaf.verdict}")
    return Result("deferred", UNPARSABLE, f"{leaf.step}: cannot parse the message")


def _unsigned(config: Config, routes: dict[str, Route]) -> frozenset[str]:
    """Recipients whose rule turns DKIM signing off (none to tell apart without [[dkim]])."""
    if "dkim" not in config.sections:
        return frozenset()
    return frozenset(recipient for recipient, chosen in routes.items() if not chosen.dkim)


def _outcome_word(code: int) -> str:
    return {EX_OK: "done", EX_TEMPFAIL: "deferred", EX_UNAVAILABLE: "rejected"}.get(code, str(code))
