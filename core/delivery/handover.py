"""The hand-over: the one way anything leaves for a next hop, and the commit point."""

from __future__ import annotations

import logging

from .wire import Reply

log = logging.getLogger("ispmailgate")


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
