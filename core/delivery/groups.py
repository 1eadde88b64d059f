"""Delivery groups: leaves whose results are identical merged, each made ready (bytes, DKIM
signatures, ARC seal, backup) while the time limit still holds, then handed over once for
all its recipients."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from ispmailgate_filters.base import Discard, Notice, Reject
from ispmailgate_filters.mime import Message

from ..outcome import Result
from ..status import DONE, LOCAL_TROUBLE, UNSIGNABLE, Stop, of_error, tempfail
from .handover import Handover, Job
from .spool import Finished
from .wire import Payload

log = logging.getLogger("ispmailgate")


class Transfer(NamedTuple):
    """One delivery group made ready: its recipients and bytes, or the verdict that ended it."""
    recipients: list[str]
    data: bytes | bytearray | Finished | None      # Finished: a result waiting in its spool file
    leaf: Any
    refused: Result | None = None       # the result the group gets instead of a hand-over


class Delivery:
    """Hands each distinct result to the next hop once, for all of its recipients.

    In two stages around the commit point: :meth:`prepare` does all the work (the bytes of
    each group, DKIM signatures, ARC seals, the backup of an unparsable original) while the
    time limit can still stop the run, and a signature that cannot be made stops it (75);
    :meth:`deliver` only hands over, and from the first hand-over on nothing the gate does
    can make the run end in 75 except a recipient whose message no next hop accepted.

    For a caller that takes a status per recipient (LMTP, ``Job.per_recipient``) each group
    stands alone: a deferred one holds back only its own recipients, and the caller, not
    the gate, tells the sender about refused ones.
    """

    def __init__(self, job: Job, handover: Handover) -> None:
        self.job, self.handover, self.hop = job, handover, handover.hop
        self.sealer = self.signer = None

    def prepare(self, leaves: list) -> list[Transfer]:
        transfers = []
        groups = self.groups(leaves, self.job.unsigned)
        self.hop.expect(sum(1 for _, _, leaf in groups if leaf.verdict is None))
        unparsed = [leaf for _, _, leaf in groups if leaf.unparsed and leaf.verdict is None]
        if unparsed:        # one copy kept and one notice for the message, however many groups
            self._unparsed(unparsed)
        for recipients, message, leaf in groups:
            if leaf.verdict is not None:
                transfers.append(Transfer(recipients, None, leaf))
                continue
            content = data = message.to_bytes()
            if self.job.dkim and recipients[0] not in self.job.unsigned:
                data = self._sign(self.job.original, message, data, recipients)
                if isinstance(data, Result):        # the message's own fault: refused for good
                    transfers.append(Transfer(recipients, None, leaf, data))
                    continue
            if message.changed and self.job.arc:
                data = self._seal(self.job.original, message, data, recipients)
            if isinstance(message, Finished) and message.path is not None:
                # signing and sealing put fields on top: those wait in memory, the rest in its file
                whole, data = data, message.with_head(bytes(data[:len(data) - len(content)]))
                data.size, data.ascii = len(whole), whole.isascii()     # for MAIL FROM, before DATA
            transfers.append(Transfer(recipients, data, leaf))
        return transfers

    def deliver(self, transfers: list[Transfer],
                refused: dict[str, Result] | None = None) -> tuple[dict[str, Result], tuple[str, ...]]:
        """Each group in turn, then the notices and the bounce: the result of each recipient,
        and the refused recipients whose sender could not be told.  ``refused`` are
        recipients no next hop could be given.  Once a group is deferred the rest wait for
        the MTA's retry too: handed over now, they would be delivered twice.  To a hop that
        ``holds_groups`` (SMTP) the groups go all at once, every one's recipients answered
        before any is sent, so that none is accepted before another is deferred."""
        results: dict[str, Result] = dict(refused or {})
        deferred = False
        together = self._together(transfers)
        # The postmaster's reports of failed filters first: one that must be retried then
        # holds back every result, before anything was handed over (never a duplicate).
        for transfer in sorted(transfers, key=lambda t: not _failed(t.leaf.verdict)):
            verdict = transfer.leaf.verdict
            if transfer.refused is not None:
                outcome = dict.fromkeys(transfer.recipients, transfer.refused)
            elif isinstance(verdict, (Discard, Reject)):
                outcome = self._verdict(transfer.leaf)
            elif deferred and not self.job.per_recipient:
                outcome = dict.fromkeys(transfer.recipients, Result(
                    "deferred", LOCAL_TROUBLE, "not handed over: an earlier delivery group was deferred"))
            elif verdict is not None:
                outcome = self._verdict(transfer.leaf)
            elif together is not None:
                together.append(transfer)       # handed over below, all at once
                continue
            else:
                outcome = self._hand_over(transfer)
            deferred = deferred or any(result.state == "deferred" for result in outcome.values())
            results.update(outcome)
        if together:
            outcome = self._hand_over_together(together, deferred)
            deferred = deferred or any(result.state == "deferred" for result in outcome.values())
            results.update(outcome)
        if not self.hop.carries_reports:
            for notice in self.job.notices:
                log.warning("not sent in stdout mode: %r to %s", notice.subject, ",".join(notice.recipients))
        elif self.job.notices and not (deferred and self._all_wait(results)):
            self._reports().send_notices()      # (a retry of everyone would send them again)
        if self.job.per_recipient:
            return results, ()
        return results, (() if deferred else self._bounce(results))

    def _all_wait(self, results: dict[str, Result]) -> bool:
        """Does every recipient wait for a retry (one-shot: one deferral defers them all)?"""
        return not self.job.per_recipient or all(r.state == "deferred" for r in results.values())

    def _together(self, transfers: list[Transfer]) -> list[Transfer] | None:
        """An empty list to collect the groups in, if they are to be handed over together:
        more than one, to a hop that ``holds_groups`` (SMTP).  Handed over one after
        another, a group accepted before another is deferred would be delivered again by
        the MTA's retry.  Not per recipient (LMTP): a deferral there holds back only itself."""
        if self.job.per_recipient or not self.hop.holds_groups:
            return None
        handed = [t for t in transfers if t.refused is None and t.leaf.verdict is None]
        return [] if len(handed) > 1 else None

    def _hand_over_together(self, transfers: list[Transfer], deferred: bool) -> dict[str, Result]:
        """Every group at once: each transaction gets its recipients before any message is
        sent, so a recipient deferred in one group sends nothing (SmtpHop.deliver_groups)."""
        if deferred:        # a report of a failed filter must be retried: nothing goes now
            return {r: Result("deferred", LOCAL_TROUBLE, "not handed over: an earlier delivery group "
                              "was deferred") for t in transfers for r in t.recipients}
        groups = [(t.recipients, _payload(t.data)) for t in transfers]
        replies = self.handover.groups(self.job.sender, groups)
        return {r: reply.result() for r, reply in replies.items()}

    def _hand_over(self, transfer: Transfer) -> dict[str, Result]:
        """One group to the next hop; a spooled result is read back for it, and only for it."""
        data = transfer.data
        if isinstance(data, Finished):
            try:
                data = data.to_bytes()
            except Stop as stop:        # its file went away: these recipients wait for the retry
                log.error("%s", stop)
                return dict.fromkeys(transfer.recipients, Result("deferred", stop.status, stop.text))
        replies = self.handover(self.job.sender, transfer.recipients, data)
        return {r: reply.result() for r, reply in replies.items()}

    def _bounce(self, results: dict[str, Result]) -> tuple[str, ...]:
        """Some recipients refused for good and others not: a 69 would bounce those too, so
        the sender gets our own delivery status notification for the refused ones.  Returns
        the refused recipients it could not be sent for (past the commit point: never raises)."""
        rejected = {rcpt: result for rcpt, result in results.items() if result.state == "rejected"}
        if not rejected or len(rejected) == len(results) or not self.hop.carries_reports:
            return ()
        try:
            sent = self._reports().bounce(rejected)
        except Exception as error:      # noqa: BLE001 -- a fault of ours must not make a retry
            log.error("cannot send the bounce: %r", error, exc_info=True)
            sent = False
        return () if sent else tuple(rejected)

    def _reports(self):
        from .reports import Reports     # only a run that reports something pays for it

        return Reports(self.job, self.handover)

    def _sign(self, original: Message, message: Message, data: bytes | bytearray,
              recipients: list[str]) -> bytes | bytearray | Result:
        """DKIM signatures for a result whose From: is in a [[dkim]] domain.  One that cannot
        be made defers the run (nothing has been handed over yet): never unsigned instead;
        unless the message is at fault: then its recipients' result, refused for good.  A
        header block readers may see otherwise than dkimpy goes out unsigned."""
        from ..signing import NotSigned, failure_status

        if self.signer is None:
            from ..signing import Signer
            self.signer = Signer(self.job.dkim, self.job.originating)
        whom = ",".join(recipients)
        tables, why = self.signer.plan(message.top_headers())
        if not tables:
            from ..signing import NOT_ORIGINATING       # mail from outside claiming our domain: said

            log.log(logging.INFO if why.startswith(NOT_ORIGINATING) else logging.DEBUG,
                    "not DKIM-signed for %s: %s", whom, why)
            return data
        started = time.monotonic()
        names = ", ".join(f"{t.domain} (s={t.selector})" for t in tables)
        try:
            signed, signers = self.signer.sign(original.raw, data, message.eol, tables)
        except NotSigned as why:
            log.warning("not DKIM-signed as %s for %s: %s", names, whom, why)
            return data
        except Exception as error:      # dkimpy's, the key's, or ours: the status line says which
            log.error("DKIM signing as %s failed for %s: %r", names, whom, error)
            status = failure_status(error)
            if status == UNSIGNABLE:
                return Result("rejected", status, f"DKIM signing as {names} refused the message: {error}")
            raise tempfail(status, f"DKIM signing as {names} failed: {error}") from None
        for table in tables:
            if table not in signers:
                log.info("not DKIM-signed again for %s: unchanged, and %s (s=%s) signed it already",
                         whom, table.domain, table.selector)
        if signers:
            log.info("DKIM-signed as %s for %s in %.1f ms", ", ".join(f"{t.domain} (s={t.selector})" for t in signers),
                     whom, (time.monotonic() - started) * 1000)
        return signed

    def _seal(self, original: Message, message: Message, data: bytes, recipients: list[str]) -> bytes:
        """An ARC set for a changed message.  If this machine cannot seal (a module, memory,
        a file), nothing is delivered and the MTA retries; if the message cannot be sealed
        (dkimpy refuses its fields, its chain is undecided or full, its header block is too
        big to hand dkimpy: its cost grows with it), it goes out unsealed and the log says
        why.  Unsealed, not refused: the seal is the gateway's note, the mail is not wrong
        without it."""
        from ..dkim_header import MAX_FIELDS, read_block

        if self.sealer is None:
            from ..arc import Sealer
            from ..dkim_linear import install

            install()
            self.sealer = Sealer(self.job.arc)
        if max(read_block(original.raw).fields, read_block(data).fields) > MAX_FIELDS:
            log.warning("not ARC sealed for %s: more than %d header fields", ",".join(recipients), MAX_FIELDS)
            return data
        started = time.monotonic()
        try:
            sealed = self.sealer.seal(original.raw, data, message.eol)
        except (ImportError, MemoryError, OSError) as error:
            log.error("ARC sealing failed for %s: %r; nothing is delivered", ",".join(recipients), error)
            raise tempfail(of_error(error), f"ARC sealing failed: {error!r}") from None
        except Exception as error:      # the message's own doing: it is still delivered
            log.error("ARC sealing failed for %s, delivered unsealed: %r", ",".join(recipients), error)
            return data
        log.info("ARC sealed for %s in %.1f ms", ",".join(recipients), (time.monotonic() - started) * 1000)
        return sealed

    @staticmethod
    def groups(leaves: list, unsigned: frozenset[str] = frozenset()) -> list[tuple[list[str], Message | None, Any]]:
        """Merge leaves whose resulting bytes are identical: one transaction for them all.
        Recipients whose rule turns DKIM signing off (``unsigned``) go apart from the others."""
        import hashlib

        groups: list[tuple[list[str], Message | None, Any]] = []
        merged: dict[Any, list[str]] = {}
        for leaf in leaves:
            if leaf.message is None:
                groups.append((leaf.recipients, leaf.message, leaf))
                continue
            # a digest, not the bytes: holding every result until delivery would cost a copy each
            digest = ("unchanged" if not leaf.message.changed else getattr(leaf.message, "digest", None)
                      or hashlib.sha256(leaf.message.to_bytes()).digest())
            for recipients in by_signing(leaf.recipients, unsigned):
                key = (digest, recipients[0] in unsigned)
                if key in merged:
                    merged[key].extend(recipients)
                else:
                    merged[key] = list(recipients)
                    groups.append((merged[key], leaf.message, leaf))
        return groups

    def _verdict(self, leaf) -> dict[str, Result]:
        verdict = leaf.verdict
        if isinstance(verdict, Discard):
            return {r: Result("discarded", verdict.status, f"by {leaf.step}: {verdict}") for r in leaf.recipients}
        if isinstance(verdict, Reject):
            return {r: Result("rejected", verdict.status, f"{leaf.step}: {verdict}") for r in leaf.recipients}
        # FilterError with on_filter_error = "report": the postmaster gets the original.
        if not self.hop.carries_reports:
            return {r: Result("deferred", LOCAL_TROUBLE, f"{leaf.step}: {verdict}") for r in leaf.recipients}
        sent = self._reports().filter_error(leaf)
        state = ("reported", DONE, f"to the postmaster: {leaf.step}: {verdict}") if sent else \
                ("deferred", LOCAL_TROUBLE, f"{leaf.step}: {verdict}; the report to the postmaster failed")
        return {r: Result(*state) for r in leaf.recipients}

    def _unparsed(self, leaves: list) -> None:
        job = self.job
        recipients = list(dict.fromkeys(r for leaf in leaves for r in leaf.recipients))
        why = leaves[0].unparsed if isinstance(leaves[0].unparsed, str) else ""
        kept = job.keep_backup(job.original.raw, recipients, why)
        text = (f"ispmailgate could not parse message {job.run_id} (from <{job.sender}> to "
                f"{', '.join(recipients)}).\nIts chain ran on it unparsed, each step as it "
                "declares (on_parse_error = \"deliver\"), and it was delivered."
                f"\nA copy of the original is kept in {kept or '(nowhere: keeping failed, see the log)'}.\n")
        job.notices.append(Notice((job.postmaster,), "ispmailgate: message delivered "
                                  "unparsed (parse error)", text))


def _payload(data: bytes | bytearray | Finished) -> Payload:
    """A group's message for ``deliver_groups``: a spooled result is read back at its DATA."""
    if isinstance(data, Finished):      # measured in prepare, while its bytes were in hand
        return Payload(data.size, data.ascii, data.to_bytes)
    return Payload.of(data)


def _failed(verdict) -> bool:
    """A filter's failure (reported to the postmaster), not a Discard or a Reject."""
    return verdict is not None and not isinstance(verdict, (Discard, Reject))


def by_signing(recipients: list[str], unsigned: frozenset[str]) -> list[list[str]]:
    """The recipients to sign for and those not to, each list only if it has any."""
    if not unsigned:
        return [recipients]
    signed = [r for r in recipients if r not in unsigned]
    apart = [r for r in recipients if r in unsigned]
    return [group for group in (signed, apart) if group]
