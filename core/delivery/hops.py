"""The next hop: what delivery asks of one, the hops besides SMTP (a sendmail command,
stdout), and the one a rule file names."""

from __future__ import annotations

import re
import time
from typing import BinaryIO, Protocol

from ..addresses import parse_hop
from ..status import DONE, LOCAL_TROUBLE, SENDMAIL_REFUSALS, TIMED_OUT
from ..text import one_line
from .smtp import SmtpHop
from .wire import Reply, wire_chunks


class NextHop(Protocol):
    """What delivery asks of a next hop.  A hop says what it can do (``carries_reports``,
    ``expect``), so that nobody needs to ask which hop it is."""

    # Can it take the gate's own messages (reports to the postmaster, notices, bounces),
    # which go to others than the message's recipients?  Not stdout: its reader gets the
    # one message it piped in, and a report it cannot carry defers the run instead.
    carries_reports: bool

    # Can it hold several delivery groups' transactions open before DATA and send them only
    # once every one has its recipients (``deliver_groups``)?  SMTP can; a command or stdout
    # has nothing to wait on, so their groups are handed over one after another.
    holds_groups: bool

    # May each recipient end on its own (LMTP's caller takes a status per recipient)?  Then
    # a recipient the hop defers holds back only itself; else every recipient of its
    # transaction waits for the retry with it.  Set by the run.
    per_recipient: bool

    def expect(self, messages: int) -> None:
        """Told, before the first hand-over, how many distinct messages will follow."""

    def deliver(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        """A reply per recipient; the hop's own trouble is a reply too, never an exception."""

    def describe(self) -> str:
        """The hop as an administrator reads it (explain, --dry-run)."""


def configured_hop(config):
    """The next hop the rule file names: its sendmail_command, else SMTP to mail_host."""
    if config.sendmail_command:
        return SendmailHop(config.sendmail_command, config.delivery_timeout)
    return SmtpHop(*parse_hop(config.mail_host), config)


class SendmailHop:
    """A sendmail-compatible command, run from an argv list (never a shell)."""

    carries_reports = True
    holds_groups = False
    per_recipient = False           # one exit status for all recipients anyway

    def __init__(self, command: tuple[str, ...], timeout: float) -> None:
        self.command, self.timeout = command, timeout

    def __str__(self) -> str:
        return f"sendmail:{self.command[0]}"

    def expect(self, messages: int) -> None:
        pass

    def describe(self) -> str:
        return str(self)

    def deliver(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        import subprocess

        argv = [*self.command, "-f", sender, "--", *recipients]
        # native line ends, and a last one as on the SMTP wire (a sendmail would add it anyway)
        native = (data if b"\r\n" not in data and data.endswith(b"\n")
                  else b"".join(wire_chunks(data, b"\n")))
        try:
            status, complaint = _run_command(argv, native, self.timeout)
        except subprocess.TimeoutExpired:
            return self._all(recipients, 451, f"{TIMED_OUT} {self} timed out after {self.timeout:.0f} s")
        except OSError as error:
            return self._all(recipients, 451, f"{LOCAL_TROUBLE} cannot run {self.command[0]}: {error.strerror}")
        if status == 0:
            return self._all(recipients, 250, f"{DONE} accepted by {self}")
        complaint = one_line(complaint.decode("utf-8", "replace"))[:300]
        if status in SENDMAIL_REFUSALS:
            return self._all(recipients, 550, f"{SENDMAIL_REFUSALS[status]} {self} "
                             f"refused (exit {status}): {complaint}")
        return self._all(recipients, 451, f"{LOCAL_TROUBLE} {self} failed (exit {status}): {complaint}")

    @staticmethod
    def _all(recipients: list[str], code: int, text: str) -> dict[str, Reply]:
        reply = Reply(code, text)
        return {r: reply for r in recipients}


def _run_command(argv: list[str], data: bytes | bytearray, timeout: float) -> tuple[int, bytes]:
    """Run a sendmail command on ``data``: its exit status and the start of its stderr.

    Its exit is what counts, not the end of its stderr: a sendmail that queued the message
    and exited 0 may leave a child behind (its own background delivery) holding stderr open,
    and waiting for that would turn an accepted message into a retry, a duplicate.  So
    stderr goes to an unnamed file, and what is left running after the exit is left alone.
    The command leads a process group of its own: on a timeout, or when the time limit or a
    signal ends the wait, the whole group is killed (while its leader is still unreaped, so
    its number cannot have been reused) and the leader reaped; a hung sendmail's children
    with it.  Raises ``subprocess.TimeoutExpired`` after a timeout, ``OSError`` if it cannot run.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
                                   start_new_session=True)
        try:
            process.communicate(data, timeout=timeout)    # writes, closes stdin, waits for the exit
        finally:
            if process.returncode is None:      # timed out, or interrupted: nothing of it stays
                _kill_group(process.pid)
                process.wait()
        errors.seek(0)
        return process.returncode, errors.read(4096)


def _kill_group(group: int) -> None:
    import os
    import signal

    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


class StdoutHop:
    """Writes the result to stdout: for procmail ``:0 fw`` and for testing in a shell.

    The mbox From_ line goes back in front (procmail expects its filter to keep it).  If
    recipients got different results, each is written as an mboxrd message.
    """

    carries_reports = False
    holds_groups = False
    per_recipient = False

    def __init__(self, stream: BinaryIO, from_line: str | None, *, mbox: bool = False) -> None:
        self.stream, self.from_line, self.mbox = stream, from_line, mbox

    def __str__(self) -> str:
        return "stdout"

    def expect(self, messages: int) -> None:
        """More than one distinct result: each goes out as an mboxrd message."""
        self.mbox = messages > 1

    def describe(self) -> str:
        return str(self)

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
            return {r: Reply(451, f"{LOCAL_TROUBLE} cannot write to stdout: {error}") for r in recipients}
        return {r: Reply(250, f"{DONE} written to stdout") for r in recipients}
