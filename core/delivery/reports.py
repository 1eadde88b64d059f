"""Reports: messages the gate writes itself (to the postmaster, notices from filters,
bounces for partly refused mail), sent with the null sender through the same next hop."""

from __future__ import annotations

import logging
import re

from ..outcome import Result
from ..reading import header_block_end
from ..text import loggable, one_line
from .handover import Handover, Job
from .smtp import hostname

log = logging.getLogger("ispmailgate")


class Reports:
    """Messages the gate writes itself, sent with the null sender through the same next hop.

    Reports go out after the message, past the commit point, so nothing here raises: a
    report that cannot be written or sent is logged and counts as not sent.  Whatever
    text goes into one (addresses, filter messages) is made printable first.
    """

    def __init__(self, job: Job, handover: Handover) -> None:
        self.job, self.handover = job, handover

    def filter_error(self, leaf) -> bool:
        """The postmaster gets the original; if the next hop refuses the report for good (its
        size, say), the original is kept in tmp_dir/keep/ and the report names it instead."""
        job, subject = self.job, f"ispmailgate: filter {leaf.step} failed"
        about = (f"A filter failed on message {job.run_id}.\n\nSender:     <{job.sender}>\n"
                 f"Recipients: {', '.join(leaf.recipients)}\nFilter:     {leaf.step}\nError:      {leaf.verdict}\n\n"
                 "The message was not delivered to these recipients; ")
        replies = self._send_replies((job.postmaster,), subject, about + "the original is attached.\n"
                                     "Forward it to them once the problem is understood.\n", job.original.raw)
        if replies is None or all(reply.code // 100 == 2 for reply in replies.values()):
            return replies is not None
        if any(reply.code // 100 != 5 for reply in replies.values()):
            return False                        # deferred: the retry sends it again
        kept = job.keep_backup(job.original.raw, list(leaf.recipients), leaf.step, failure=str(leaf.verdict))
        if kept is None:
            return False
        log.warning("%s: the report with the original was refused; the original is kept as %s", job.run_id, kept.stem)
        return self._send((job.postmaster,), subject, about + "the report with the original attached was "
                          f"refused by the next hop, so the original is kept as\n{kept}.\n"
                          f"ispmailgate quarantine show {kept.stem} shows it; once the problem is understood,\n"
                          f"ispmailgate quarantine release {kept.stem} delivers it to them.\n", None)

    def send_notices(self) -> None:
        for notice in self.job.notices:
            recipients = tuple(r for r in notice.recipients if r)
            if recipients:
                self._send(recipients, notice.subject, notice.text,
                           self.job.original.raw if notice.attach_original else None)

    def bounce(self, rejected: dict[str, Result]) -> bool:
        """A delivery status notification (RFC 3464) to the sender for rejected recipients.

        If the sender cannot be told and the others already have the message, the
        postmaster gets it instead: a retry would deliver to them twice."""
        to = self.job.sender or self.job.postmaster     # never bounce a bounce to <>
        lines = [f"Your message could not be delivered to {len(rejected)} recipient(s):", ""]
        lines += [f"<{one_line(rcpt)}>: {result.status} {one_line(result.text)}" for rcpt, result in rejected.items()]
        status = [f"Reporting-MTA: dns; {hostname()}", ""]
        for rcpt, result in rejected.items():
            status += [f"Final-Recipient: rfc822; {one_line(rcpt)}", "Action: failed",
                       f"Status: {result.status}", f"Diagnostic-Code: smtp; {one_line(result.text)}", ""]
        subject = "Undelivered Mail Returned to Sender"
        try:
            report = _multipart_report("\n".join(lines) + "\n", "\n".join(status), original_headers(self.job.original.raw))
        except Exception as error:      # noqa: BLE001 -- see the class
            log.error("cannot write the bounce: %r", error, exc_info=True)
            return False
        if self._send((to,), subject, None, None, body=report):
            return True
        if self.handover.delivered and to != self.job.postmaster:
            log.error("the sender <%s> cannot be told that %s failed; the postmaster is", to,
                      ", ".join(one_line(r) for r in rejected))
            self._send((self.job.postmaster,), subject, None, None, body=report)
        return False

    def _send(self, recipients: tuple[str, ...], subject: str, text: str | None,
              attachment: bytes | bytearray | None, body: tuple[str, bytes] | None = None) -> bool:
        replies = self._send_replies(recipients, subject, text, attachment, body)
        return replies is not None and all(reply.code // 100 == 2 for reply in replies.values())

    def _send_replies(self, recipients: tuple[str, ...], subject: str, text: str | None,
                      attachment: bytes | bytearray | None, body: tuple[str, bytes] | None = None) -> dict | None:
        """The next hop's reply for each recipient; None when the report could not be written."""
        try:
            data = _report_message(self.job.postmaster, recipients, subject, text, attachment, body)
        except Exception as error:      # noqa: BLE001 -- see the class
            log.error("%s: cannot write report %r: %r", self.job.run_id, subject, error, exc_info=True)
            return None
        replies = self.handover("", list(recipients), self._signed(data, subject))
        for rcpt, reply in replies.items():
            if reply.code // 100 != 2:
                log.error("%s: report %r to %s failed: %s %s", self.job.run_id, subject, rcpt, reply.code, reply.text)
        return replies

    def _signed(self, data: bytes, subject: str) -> bytes:
        """The report DKIM-signed by the [[dkim]] tables of the postmaster's domain: the gate
        wrote it, so it is originating whatever the run.  Unsigned if that fails (logged):
        a report goes out past the commit point, where nothing may defer."""
        if not self.job.dkim:
            return data
        from ispmailgate_filters.mime import Message

        from ..signing import Signer

        signer = Signer(self.job.dkim, originating=True)
        try:
            tables, why = signer.plan(Message(data).top_headers())
            if not tables:
                log.debug("report %r not DKIM-signed: %s", subject, why)
                return data
            return bytes(signer.sign(b"", data, b"\n", tables)[0])
        except Exception as error:      # noqa: BLE001 -- see the class
            log.error("%s: report %r sent unsigned: DKIM signing failed: %r", self.job.run_id, subject, error)
            return data


def original_headers(raw: bytes | bytearray) -> bytes:
    """The original's header block as it came, for a bounce (at most 64 KB, cut at a line
    end): a slice, never a parse, as a bounce goes out after delivery."""
    block = bytes(raw[:min(header_block_end(raw), 64 * 1024)])
    return block if block.endswith(b"\n") or b"\n" not in block else block[:block.rindex(b"\n") + 1]


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
    text_part = _text_part(loggable(text or "").encode("utf-8"))
    if attachment is None:
        return head + text_part
    boundary = new_boundary().encode()
    return (head + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\n\n'
            + b"--" + boundary + b"\n" + text_part + b"\n--" + boundary + b"\n"
            + _attached(b"message/rfc822", b"Content-Disposition: attachment\n", attachment)
            + b"--" + boundary + b"--\n")


def _multipart_report(text: str, status: str, headers: bytes) -> tuple[str, bytes]:
    from ispmailgate_filters.mime import new_boundary

    boundary = new_boundary()
    mark = f"--{boundary}\n".encode()
    payload = (mark + _text_part(loggable(text).encode("utf-8")) + b"\n"
               + mark + b"Content-Type: message/delivery-status\n\n" + loggable(status).encode("utf-8") + b"\n"
               + mark + _attached(b"text/rfc822-headers", b"", headers)
               + f"\n--{boundary}--\n".encode())
    return f'multipart/report; report-type=delivery-status; boundary="{boundary}"', payload


# A line longer than SMTP allows (RFC 5321 4.5.3.1.6: 998 octets) makes a next hop refuse
# the whole report; the message itself may carry one (it is the sender's), a report may not.
# A bare CR does not end a line for SMTP: it counts.
_TOO_LONG = re.compile(rb"[^\n]{999}")


def _attached(content_type: bytes, fields: bytes, data: bytes | bytearray) -> bytes:
    """A part holding *data* as it came, ending in a newline; base64 when a line of it is
    too long to be sent (then an original is application/octet-stream, as RFC 2046 allows
    message/rfc822 no encoding)."""
    if not _TOO_LONG.search(data):
        return (b"Content-Type: " + content_type + b"\n" + fields + b"\n"
                + bytes(data) + (b"" if data.endswith(b"\n") else b"\n"))
    import base64

    if content_type == b"message/rfc822":
        content_type = b'application/octet-stream; name="original.eml"'
        fields = b'Content-Disposition: attachment; filename="original.eml"\n'
    return (b"Content-Type: " + content_type + b"\n" + fields + b"Content-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(bytes(data)))


def _text_part(text: bytes) -> bytes:
    """The report's own words (which quote addresses and replies of any length)."""
    if not _TOO_LONG.search(text):
        return b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + text
    import base64

    return b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(text)
