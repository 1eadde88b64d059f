"""The deliver stage: each distinct result to the next hop once, and the gate's own reports.

Next hops: SMTP (a small streaming client of its own), a sendmail-compatible command run
from an argv list, or stdout.  Every hop answers with a reply per recipient; the core turns
those into the exit status.  Reports (postmaster, notices from filters, bounces for
partly refused mail) go out through the same hop, with the null sender.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, BinaryIO, NamedTuple

from ispmailgate_filters.base import Discard, Notice, Reject
from ispmailgate_filters.mime import Message

log = logging.getLogger("ispmailgate")


def one_line(text: str) -> str:
    """Text fit for one log or status line: white space folded, at most 900 characters."""
    return loggable(" ".join(str(text).split())[:900])


def loggable(text: str) -> str:
    """Text any log sink can take: bytes that were not UTF-8 (surrogate escapes) and NUL
    become backslash escapes, where they would make syslog(3) or a file refuse the line."""
    text = text.replace("\0", "\\0")
    try:        # the bytes a header carried, shown as \xNN
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# =========================================================================================
# deliver
# =========================================================================================

class Result(NamedTuple):
    """What happened to one recipient in the end."""
    state: str          # sent | discarded | rejected | deferred | reported
    status: str
    text: str

    def describe(self) -> str:
        return f"{self.state} ({self.status} {self.text})" if self.text else self.state


class Reply(NamedTuple):
    """One SMTP reply (or the equivalent from another next hop)."""
    code: int
    text: str
    lines: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def status(self) -> str:
        match = re.match(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}\b", self.text)
        if match and match.group(1) == str(self.code)[0]:   # the class is the code's, never the text's
            return match.group(0)
        return f"{str(self.code)[0]}.0.0"

    def result(self) -> Result:
        state = {2: "sent", 4: "deferred", 5: "rejected"}.get(self.code // 100, "deferred")
        status = self.status
        text = self.text[len(status):].strip() if self.text.startswith(status) else self.text
        return Result(state, status, text)


class Transfer(NamedTuple):
    """One delivery group made ready: its recipients and bytes, or the verdict that ended it."""
    recipients: list[str]
    data: bytes | bytearray | None
    leaf: Any


class Delivery:
    """Hands each distinct result to the next hop once, for all of its recipients.

    In two stages around the commit point: :meth:`prepare` does all the work (the bytes of
    each group, ARC seals, the backup of an unparsable original) while the time limit can
    still stop the run; :meth:`deliver` only hands over, and from the first hand-over on
    nothing the gate does can make the run end in 75 except a recipient whose message no
    next hop accepted.
    """

    def __init__(self, gate, hop, config) -> None:
        self.gate, self.hop, self.config = gate, hop, config
        self.sealer = None

    def prepare(self, leaves: list, original: Message) -> list[Transfer]:
        transfers = []
        groups = self.groups(leaves)
        if isinstance(self.hop, StdoutHop):
            self.hop.mbox = sum(1 for _, _, leaf in groups if leaf.verdict is None) > 1
        for recipients, message, leaf in groups:
            if leaf.verdict is not None:
                transfers.append(Transfer(recipients, None, leaf))
                continue
            if leaf.unparsed:
                self._unparsed(leaf, original)
            data = message.to_bytes()
            if message.changed and self.config.sections.get("arc"):
                data = self._seal(original, message, data, recipients)
            transfers.append(Transfer(recipients, data, leaf))
        return transfers

    def deliver(self, transfers: list[Transfer], original: Message,
                refused: dict[str, Result] | None = None) -> dict[str, Result]:
        """Each group in turn; ``refused`` are recipients no next hop could be given.  Once a
        group is deferred the rest wait for the MTA's retry too: handed over now, they would
        be delivered twice."""
        results: dict[str, Result] = dict(refused or {})
        deferred = False
        for transfer in transfers:
            verdict = transfer.leaf.verdict
            if isinstance(verdict, (Discard, Reject)):
                outcome = self._verdict(transfer.leaf, original)
            elif deferred:
                outcome = dict.fromkeys(transfer.recipients, Result(
                    "deferred", "4.3.0", "not handed over: an earlier delivery group was deferred"))
            elif verdict is not None:
                outcome = self._verdict(transfer.leaf, original)
            else:
                replies = hand_over(self.gate, self.hop, self.gate.sender, transfer.recipients, transfer.data)
                outcome = {r: reply.result() for r, reply in replies.items()}
            deferred = deferred or any(result.state == "deferred" for result in outcome.values())
            results.update(outcome)
        if isinstance(self.hop, StdoutHop):
            for notice in self.gate.notices:
                log.warning("not sent in stdout mode: %r to %s", notice.subject, ",".join(notice.recipients))
        elif self.gate.notices and not deferred:    # the retry would send them again
            Reports(self.gate, self.hop, self.config).send_notices(original)
        return results

    def _seal(self, original: Message, message: Message, data: bytes, recipients: list[str]) -> bytes:
        """An ARC set for a changed message; if sealing fails, the message goes out unsealed."""
        if self.sealer is None:
            from ispmailgate_arc import Sealer
            self.sealer = Sealer(self.config.sections["arc"])
        started = time.monotonic()
        try:
            sealed = self.sealer.seal(original.raw, data, message.eol)
        except Exception as error:      # a message dkimpy cannot handle is still delivered
            log.error("ARC sealing failed for %s, delivered unsealed: %r", ",".join(recipients), error)
            return data
        log.info("ARC sealed for %s in %.1f ms", ",".join(recipients), (time.monotonic() - started) * 1000)
        return sealed

    @staticmethod
    def groups(leaves: list) -> list[tuple[list[str], Message | None, Any]]:
        """Merge leaves whose resulting bytes are identical: one transaction for them all."""
        import hashlib

        groups: list[tuple[list[str], Message | None, Any]] = []
        merged: dict[Any, list[str]] = {}
        for leaf in leaves:
            if leaf.message is None or leaf.unparsed:
                groups.append((leaf.recipients, leaf.message, leaf))
                continue
            # a digest, not the bytes: holding every result until delivery would cost a copy each
            key = hashlib.sha256(leaf.message.to_bytes()).digest() if leaf.message.changed else "unchanged"
            if key in merged:
                merged[key].extend(leaf.recipients)
            else:
                merged[key] = list(leaf.recipients)
                groups.append((merged[key], leaf.message, leaf))
        return groups

    def _verdict(self, leaf, original: Message) -> dict[str, Result]:
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

    def _unparsed(self, leaf, original: Message) -> None:
        kept = self.gate.keep_backup(original.raw)
        text = (f"ispmailgate could not parse message {self.gate.id} (from <{self.gate.sender}> to "
                f"{', '.join(leaf.recipients)}) in filter {leaf.step}.\nIt was delivered unchanged."
                f"\nA copy is kept in {kept or '(nowhere: keeping failed, see the log)'}.\n")
        self.gate.notices.append(Notice((self.config.postmaster,), "ispmailgate: message delivered "
                                        "unfiltered (parse error)", text))


def hand_over(gate, hop, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
    """The one way anything leaves for a next hop: the message, reports, notices.

    The time limit is checked before the hand-over starts as long as nothing was accepted,
    and never interrupts one (the hop bounds each step by delivery_timeout): an alarm
    between the next hop's 250 and our reading it would otherwise turn an accepted message
    into a retry.  A 2xx reply is the commit point (``gate.delivered``).
    """
    gate.clock.shield()
    if not gate.delivered:
        gate.clock.check()
    try:
        replies = hop.deliver(sender, recipients, data)
    except Exception as error:      # the hops settle their own failures: this is a fault of ours
        log.error("%s: internal error: %r", hop, error, exc_info=True)
        replies = {r: Reply(451, f"4.3.0 {hop}: internal error: {error!r}") for r in recipients}
    if any(reply.code // 100 == 2 for reply in replies.values()):
        gate.delivered = True
    return replies


def configured_hop(config):
    """The next hop the rule file names: its sendmail_command, else SMTP to mail_host."""
    if config.sendmail_command:
        return SendmailHop(config.sendmail_command, config.delivery_timeout)
    return SmtpHop(*parse_hop(config.mail_host), config)


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

    A small client of its own rather than smtplib (which copies a message three times
    over for CRLF and dot-stuffing, and imports the email and ssl packages on the one-shot
    path): it streams DATA without a second copy and maps every reply to its recipients.
    Every reply is read whole, however many lines it has, and must be one the command
    allows: anything else means client and next hop are out of step, and every recipient
    whose fate is not settled yet is deferred (4.5.0) on a connection that is then
    dropped.  The next hop is a trusted MTA on this host or LAN, so it speaks neither TLS
    nor AUTH.
    """

    def __init__(self, host: str, port: int, config) -> None:
        self.host, self.port = host, port
        self.timeout = config.delivery_timeout
        self.suffix = config.loop_suffix
        self.helo = config.helo_name

    def __str__(self) -> str:
        return f"smtp:{self.host}:{self.port}"

    def deliver(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        """A reply per recipient; one whose fate is unknown when the connection fails is 4xx."""
        settled: dict[str, Reply] = {}
        pending = list(recipients)
        while pending:      # a second transaction only for recipients past the hop's limit
            pending = self._connection(sender, pending, data, settled)
        return settled

    def _connection(self, sender: str, recipients: list[str], data: bytes | bytearray,
                    settled: dict[str, Reply]) -> list[str]:
        """One connection and transaction; returns the recipients left for another one."""
        session = None
        try:
            session = SmtpSession(self.host, self.port, self.timeout)
            return self._transaction(session, sender, recipients, data, settled)
        except Exception as error:      # OSError, SmtpError, or a fault of ours: fate unknown
            reason = _socket_reason(error)
            log.error("%s: %s", self, reason)
            status = getattr(error, "status", None) or ("4.4.1" if session is None else "4.4.2")
            for recipient in recipients:
                settled.setdefault(recipient, Reply(451, f"{status} {self}: {reason}"))
            return []
        finally:
            if session is not None:
                session.close()

    def _transaction(self, session: SmtpSession, sender: str, recipients: list[str],
                     data: bytes | bytearray, settled: dict[str, Reply]) -> list[str]:
        """Fills ``settled`` as replies become final: a refused RCPT at once, the rest at the end."""
        greeting = session.reply()
        if not _expected(greeting, "the greeting", 220):    # even 554 is the hop's state, not the message's
            settled.update(dict.fromkeys(recipients, Reply(451, f"4.4.2 {self} greeted: {greeting}")))
            return []
        extensions = session.hello(self.helo or _hostname())
        params = self._mail_params(extensions, sender, recipients, data)
        reply = session.command(b"MAIL FROM:<" + wire_address(sender) + b">" + params)
        if not _expected(reply, "MAIL FROM", 250):
            settled.update(dict.fromkeys(recipients, reply))
            return []
        accepted, later = self._recipients(session, recipients, settled)
        if not accepted:
            return []
        reply = session.command(b"DATA")
        if _expected(reply, "DATA", 354):
            session.send_data(data)
            reply = session.reply()
            _expected(reply, "the end of the data", 250)
        settled.update(dict.fromkeys(accepted, reply))
        if reply.code // 100 == 2:
            return later
        settled.update(dict.fromkeys(later, Reply(451, f"4.5.3 {self}: not tried: the transaction "
                                                       f"before them ended in {reply}")))
        return []

    def _recipients(self, session: SmtpSession, recipients: list[str],
                    settled: dict[str, Reply]) -> tuple[list[str], list[str]]:
        """RCPT TO for each: (accepted, left for another transaction).

        One deferred recipient defers the whole transaction: the run then ends in 75, the
        MTA retries every recipient, and those the hop took now would get it twice.  A 452
        after some were accepted is the hop's recipient limit (RFC 5321 4.5.3.1.10): the
        rest go in a transaction of their own.
        """
        accepted: list[str] = []
        for index, recipient in enumerate(recipients):
            reply = session.command(b"RCPT TO:<" + wire_address(self._suffixed(recipient)) + b">")
            if _expected(reply, "RCPT TO", 250, 251):
                accepted.append(recipient)
            elif reply.code == 452 and accepted:
                return accepted, recipients[index:]
            elif reply.code // 100 == 5:
                settled[recipient] = reply
            else:
                settled[recipient] = reply
                for other in accepted + recipients[index + 1:]:
                    settled.setdefault(other, Reply(451, f"{reply.status} {self}: not sent: <{recipient}> "
                                                         f"was deferred ({reply}); all are retried together"))
                return [], []
        return accepted, []

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


def _expected(reply: Reply, step: str, *success: int) -> bool:
    """True for the reply ``step`` succeeds with, False for a 4xx or 5xx; anything else is
    not an answer to ``step`` (an unasked line, a reply meant for another command)."""
    if reply.code in success:
        return True
    if reply.code // 100 in (4, 5):
        return False
    raise SmtpProtocolError(f"out of step: {step} answered {str(reply)[:200]!r}")


class SmtpError(Exception):
    """The next hop broke the connection (its recipients are deferred as 4.4.2)."""
    status = ""


class SmtpProtocolError(SmtpError):
    """The next hop said something no SMTP server says there: client and server are out of
    step, nothing more it says can be trusted to answer what was asked."""
    status = "4.5.0"


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*?))?\r?\n", re.S)


class SmtpSession:
    """One SMTP connection: commands out as bytes, replies in, nothing copied twice.

    A reply may have any number of lines; it is bounded in bytes (MAX_REPLY) and in time
    (the timeout, for the whole reply), and past either the session fails (4.4.2), so a
    hop that talks without end costs a bounded time and memory, never a wrong pairing of
    replies and commands.
    """

    MAX_LINE = 4096         # RFC 5321 4.5.3.1.5: 512 octets; eight times that is not SMTP
    MAX_REPLY = 1 << 20     # every line of one reply together
    KEPT_LINES = 100        # lines kept for the text of a reply (logs, status lines)

    def __init__(self, host: str, port: int, timeout: float) -> None:
        import socket

        # An ASCII host as bytes: a str would load the idna codec (and unicodedata), ~5 ms.
        name = host.encode("ascii") if host.isascii() else host
        self.timeout = timeout
        self.sock = socket.create_connection((name, port), timeout=timeout)
        # Commands and the final dot are small writes that follow one another: with Nagle's
        # algorithm each waits for the delayed ACK of the last (40 ms a message on Linux).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.keywords: set[str] = set()     # EHLO keywords, from every line of the reply

    def reply(self) -> Reply:
        """The next reply, every line of it; its lines must all carry the same code."""
        deadline = time.monotonic() + self.timeout
        code, lines, size, number = None, [], 0, 0
        self.keywords = set()
        while True:
            line = self._line(deadline)
            size, number = size + len(line), number + 1
            match = _REPLY_LINE.fullmatch(line)
            if match is None:
                raise SmtpProtocolError(f"not an SMTP reply: {line[:60]!r}")
            if code is not None and int(match.group(1)) != code:
                raise SmtpProtocolError(f"reply lines with codes {code} and {match.group(1).decode()}")
            if size > self.MAX_REPLY:
                raise SmtpError(f"a reply of more than {self.MAX_REPLY} bytes")
            code = int(match.group(1))
            text = (match.group(3) or b"").strip().decode("utf-8", "replace")
            if len(lines) < self.KEPT_LINES:
                lines.append(text)
            if code == 250 and number > 1 and text.split():
                self.keywords.add(text.split()[0].upper())
            if match.group(2) != b"-":
                return Reply(code, " ".join(lines), tuple(lines))

    def _line(self, deadline: float) -> bytes:
        while (end := self.buffer.find(b"\n", 0, self.MAX_LINE + 1)) < 0:
            if len(self.buffer) > self.MAX_LINE:
                raise SmtpProtocolError(f"a reply line longer than {self.MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise SmtpError("connection closed by the next hop")
            self.buffer += chunk
        line = bytes(self.buffer[:end + 1])
        del self.buffer[:end + 1]
        return line

    def command(self, line: bytes) -> Reply:
        if _CONTROL.search(line):       # addresses are checked before; never send one
            raise SmtpError(f"refusing to send a command with control characters: {line[:60]!r}")
        self._nothing_unasked(line.split(b" ", 1)[0])
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def _nothing_unasked(self, before: bytes) -> None:
        """A line the hop sent without being asked would be read as the answer to the next
        command: refuse to go on instead (it can still arrive later; then a reply that does
        not fit its command gives it away, at the latest at DATA or its end)."""
        import select
        import socket

        if not self.buffer:
            if not select.select([self.sock], [], [], 0)[0]:
                return
            if not self.sock.recv(1, socket.MSG_PEEK):
                raise SmtpError("connection closed by the next hop")
        unasked = bytes(self.buffer[:60]) or self.sock.recv(60, socket.MSG_PEEK)
        raise SmtpProtocolError(f"out of step: the next hop said {unasked!r} before "
                                f"{before.decode('ascii', 'replace')} was sent")

    def hello(self, name: str) -> set[str]:
        """EHLO (HELO when it is refused for good): the extension keywords."""
        name_bytes = name.encode("ascii", "ignore") or b"localhost"
        reply = self.command(b"EHLO " + name_bytes)
        if _expected(reply, "EHLO", 250):
            return self.keywords
        if reply.code // 100 == 5:
            reply = self.command(b"HELO " + name_bytes)
            if _expected(reply, "HELO", 250):
                return set()
        raise SmtpError(f"EHLO/HELO refused: {one_line(str(reply))[:200]}")

    def send_data(self, data: bytes | bytearray) -> None:
        """The message with CRLF line ends and dot-stuffing, in chunks, then the final dot."""
        self._nothing_unasked(b"the message")
        for chunk in wire_chunks(data, b"\r\n"):
            if chunk.startswith(b".") or b"\n." in chunk:     # chunks start at a line start
                chunk = _DOT_STUFF.sub(b"..", chunk)
            self.sock.sendall(chunk)
        self.sock.sendall(b".\r\n")

    def close(self) -> None:
        """QUIT, whatever the hop answers (the transaction is settled before this)."""
        try:
            self.sock.settimeout(5)
            self.sock.sendall(b"QUIT\r\n")
            self.timeout = 5
            self.reply()
        except Exception:       # noqa: BLE001 -- nothing said after the transaction changes it
            pass
        finally:
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
        if eol == b"\n":
            yield chunk.replace(b"\r\n", b"\n")
        elif b"\r" not in chunk:           # the usual case: LF only, converted in C
            yield chunk.replace(b"\n", b"\r\n")
        else:
            yield _BARE_LF.sub(b"\r\n", chunk)
        position = end
    if not data.endswith(b"\n"):
        yield eol


def wire_address(address: str) -> bytes:
    """An address as SMTP carries it (the core lets only valid UTF-8 this far)."""
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
        # native line ends, and a last one as on the SMTP wire (a sendmail would add it anyway)
        native = (data if b"\r\n" not in data and data.endswith(b"\n")
                  else b"".join(wire_chunks(data, b"\n")))
        try:
            process = subprocess.run(argv, input=native, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            return self._all(recipients, 451, f"4.4.7 {self} timed out after {self.timeout:.0f} s")
        except OSError as error:
            return self._all(recipients, 451, f"4.3.0 cannot run {self.command[0]}: {error.strerror}")
        if process.returncode == 0:
            return self._all(recipients, 250, "2.0.0 accepted by " + str(self))
        complaint = one_line(process.stderr.decode("utf-8", "replace"))[:300]
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
    """Messages the gate writes itself, sent with the null sender through the same next hop.

    Reports go out after the message, past the commit point, so nothing here raises: a
    report that cannot be written or sent is logged and counts as not sent.  Whatever
    text goes into one (addresses, filter messages) is made printable first.
    """

    def __init__(self, gate, hop, config) -> None:
        self.gate, self.hop, self.config = gate, hop, config

    def filter_error(self, leaf, original: Message) -> bool:
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
        """A delivery status notification (RFC 3464) to the sender for rejected recipients.

        If the sender cannot be told and the others already have the message, the
        postmaster gets it instead: a retry would deliver to them twice."""
        to = self.gate.sender or self.config.postmaster     # never bounce a bounce to <>
        lines = [f"Your message could not be delivered to {len(rejected)} recipient(s):", ""]
        lines += [f"<{one_line(rcpt)}>: {result.status} {one_line(result.text)}" for rcpt, result in rejected.items()]
        status = [f"Reporting-MTA: dns; {_hostname()}", ""]
        for rcpt, result in rejected.items():
            status += [f"Final-Recipient: rfc822; {one_line(rcpt)}", "Action: failed",
                       f"Status: {result.status}", f"Diagnostic-Code: smtp; {one_line(result.text)}", ""]
        subject = "Undelivered Mail Returned to Sender"
        try:
            report = _multipart_report("\n".join(lines) + "\n", "\n".join(status), self.gate.original_headers())
        except Exception as error:      # noqa: BLE001 -- see the class
            log.error("cannot write the bounce: %r", error, exc_info=True)
            return False
        if self._send((to,), subject, None, None, body=report):
            return True
        if self.gate.delivered and to != self.config.postmaster:
            log.error("the sender <%s> cannot be told that %s failed; the postmaster is", to,
                      ", ".join(one_line(r) for r in rejected))
            self._send((self.config.postmaster,), subject, None, None, body=report)
        return False

    def _send(self, recipients: tuple[str, ...], subject: str, text: str | None,
              attachment: bytes | bytearray | None, body: tuple[str, bytes] | None = None) -> bool:
        try:
            data = _report_message(self.config.postmaster, recipients, subject, text, attachment, body)
        except Exception as error:      # noqa: BLE001 -- see the class
            log.error("%s: cannot write report %r: %r", self.gate.id, subject, error, exc_info=True)
            return False
        replies = hand_over(self.gate, self.hop, "", list(recipients), data)
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
        ("From", f"Mail Delivery System <{one_line(postmaster)}>"),
        ("To", ", ".join(one_line(r) for r in recipients)),
        ("Subject", one_line(subject)), ("Date", formatdate(localtime=True)),
        ("Message-ID", make_msgid("ispmailgate")), ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0")))
    if body is not None:
        content_type, payload = body
        return head + fold_field("Content-Type", content_type) + b"\n" + payload
    text_part = (b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
                 + loggable(text or "").encode("utf-8"))
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
    payload = (mark + b"Content-Type: text/plain; charset=utf-8\n\n" + loggable(text).encode("utf-8") + b"\n"
               + mark + b"Content-Type: message/delivery-status\n\n" + loggable(status).encode("utf-8") + b"\n"
               + mark + b"Content-Type: text/rfc822-headers\n\n" + headers
               + f"\n--{boundary}--\n".encode())
    return f'multipart/report; report-type=delivery-status; boundary="{boundary}"', payload
