"""``quarantine list`` and ``quarantine show``: what is kept, for people and for scripts."""

from __future__ import annotations

import json
from typing import Any

from ispmailgate_filters.kept import Record

from ..output import printable
from .session import Session
from .store import Entry
from .times import shown

COLUMNS = ("ID", "KEPT", "SIZE", "VERDICT", "STATE", "SENDER", "RECIPIENTS", "FINDINGS")
WIDEST = {"SENDER": 32, "RECIPIENTS": 40, "FINDINGS": 60}


def list_entries(session: Session, *, as_json: bool = False, since: float | None = None,
                 verdict: str | None = None, quiet: bool = False) -> int:
    """The entries, oldest first: a table, ``--json`` objects, or ``-q`` ids alone."""
    entries = [entry for entry in session.entries()
               if (since is None or entry.record.time >= since)
               and (verdict is None or entry.record.verdict.lower() == verdict.lower())]
    if quiet:
        for entry in entries:
            session.out.line(entry.id)
    elif as_json:
        session.out.stream.write(json.dumps([described(entry) for entry in entries], indent=1).encode() + b"\n")
    else:
        _table(session, [_row(entry) for entry in entries])
    return session.status


def described(entry: Entry) -> dict[str, Any]:
    """An entry for scripts (``--json``)."""
    record = entry.record
    return {"id": record.id, "time": _iso(record.time), "epoch": int(record.time),
            "quarantine": entry.quarantine.path, "kept_by": record.kept_by or entry.quarantine.label,
            "action": record.action, "sender": record.sender, "recipients": record.recipients,
            "verdict": record.verdict, "findings": list(record.findings), "size": entry.size,
            "state": state(record), "released_to": sorted(record.released_to()),
            "releases": list(record.releases)}


def _iso(epoch: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def state(record: Record) -> str:
    """kept; delivered (went on when kept: keep/); released, or released in part; or
    release? -- a release whose outcome was never written down."""
    if record.unfinished() is not None:
        return "release?"
    released = record.released_to()
    if released:
        return "released" if record.recipients is None or set(record.recipients) <= released else "part-released"
    return "delivered" if record.action == "delivered" else "kept"


def _row(entry: Entry) -> list[str]:
    record = entry.record
    return [record.id, shown(record.time)[:16], _size(entry.size), record.verdict or "-", state(record),
            _address(record.sender), ", ".join(map(_address, record.recipients)) if record.recipients else "?",
            "; ".join(f"{f['object']}: {f['detail'] or f['verdict']}" for f in record.findings) or "-"]


def _table(session: Session, rows: list[list[str]]) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [min(max(len(row[i]) for row in [list(COLUMNS), *rows]), WIDEST.get(name, 1 << 10))
              for i, name in enumerate(COLUMNS)]
    for row in [list(COLUMNS), *rows]:
        cells = [_cut(cell, width).ljust(width) for cell, width in zip(row, widths)]
        session.out.line("  ".join(cells).rstrip())
    if not rows:
        session.out.line("(nothing kept)")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _size(size: int) -> str:
    for unit in ("", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size}{unit}" if not unit or size >= 10 else f"{size:.1f}{unit}"
        size /= 1024
    return str(size)


def _address(address: str | None) -> str:
    return "?" if address is None else f"<{address}>"


def show_entry(session: Session, id: str) -> int:
    """The envelope, the findings, the releases and the message's header block."""
    entry = session.find(id)
    record, out = entry.record, session.out
    out.line(f"id:          {record.id}")
    out.line(f"quarantine:  {entry.quarantine.path} ({entry.quarantine.label})")
    out.line(f"kept:        {shown(record.time)} by {record.kept_by or entry.quarantine.label}: {record.action}")
    out.line(f"size:        {entry.size} bytes" + (f", sha256 {record.sha256}" if record.sha256 else ""))
    out.line(f"sender:      {_address(record.sender)}")
    out.line(f"recipients:  {', '.join(map(_address, record.recipients)) if record.recipients else '? (not kept)'}")
    out.line(f"verdict:     {record.verdict or '-'}")
    out.line(f"state:       {state(record)}")
    for number, finding in enumerate(record.findings):
        out.line(f"{'findings:' if number == 0 else '':13}{finding['object']}: {finding['verdict']}: "
                 f"{finding['detail']}")
    for release in record.releases:
        out.line(f"release:     {_release(release)}")
    header, cut = entry.quarantine.header(id)
    out.line("header:")
    for line in header.decode("utf-8", "surrogateescape").rstrip("\r\n").splitlines():
        out.line("  " + line.expandtabs(8))
    if cut:
        out.line("  (the header goes on: only its first 64 KiB are shown)")
    return session.status


def _release(release: dict[str, Any]) -> str:
    results = release.get("results") or {}
    answers = "; ".join(f"<{rcpt}> {result.get('state')} ({result.get('reply', '')})"
                        for rcpt, result in results.items() if isinstance(result, dict))
    forced = " (forced)" if release.get("forced") else ""
    return (f"{release.get('time', '?')} by {release.get('by', '?')} via {release.get('hop', '?')}{forced}: "
            + (answers or "started, no answer written down (the outcome is unknown)"))
