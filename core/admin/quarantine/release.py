"""``quarantine release``: a kept message to the rule file's next hop, byte for byte, with
its original envelope (or the one given), without running any chain again.

The entry is locked while it is released, and the release is written down in its record
before the next hop is given the message and again with the next hop's answers: a
recipient the next hop accepted it for is never sent it again without ``--force``, and a
release whose answers were never written down (a crash, a full disk) stops the next one
until the administrator has looked.  Exit 0 when the next hop accepted it for every
recipient, 75 when it deferred any (a second ``release`` sends to those alone), 69 when it
refused any for good or the release itself is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

from ispmailgate_filters.kept import Record

from ...delivery.hops import configured_hop
from ...envelope import envelope_addresses
from ...status import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, Stop
from .session import Refusal, Session
from .store import Busy, Quarantine, read_all

log = logging.getLogger("ispmailgate")
STATES = {2: "accepted", 4: "deferred", 5: "refused"}


def release_entry(session: Session, id: str, *, to: list[str] | None = None, sender: str | None = None,
                  force: bool = False) -> int:
    """Release ``id`` (see the module); the exit status."""
    entry = session.find(id)
    quarantine = entry.quarantine
    try:
        with quarantine.locked(id) as descriptor:
            record = quarantine.record(id, os.fstat(descriptor).st_mtime)     # as it is now, locked
            sender, recipients = _envelope(session, record, to, sender, force)
            data = read_all(descriptor)
            if record.sha256 and hashlib.sha256(data).hexdigest() != record.sha256 and not force:
                raise Refusal(EX_UNAVAILABLE, f"{id}: the kept message changed since it was kept (its sha256 "
                                              "is not the record's): --force to release it as it is now")
            return _deliver(session, quarantine, record, data, sender, recipients, force)
    except Busy as busy:
        raise Refusal(EX_TEMPFAIL, str(busy)) from None


def _envelope(session: Session, record: Record, to: list[str] | None, sender: str | None,
              force: bool) -> tuple[str, list[str]]:
    """The envelope of this release, checked as a run checks one; refused where a release
    could deliver twice (unless forced)."""
    _refuse_twice(record, force)
    sender = record.sender if sender is None else sender
    recipients = to or record.recipients
    if sender is None or not recipients:
        raise Refusal(EX_UNAVAILABLE, f"{record.id}: no envelope was kept with it: give --from and --to")
    try:
        sender, usable, refused = envelope_addresses(session.config, sender, list(recipients))
    except Stop as stop:
        raise Refusal(stop.code, f"{record.id}: {stop.text}") from None
    if refused:
        raise Refusal(EX_UNAVAILABLE, "; ".join(f"<{r}>: {result.text}" for r, result in refused.items()))
    return sender, usable if force else _not_twice(record, usable, named=bool(to))


def _not_twice(record: Record, recipients: list[str], named: bool) -> list[str]:
    """The recipients without the message yet: named ones (--to) that have it are refused,
    the kept ones that have it left out."""
    already = record.released_to()
    had = {_same(r) for r in already}      # a domain is the same in any case
    again = [r for r in recipients if _same(r) in had]
    if named and again:
        raise Refusal(EX_UNAVAILABLE, f"{record.id} was released to {_addresses(again)} already: "
                                      "--force to release it to them again")
    rest = [r for r in recipients if _same(r) not in had]
    if not rest:
        raise Refusal(EX_UNAVAILABLE, f"{record.id} was released already (to {_addresses(sorted(already))}): "
                                      "--force to release it again")
    return rest


def _same(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address


def _refuse_twice(record: Record, force: bool) -> None:
    if force:
        return
    if record.action == "delivered":
        raise Refusal(EX_UNAVAILABLE, f"{record.id} was delivered when it was kept ({record.verdict or 'a copy'}): "
                                      "a release would deliver it again; --force to do so")
    unfinished = record.unfinished()
    if unfinished is not None:
        raise Refusal(EX_UNAVAILABLE, f"{record.id}: the release of {unfinished.get('time')} by "
                                      f"{unfinished.get('by')} never wrote down the next hop's answer, which "
                                      "may have the message (see its log): --force to release it again")


def _deliver(session: Session, quarantine: Quarantine, record: Record, data: bytes, sender: str,
             recipients: list[str], force: bool) -> int:
    hop = configured_hop(session.config)
    release = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": session.who,
               "sender": sender, "to": recipients, "hop": str(hop), "forced": force, "state": "started"}
    started = record.with_release(release)
    try:
        quarantine.save(started)
    except OSError as error:
        raise Refusal(EX_TEMPFAIL, f"{record.id}: cannot write down the release in {quarantine.path}: "
                                   f"{error.strerror or error}; nothing was sent") from None
    results = _hand_over(hop, sender, recipients, data)
    try:        # from here on nothing raises: what the next hop accepted must never end in 75
        _written_down(session, quarantine, started.with_release(
            {**release, "state": "done", "results": results}, len(record.releases)))
        log.info("quarantine release %s by %s%s: from=<%s> to=%s via %s: %s", record.id, session.who,
                 " (forced)" if force else "", sender, ",".join(f"<{r}>" for r in recipients), hop,
                 "; ".join(f"<{r}> {result['state']} ({result['reply']})" for r, result in results.items()))
        for recipient, result in results.items():
            session.out.line(f"<{recipient}>: {result['state']}: {result['reply']}")
    except Exception as error:      # noqa: BLE001
        log.error("quarantine release %s: %r", record.id, error, exc_info=True)
    return _status(session, record.id, results)


def _written_down(session: Session, quarantine: Quarantine, record: Record) -> None:
    try:
        quarantine.save(record)
    except Exception as error:      # noqa: BLE001 -- the release happened all the same
        log.error("quarantine release %s: cannot write down the answers: %r", record.id, error)
        session.say(f"{record.id}: the next hop's answers could not be written down ({error}): "
                    "the next release is refused until --force")


def _hand_over(hop, sender: str, recipients: list[str], data: bytes) -> dict[str, dict[str, str]]:
    """The next hop's answer per recipient (a hop settles its own trouble as a reply)."""
    from ...delivery.wire import Reply
    from ...status import LOCAL_TROUBLE

    try:
        replies = hop.deliver(sender, recipients, data)
    except Exception as error:      # noqa: BLE001 -- a fault of ours: nothing was accepted
        log.error("%s: internal error: %r", hop, error, exc_info=True)
        replies = {r: Reply(451, f"{LOCAL_TROUBLE} internal error: {error!r}") for r in recipients}
    return {r: {"state": STATES.get(reply.code // 100, "deferred"), "reply": str(reply)}
            for r, reply in replies.items()}


def _status(session: Session, id: str, results: dict[str, dict[str, str]]) -> int:
    states = {result["state"] for result in results.values()}
    if "deferred" in states:
        code = EX_TEMPFAIL
    elif "refused" in states:
        code = EX_UNAVAILABLE
    else:
        return EX_OK
    missing = [r for r, result in results.items() if result["state"] != "accepted"]
    session.say(f"{id}: not released to {_addresses(missing)}" +
                ("; release it again later to send it to them" if code == EX_TEMPFAIL else ""))
    return code


def _addresses(recipients) -> str:
    return ", ".join(f"<{r}>" for r in recipients)
