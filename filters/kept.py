"""Kept copies: messages the gateway keeps on disk, and the record beside each.

One format for every writer -- virscan's quarantine (discarded mail), the core's
``tmp_dir/keep/`` (mail the parser gave up on, delivered unchanged), a plug-in that keeps
copies -- and for ``ispmailgate quarantine``, which reads them back.

An entry is two files in a directory of the gateway user's own (0700, files 0600), named
by its id, ``YYYYmmdd-HHMMSS-RUNID-XXXXXX`` (local time of keeping, the run id of the log
lines, six random hex digits):

- ``ID.eml``: the message, byte for byte as it was kept;
- ``ID.json``: its record (format 2): ``format``, ``id``, ``time`` (ISO 8601, UTC),
  ``kept_by`` (the filter step, or ``ispmailgate``), ``action`` (``discarded``: only this
  copy is left; ``delivered``: the message went on as well), ``sender`` and
  ``recipients`` (the envelope; "" is the null sender), ``verdict``, ``findings`` (a list
  of ``object``, ``verdict``, ``detail``), ``size`` and ``sha256`` of ``ID.eml``, and
  ``releases``, which ``ispmailgate quarantine release`` appends to: each with ``time``,
  ``by`` (who released it), ``sender``, ``to``, ``hop``, ``forced``, ``state``
  (``started`` before the next hop is given the message, ``done`` once its answers are
  written down) and ``results`` (per recipient: ``state`` accepted, deferred or refused,
  and the ``reply``).

Both are written under a temporary name, flushed to disk and then linked into place,
record first: a visible ``ID.eml`` is complete and has its record.  Older forms are still
read: virscan's record without ``format`` (sender, recipients, verdict, findings), and
keep/ copies without a record, named ``YYYYmmdd-HHMMSS-RUNID``; their time is the file's.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .files import create_in, private_directory

FORMAT = 2
# The names the gateway makes, and nothing else: no dot, no slash, so never a path.
ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9A-Za-z]{1,20}(?:-[0-9a-f]{6})?")
MESSAGE, RECORD = ".eml", ".json"
MAX_RECORD = 16 << 20       # a record is read whole: bounded, whatever wrote it


def is_id(text: str) -> bool:
    return ID.fullmatch(text) is not None


def new_id(run_id: str, now: float | None = None) -> str:
    """A fresh id: the run id of the log (only letters and digits kept) and a random tail."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    run = re.sub(r"[^0-9A-Za-z]", "", run_id)[:20] or "0"
    return f"{stamp}-{run}-{os.urandom(3).hex()}"


@dataclass(frozen=True)
class Record:
    """What is known of a kept copy besides its bytes."""
    id: str
    time: float                          # when it was kept (seconds since the epoch)
    kept_by: str = ""
    action: str = "discarded"            # discarded | delivered
    sender: str | None = None            # None: not kept (an old keep/ copy)
    recipients: tuple[str, ...] | None = None
    verdict: str = ""
    findings: tuple[dict[str, str], ...] = ()
    size: int | None = None
    sha256: str | None = None
    releases: tuple[dict[str, Any], ...] = ()
    format: int = FORMAT

    def to_json(self) -> bytes:
        data = {"format": self.format, **asdict(self), "time": _iso(self.time)}
        return json.dumps(data, indent=1, ensure_ascii=True).encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes | None, id: str, mtime: float, *, delivered: bool = False) -> Record:
        """The record of entry ``id`` (``raw``: its JSON, None if there is none), older
        forms filled in: no time, the file's; no record, an unknown envelope."""
        data = json.loads(raw) if raw is not None else {}
        if not isinstance(data, dict):
            raise ValueError("a record is a JSON object")
        older = data.get("format") is None
        findings = tuple({key: str(f.get(key, "")) for key in ("object", "verdict", "detail")}
                         for f in data.get("findings") or () if isinstance(f, dict))
        recipients = data.get("recipients")
        return cls(id=id, time=_epoch(data.get("time"), mtime),
                   kept_by=str(data.get("kept_by") or ""),
                   action=str(data.get("action") or ("delivered" if delivered and raw is None else "discarded")),
                   sender=_text(data.get("sender")),
                   recipients=tuple(map(str, recipients)) if isinstance(recipients, list) else None,
                   verdict=str(data.get("verdict") or ("unparsable" if delivered and raw is None else "")),
                   findings=findings, size=_number(data.get("size")), sha256=_text(data.get("sha256")),
                   releases=tuple(r for r in data.get("releases") or () if isinstance(r, dict)),
                   format=1 if older else int(data["format"]))

    def released_to(self) -> set[str]:
        """Recipients a next hop accepted this message for in a release."""
        return {recipient for release in self.releases
                for recipient, result in (release.get("results") or {}).items()
                if isinstance(result, dict) and result.get("state") == "accepted"}

    def unfinished(self) -> dict[str, Any] | None:
        """A release that started and never wrote down what the next hop answered."""
        return next((release for release in self.releases if release.get("state") == "started"), None)

    def with_release(self, release: dict[str, Any], index: int | None = None) -> Record:
        """This record with ``release`` appended, or put in place of the one at ``index``."""
        releases = list(self.releases)
        if index is None:
            releases.append(release)
        else:
            releases[index] = release
        return replace(self, releases=tuple(releases), format=FORMAT)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _epoch(value: Any, fallback: float) -> float:
    from datetime import datetime

    if not isinstance(value, str):
        return fallback
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return fallback


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- writing ------------------------------------------------------------------------------

def keep(directory: str, data: bytes, *, run_id: str, sender: str, recipients: tuple[str, ...] | list[str],
         kept_by: str, action: str, verdict: str, findings: tuple[dict[str, str], ...] = ()) -> Path:
    """Keep ``data`` as a new entry in ``directory`` (created 0700 where missing, which
    must be this user's own): the path of its message.  An OSError leaves nothing behind."""
    import hashlib

    entry = new_id(run_id)
    record = Record(id=entry, time=time.time(), kept_by=kept_by, action=action, sender=sender,
                    recipients=tuple(recipients), verdict=verdict,
                    findings=tuple({key: str(f.get(key, "")) for key in ("object", "verdict", "detail")}
                                   for f in findings),
                    size=len(data), sha256=hashlib.sha256(data).hexdigest())
    folder = private_directory(directory)
    written: list[str] = []
    try:
        for name, content in ((entry + RECORD, record.to_json()), (entry + MESSAGE, data)):
            _publish(folder, name, content, written)
        os.fsync(folder)
    except BaseException:
        for name in written:
            _unlink(folder, name)
        raise
    finally:
        os.close(folder)
    return Path(directory) / (entry + MESSAGE)


def _publish(folder: int, name: str, data: bytes, written: list[str]) -> None:
    """``name`` appears complete and on disk, or not at all (never over an existing file)."""
    temporary = f".{name}.{os.urandom(4).hex()}"
    create_in(folder, temporary, data)
    try:
        _flush(folder, temporary)
        os.link(temporary, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        written.append(name)
    finally:
        _unlink(folder, temporary)


def save_record(folder: int, record: Record) -> None:
    """Replace the record of an entry in the directory open as ``folder``, atomically."""
    temporary = f".{record.id}{RECORD}.{os.urandom(4).hex()}"
    create_in(folder, temporary, record.to_json())
    try:
        _flush(folder, temporary)
        os.replace(temporary, record.id + RECORD, src_dir_fd=folder, dst_dir_fd=folder)
        os.fsync(folder)
    except BaseException:
        _unlink(folder, temporary)
        raise


def _flush(folder: int, name: str) -> None:
    descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _unlink(folder: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        pass
