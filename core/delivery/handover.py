"""What a run hands delivery (a Job, never the run itself), and the hand-over: the one way
anything leaves for a next hop, with the commit point."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ispmailgate_filters.base import Notice
from ispmailgate_filters.mime import Message

from ..process import time_limit
from ..status import LOCAL_TROUBLE
from .hops import NextHop
from .wire import Payload, Reply

log = logging.getLogger("ispmailgate")


class Job(NamedTuple):
    """What delivery needs of the run that hands it over."""
    run_id: str
    sender: str
    original: Message               # as it came: attached to reports, its header block in bounces
    postmaster: str
    notices: list[Notice]           # the filters'; delivery adds its own, then sends them all
    keep_backup: Callable[..., Path | None]     # an original kept in tmp_dir/keep/ (Gate.keep_backup)
    arc: Any = None                 # the rule file's [arc] settings; None: nothing is sealed
    dkim: Any = None                # the rule file's [[dkim]] tables; None: nothing is signed
    unsigned: frozenset[str] = frozenset()      # recipients whose rule says dkim = false
    originating: bool = False       # the run's --originating: the MTA's own users' mail
    per_recipient: bool = False     # the caller takes a status per recipient (LMTP): see Delivery


class Handover:
    """The one way anything leaves for a next hop: the message, reports, notices.

    The time limit is checked before the hand-over starts as long as nothing was accepted,
    and never interrupts one (the hop bounds each step by delivery_timeout): an alarm
    between the next hop's 250 and our reading it would otherwise turn an accepted message
    into a retry.  A 2xx reply is the commit point (``delivered``).
    """

    def __init__(self, hop: NextHop, clock: time_limit) -> None:
        self.hop, self.clock = hop, clock
        self.delivered = False

    def __call__(self, sender: str, recipients: list[str], data: bytes | bytearray) -> dict[str, Reply]:
        return self._settle(recipients, lambda: self.hop.deliver(sender, recipients, data))

    def groups(self, sender: str, groups: list[tuple[list[str], Payload]]) -> dict[str, Reply]:
        """Several delivery groups at once, to a hop that ``holds_groups`` (see SmtpHop)."""
        recipients = [r for group, _ in groups for r in group]
        return self._settle(recipients, lambda: self.hop.deliver_groups(sender, groups))

    def _settle(self, recipients: list[str], hand: Callable[[], dict[str, Reply]]) -> dict[str, Reply]:
        self.clock.shield()
        if not self.delivered:
            self.clock.check()
        try:
            replies = hand()
        except Exception as error:      # the hops settle their own failures: this is a fault of ours
            log.error("%s: internal error: %r", self.hop, error, exc_info=True)
            replies = {r: Reply(451, f"{LOCAL_TROUBLE} {self.hop}: internal error: {error!r}") for r in recipients}
        if any(reply.code // 100 == 2 for reply in replies.values()):
            self.delivered = True
        return replies
