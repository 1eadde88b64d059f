"""One quarantine opened for an administrator: a directory of this user's own that nobody
else can write, its entries reached through the directory's descriptor, never by a path
put together from what a command line says."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import NamedTuple

from ispmailgate_filters.kept import MAX_RECORD, MESSAGE, RECORD, Record, is_id, save_record

from ...reading import header_block_end

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Refused(Exception):
    """A quarantine (or an entry) that must not be read: why, for the administrator."""


class Busy(Exception):
    """Another command holds the entry (a release under way)."""


class Entry(NamedTuple):
    """A kept message: where, its record, the size of its bytes."""
    quarantine: Quarantine
    record: Record
    size: int

    @property
    def id(self) -> str:
        return self.record.id


class Quarantine:
    """A directory of kept copies (see ispmailgate_filters.kept), as ``label`` names it."""

    def __init__(self, path: str, label: str, delivered: bool = False) -> None:
        self.path, self.label = path, label
        self.delivered = delivered      # keep/: copies of mail that went on unchanged
        self.folder: int | None = None

    def open(self) -> bool:
        """Open the directory; False if there is none (nothing kept yet).  Raises Refused
        where someone other than this user could write it, or swap it (as root)."""
        from ispmailgate_filters.files import refuse_untrusted_directories

        try:
            refuse_untrusted_directories(self.path)        # only as root (mail_user = "root")
            folder = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise Refused(_why(self.path, error)) from None
        info = os.fstat(folder)
        reason = _foreign(info)
        if reason:
            os.close(folder)
            raise Refused(reason)
        self.folder = folder
        return True

    def close(self) -> None:
        if self.folder is not None:
            os.close(self.folder)
            self.folder = None

    def ids(self) -> list[str]:
        """The ids of its messages (records without a message are not entries)."""
        return sorted(name[:-len(MESSAGE)] for name in self._names()
                      if name.endswith(MESSAGE) and is_id(name[:-len(MESSAGE)]))

    def record_ids(self) -> list[str]:
        """The ids of its records, with or without a message."""
        return sorted(name[:-len(RECORD)] for name in self._names()
                      if name.endswith(RECORD) and is_id(name[:-len(RECORD)]))

    def _names(self) -> list[str]:
        return [] if self.folder is None else os.listdir(self.folder)

    def entry(self, id: str) -> Entry | None:
        """The entry ``id``, None if it has no message here; Refused if it cannot be read."""
        try:
            descriptor = self._open(id + MESSAGE)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise Refused(f"{self.path}/{id}{MESSAGE}: {error.strerror or error}") from None
        try:
            info = os.fstat(descriptor)
        finally:
            os.close(descriptor)
        return Entry(self, self.record(id, info.st_mtime), info.st_size)

    def record(self, id: str, mtime: float) -> Record:
        """The record of ``id``: an unreadable one is shown as such, never fatal."""
        unreadable = Record(id=id, time=mtime, verdict="(unreadable record)")
        try:
            raw = self._read(id + RECORD, MAX_RECORD)
        except FileNotFoundError:
            raw = None
        except (OSError, Refused):      # a link, a FIFO, no permission: said, never followed
            return unreadable
        try:
            return Record.from_json(raw, id, mtime, delivered=self.delivered)
        except (ValueError, TypeError, OverflowError, RecursionError):     # RecursionError: nesting
            return unreadable

    def record_mtime(self, id: str) -> float:
        return os.stat(id + RECORD, dir_fd=self.folder, follow_symlinks=False).st_mtime

    def header(self, id: str, most: int = 64 * 1024) -> tuple[bytes, bool]:
        """The message's header block (at most ``most`` bytes), and whether it was cut."""
        data = self._read(id + MESSAGE, most + 1)
        end = header_block_end(data)
        return data[:min(end, most)], end > most

    @contextlib.contextmanager
    def locked(self, id: str) -> Iterator[int]:
        """The message held open and locked (flock) against a concurrent release or delete."""
        import fcntl

        descriptor = self._open(id + MESSAGE)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(f"{id} is being released or deleted by another command") from None
            yield descriptor
        finally:
            os.close(descriptor)

    def save(self, record: Record) -> None:
        save_record(self.folder, record)

    def remove(self, id: str) -> int:
        """Remove the entry's files: the message first, so no half entry is ever listed."""
        removed = 0
        for name in (id + MESSAGE, id + RECORD):
            try:
                os.unlink(name, dir_fd=self.folder)
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def _open(self, name: str) -> int:
        """A regular file of this directory, never through a link, a FIFO or a device."""
        descriptor = os.open(name, _OPEN, dir_fd=self.folder)
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise Refused(f"{self.path}/{name} is not a regular file")
        os.set_blocking(descriptor, True)
        return descriptor

    def _read(self, name: str, most: int) -> bytes:
        descriptor = self._open(name)
        try:
            return read_all(descriptor, most)
        finally:
            os.close(descriptor)


def read_all(descriptor: int, most: int | None = None) -> bytes:
    """What the open file holds from its start (at most ``most`` bytes)."""
    chunks, size = [], 0
    while most is None or size < most:
        chunk = os.pread(descriptor, 1 << 20 if most is None else min(1 << 20, most - size), size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _why(path: str, error: OSError) -> str:
    """What an administrator needs to know of a quarantine that would not open."""
    try:
        info = os.lstat(path)
    except OSError:
        info = None
    if info is not None and stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link (name the directory itself)"
    if error.errno == errno.ENOTDIR:
        return "it is not a directory"
    if error.errno == errno.EACCES:
        if info is not None and _foreign(info):
            return _foreign(info)
        return f"{user(os.geteuid())}, as whom this command runs, cannot enter a directory above it"
    return error.strerror or str(error)


def _foreign(info: os.stat_result) -> str:
    """Why a directory is not this user's own and closed to others ("" if it is)."""
    me = os.geteuid()
    if info.st_uid != me:
        return (f"it is owned by {user(info.st_uid)}, not by {user(me)} as whom this command runs "
                "(mail_user, as a run; run it as that user, or make mail_user that user)")
    if info.st_mode & 0o022:
        return f"others can write it (mode {stat.S_IMODE(info.st_mode):04o}; chmod go-w it)"
    return ""


def user(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
