"""Delivery groups: leaves whose results are identical merged, each made ready (bytes, ARC
seal, backup) while the time limit still holds, then handed over once for all its
recipients."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from ispmailgate_filters.base import Discard, Notice, Reject
from ispmailgate_filters.mime import Message

from ..outcome import Result
from .handover import hand_over
from .hops import StdoutHop
from .reports import Reports

log = logging.getLogger("ispmailgate")


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
            from ..arc import Sealer
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
