"""``quarantine delete`` and ``quarantine purge``: entries removed, each logged."""

from __future__ import annotations

import logging

from ...status import EX_OK, EX_TEMPFAIL
from .session import Refusal, Session
from .store import Busy, Quarantine
from .times import shown

log = logging.getLogger("ispmailgate")


def delete_entries(session: Session, ids: list[str]) -> int:
    """Remove each entry; 0 when all went, 69 when one was not there, 75 when one was busy,
    78 when a quarantine or an entry could not be read."""
    code = EX_OK
    for id in dict.fromkeys(ids):
        try:
            entry = session.find(id)
            _remove(session, entry.quarantine, id, "delete")
        except Refusal as refusal:
            session.say(refusal.text)
            code = max(code, refusal.code)
            continue
        except Busy as busy:
            session.say(str(busy))
            code = EX_TEMPFAIL
            continue
        session.out.line(f"deleted {id}")
    return max(code, session.status)


def purge_entries(session: Session, older_than: float, dry_run: bool = False) -> int:
    """Remove every entry kept before ``older_than`` (seconds since the epoch), records
    left without a message included; the rest stays as it is."""
    removed = size = 0
    busy: list[str] = []
    for quarantine in session.quarantines:
        for id, kept, length in _aged(session, quarantine, older_than):
            if dry_run:
                session.out.line(f"would remove {id} ({quarantine.path}), kept {shown(kept)}")
            else:
                try:
                    _remove(session, quarantine, id, "purge")
                except Busy as error:
                    busy.append(str(error))
                    continue
            removed, size = removed + 1, size + length
    verb = "would remove" if dry_run else "removed"
    session.out.line(f"{verb} {removed} entries ({size} bytes) kept before {shown(older_than)}")
    for line in busy:
        session.say(line)
    return EX_TEMPFAIL if busy else session.status


def _aged(session: Session, quarantine: Quarantine, before: float) -> list[tuple[str, float, int]]:
    """(id, when kept, size) of the entries kept before ``before``."""
    found = []
    messages = set(quarantine.ids())
    for id in sorted({*messages, *quarantine.record_ids()}):
        entry = session.entry(quarantine, id)
        if id in messages and entry is None:        # unreadable: said, and left alone
            continue
        if entry is None:       # a record whose message is gone: its own time, else its file's
            kept, length = quarantine.record(id, quarantine.record_mtime(id)).time, 0
        else:
            kept, length = entry.record.time, entry.size
        if kept < before:
            found.append((id, kept, length))
    return found


def _remove(session: Session, quarantine: Quarantine, id: str, how: str) -> None:
    entry = quarantine.entry(id)
    if entry is None:
        quarantine.remove(id)
    else:
        with quarantine.locked(id):
            quarantine.remove(id)
    record = entry.record if entry is not None else None
    log.info("quarantine %s %s by %s: %s%s", how, id, session.who, quarantine.path,
             f", kept {shown(record.time)}, {record.verdict}, from=<{record.sender}>" if record else "")
