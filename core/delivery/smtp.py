"""The next hop by SMTP: a small streaming client of its own."""

from __future__ import annotations

import logging
import re
import time

from ..status import BAD_CONNECTION, NO_ANSWER, OUT_OF_STEP, RECIPIENT_COUNT
from ..text import one_line
from .wire import Payload, Reply, wire_address, wire_chunks

log = logging.getLogger("ispmailgate")


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

    carries_reports = True
    holds_groups = True     # deliver_groups: every group's recipients answered before any DATA
    per_recipient = False

    def __init__(self, host: str, port: int, config) -> None:
        self.host, self.port = host, port
        self.timeout = config.delivery_timeout
        self.suffix = config.loop_suffix
        self.helo = config.helo_name

    def __str__(self) -> str:
        return f"smtp:{self.host}:{self.port}"

    def expect(self, messages: int) -> None:
        pass

    def describe(self) -> str:
        if self.suffix:
            return f"{self} (each recipient gets the loop suffix {self.suffix})"
        return str(self)

    def deliver(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        """A reply per recipient; one whose fate is unknown when the connection fails is 4xx.

        Past the hop's recipient limit (a 452 after some were accepted) the rest get a
        transaction of their own, on a connection of their own opened while the first waits
        before DATA: the message goes out only once every transaction has its recipients, so
        a recipient deferred in a later transaction defers them all, and the retry delivers
        to each once (sending the first before would deliver it twice) -- unless each
        recipient ends on its own (``per_recipient``, LMTP): then it defers only itself.  At most
        ``OPEN_TRANSACTIONS`` wait at once; past that, what is open is sent first.
        """
        return self.deliver_groups(sender, [(recipients, Payload.of(data))])

    def deliver_groups(self, sender: str, groups: list[tuple[list[str], Payload]]) -> dict[str, Reply]:
        """Several distinct messages (delivery groups), each to its recipients, in the same
        two phases as the transactions of one: every transaction gets its MAIL and RCPT
        answers while the others wait open before DATA, and only then is each message sent,
        read (``Payload.load``) just before its own DATA.  A recipient deferred at MAIL or
        RCPT in any group sends nothing: the run ends in 75 and the retry delivers to each
        once.  A transaction whose DATA is deferred keeps the ones after it from being sent;
        those before it are delivered: that is SMTP's own window, as with one transaction."""
        settled: dict[str, Reply] = {}
        pending = [(list(recipients), payload) for recipients, payload in groups if recipients]
        while pending:
            pending = self._round(sender, pending, settled)
        return settled

    OPEN_TRANSACTIONS = 8

    def _round(self, sender: str, groups: list[tuple[list[str], Payload]],
               settled: dict[str, Reply]) -> list[tuple[list[str], Payload]]:
        """Open transactions for ``groups`` (up to OPEN_TRANSACTIONS), then send them all;
        returns what is left for another round."""
        opened: list[tuple[SmtpSession, list[str], Payload]] = []
        pending = groups
        try:
            while pending and len(opened) < self.OPEN_TRANSACTIONS:
                asked, payload = pending[0]
                session, accepted, later = self._open(sender, asked, payload, settled)
                pending = ([(later, payload)] if later else []) + pending[1:]
                if session is not None and accepted:
                    opened.append((session, accepted, payload))
                elif session is not None:
                    session.close()
                if not self.per_recipient and any(settled[r].code // 100 == 4 for r in asked if r in settled):
                    self._hold_back(opened, pending, settled, asked)
                    return []
            return self._send(opened, pending, settled)
        finally:
            for session, _, _ in opened:
                session.close()

    def _send(self, opened: list[tuple[SmtpSession, list[str], Payload]],
              pending: list[tuple[list[str], Payload]], settled: dict[str, Reply]) -> list:
        """DATA on every open transaction in turn.  After a failed one the rest are not sent:
        after a deferred one, since the run ends in 75; after a refused one, the other
        transactions of the same message (it would be refused again)."""
        for number, (session, accepted, payload) in enumerate(opened):
            reply = self._data(session, accepted, payload, settled)
            later = opened[number + 1:]
            after = later[0][2] if later else pending[0][1] if pending else None
            same = after is payload
            if reply.code // 100 == 4 or (reply.code // 100 != 2 and same):
                for _, others, _ in later:
                    settled.update(dict.fromkeys(others, _not_tried(self, reply)))
                for others, _ in pending:
                    settled.update(dict.fromkeys(others, _not_tried(self, reply)))
                return []
        return pending

    def _hold_back(self, opened: list, pending: list[tuple[list[str], Payload]],
                   settled: dict[str, Reply], asked: list[str]) -> None:
        """A recipient of the latest transaction was deferred: none of the waiting ones is sent."""
        first = next(r for r in asked if r in settled and settled[r].code // 100 == 4)
        reason = Reply(451, f"{settled[first].status} {self}: not sent: <{first}> was deferred "
                            f"({settled[first]}); all are retried together")
        for _, accepted, _ in opened:
            settled.update(dict.fromkeys(accepted, reason))
        for recipients, _ in pending:
            for recipient in recipients:
                settled.setdefault(recipient, reason)

    def _open(self, sender: str, recipients: list[str], payload: Payload,
              settled: dict[str, Reply]) -> tuple[SmtpSession | None, list[str], list[str]]:
        """One connection, up to its RCPTs: (the session, the accepted, those past its limit).
        A failed connection settles its recipients as deferred and returns no session."""
        session = None
        try:
            session = SmtpSession(self.host, self.port, self.timeout)
            accepted, later = self._transaction(session, sender, recipients, payload, settled)
            return session, accepted, later
        except Exception as error:      # OSError, SmtpError, or a fault of ours: fate unknown
            self._failed(error, session is None, recipients, settled)
            if session is not None:
                session.close()
            return None, [], []

    def _data(self, session: SmtpSession, accepted: list[str], payload: Payload,
              settled: dict[str, Reply]) -> Reply:
        """DATA, the message, the final reply: settles the accepted recipients.  The bytes are
        got (a spooled result read back) only now, and dropped after."""
        try:
            data = payload.load()
            reply = session.command(b"DATA")
            if _expected(reply, "DATA", 354):
                session.send_data(data)
                reply = session.reply()
                _expected(reply, "the end of the data", 250)
        except Exception as error:      # noqa: BLE001 -- the hop broke off: fate unknown, deferred
            self._failed(error, False, accepted, settled)
            return settled[accepted[0]]
        settled.update(dict.fromkeys(accepted, reply))
        return reply

    def _failed(self, error: BaseException, unconnected: bool, recipients: list[str],
                settled: dict[str, Reply]) -> None:
        reason = socket_reason(error)
        log.error("%s: %s", self, reason)
        status = getattr(error, "status", None) or (NO_ANSWER if unconnected else BAD_CONNECTION)
        for recipient in recipients:
            settled.setdefault(recipient, Reply(451, f"{status} {self}: {reason}"))

    def _transaction(self, session: SmtpSession, sender: str, recipients: list[str],
                     payload: Payload, settled: dict[str, Reply]) -> tuple[list[str], list[str]]:
        """Greeting, EHLO, MAIL and RCPTs: (accepted, left for another transaction).  Fills
        ``settled`` as replies become final: a refused RCPT at once, the rest at the end."""
        greeting = session.reply()
        if not _expected(greeting, "the greeting", 220):    # even 554 is the hop's state, not the message's
            settled.update(dict.fromkeys(recipients, Reply(451, f"{BAD_CONNECTION} {self} greeted: {greeting}")))
            return [], []
        extensions = session.hello(self.helo or hostname())
        params = self._mail_params(extensions, sender, recipients, payload)
        reply = session.command(b"MAIL FROM:<" + wire_address(sender) + b">" + params)
        if not _expected(reply, "MAIL FROM", 250):
            settled.update(dict.fromkeys(recipients, reply))
            return [], []
        return self._recipients(session, recipients, settled)

    def _recipients(self, session: SmtpSession, recipients: list[str],
                    settled: dict[str, Reply]) -> tuple[list[str], list[str]]:
        """RCPT TO for each: (accepted, left for another transaction).

        One deferred recipient defers the whole transaction: the run then ends in 75, the
        MTA retries every recipient, and those the hop took now would get it twice -- unless
        each recipient ends on its own (``per_recipient``, LMTP): then it defers only itself.
        A 452 after some were accepted is the hop's recipient limit (RFC 5321 4.5.3.1.10):
        the rest go in a transaction of their own.
        """
        accepted: list[str] = []
        for index, recipient in enumerate(recipients):
            reply = session.command(b"RCPT TO:<" + wire_address(self._suffixed(recipient)) + b">")
            if _expected(reply, "RCPT TO", 250, 251):
                accepted.append(recipient)
            elif reply.code == 452 and accepted:
                return accepted, recipients[index:]
            elif reply.code // 100 == 5 or self.per_recipient:
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
                     payload: Payload) -> bytes:
        params = b""
        if "SIZE" in extensions:
            params += b" SIZE=%d" % payload.size
        if "8BITMIME" in extensions and not payload.ascii:
            params += b" BODY=8BITMIME"
        if "SMTPUTF8" in extensions and not all(a.isascii() for a in [sender, *recipients]):
            params += b" SMTPUTF8"
        return params


def _not_tried(hop: SmtpHop, reply: Reply) -> Reply:
    return Reply(451, f"{RECIPIENT_COUNT} {hop}: not tried: the transaction before them ended in {reply}")


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
    status = OUT_OF_STEP


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


def socket_reason(error: BaseException) -> str:
    import socket

    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError):
        return error.strerror or repr(error)
    return str(error)


def hostname() -> str:
    import socket
    return socket.gethostname() or "localhost"
