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
        match = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.text)
        return match.group(1) if match else f"{str(self.code)[0]}.0.0"

    def result(self) -> Result:
        state = {2: "sent", 4: "deferred", 5: "rejected"}.get(self.code // 100, "deferred")
        status = self.status
        text = self.text[len(status):].strip() if self.text.startswith(status) else self.text
        return Result(state, status, text)


class Delivery:
    """Hands each distinct result to the next hop once, for all of its recipients."""

    def __init__(self, gate, hop, config) -> None:
        self.gate, self.hop, self.config = gate, hop, config
        self.sealer = None

    def deliver(self, leaves: list, original: Message) -> dict[str, Result]:
        results: dict[str, Result] = {}
        groups = self.groups(leaves)
        if isinstance(self.hop, StdoutHop):
            self.hop.mbox = sum(1 for _, _, leaf in groups if leaf.verdict is None) > 1
        for recipients, message, leaf in groups:
            if leaf.verdict is not None:
                results.update(self._verdict(leaf, original))
                continue
            if leaf.unparsed:
                self._unparsed(leaf, original)
            data = message.to_bytes()
            if message.changed and self.config.sections.get("arc"):
                data = self._seal(original, message, data, recipients)
            replies = self.hop.deliver(self.gate.sender, recipients, data)
            results.update({r: reply.result() for r, reply in replies.items()})
        if isinstance(self.hop, StdoutHop):
            for notice in self.gate.notices:
                log.warning("not sent in stdout mode: %r to %s", notice.subject, ",".join(notice.recipients))
        elif self.gate.notices:
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
        groups: list[tuple[list[str], Message | None, Any]] = []
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

    A small client of its own rather than smtplib: it keeps the one-shot path free of the
    email and ssl packages, streams DATA without copying the message, and maps every
    reply to its recipients.  The next hop is a trusted MTA on this host or LAN, so it
    speaks neither TLS nor AUTH.
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

        # An ASCII host as bytes: a str would load the idna codec (and unicodedata), ~5 ms.
        name = host.encode("ascii") if host.isascii() else host
        self.sock = socket.create_connection((name, port), timeout=timeout)
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
            if chunk.startswith(b".") or b"\n." in chunk:     # chunks start at a line start
                chunk = _DOT_STUFF.sub(b"..", chunk)
            self.sock.sendall(chunk)
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
        if eol == b"\n":
            yield chunk.replace(b"\r\n", b"\n")
        elif b"\r" not in chunk:           # the usual case: LF only, converted in C
            yield chunk.replace(b"\n", b"\r\n")
        else:
            yield _BARE_LF.sub(b"\r\n", chunk)
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
    """Messages the gate writes itself, sent with the null sender through the same next hop."""

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
        """A delivery status notification (RFC 3464) to the sender for rejected recipients."""
        to = self.gate.sender or self.config.postmaster     # never bounce a bounce to <>
        lines = [f"Your message could not be delivered to {len(rejected)} recipient(s):", ""]
        lines += [f"<{rcpt}>: {result.status} {result.text}" for rcpt, result in rejected.items()]
        status = [f"Reporting-MTA: dns; {_hostname()}", ""]
        for rcpt, result in rejected.items():
            status += [f"Final-Recipient: rfc822; {rcpt}", "Action: failed",
                       f"Status: {result.status}", f"Diagnostic-Code: smtp; {one_line(result.text)}", ""]
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
