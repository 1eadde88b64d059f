"""Files opened, created or written with privileges: never through a path someone else controls.

Root (the serve master, a one-shot run before it drops privileges, or a run whose
mail_user is root) must not follow a symlink somebody planted, write to a file somebody
linked to one of root's, or trust a file somebody else can rewrite.  So here every open
refuses a symlink in the last component (O_NOFOLLOW), a new file is created exclusively
(O_EXCL), and, as root, every directory above a path must be one only root can change:
owned by root and not writable by group or others -- or, like /tmp, sticky and owned by
root, where nobody else can rename or remove what root owns.  A file is only trusted
(:func:`untrusted`) when root owns it and nobody else can write it, as Postfix and sendmail
check their own configuration.

Used by the core (rule file, log file, keep/), ``serve`` (pid file, socket) and filters
(quarantine), so it lives below all of them.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TextIO

_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


def as_root() -> bool:
    return os.geteuid() == 0


def untrusted(path: str, info: os.stat_result | None = None) -> str:
    """Why someone other than root could change the file at ``path`` ("" if nobody can):
    the file must be root's and not writable by group or others, and so must every
    directory above it, on the path as written and on the path it resolves to."""
    info = info if info is not None else os.stat(path)
    if info.st_uid != 0:
        return f"{path} is owned by uid {info.st_uid}, not by root (chown root {path})"
    if info.st_mode & 0o022:
        return f"{path} is writable by group or others (chmod go-w {path})"
    return untrusted_directories(path)


def untrusted_directories(path: str) -> str:
    """Why someone other than root could swap what ``path`` names ("" if nobody can).
    A directory that does not exist yet is fine: only who may write its parent could make it."""
    for directory in _directories_above(path):
        try:
            info = os.stat(directory)
        except FileNotFoundError:
            continue
        if info.st_uid != 0:
            return f"{directory} is owned by uid {info.st_uid}, not by root (it holds {path})"
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return f"{directory} is writable by group or others (chmod go-w {directory}; it holds {path})"
    return ""


def _directories_above(path: str) -> list[str]:
    found: list[str] = []
    for start in (os.path.abspath(path), os.path.realpath(path)):
        directory = os.path.dirname(start)
        while directory not in found:
            found.append(directory)
            directory = os.path.dirname(directory)
    return found


def refuse_untrusted_directories(path: str) -> None:
    """As root: an OSError (EPERM) saying why, where someone else could swap ``path``."""
    reason = untrusted_directories(path) if as_root() else ""
    if reason:
        raise PermissionError(errno.EPERM, f"refused as root: {reason}")


def open_log_file(path: str) -> TextIO:
    """``path`` opened to append text (created 0600): never through a symlink, never a
    FIFO or a device, and as root only a file with one link where nobody else can swap it."""
    refuse_untrusted_directories(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | _OPEN, 0o600)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if as_root() and info.st_nlink != 1:
            raise PermissionError(errno.EPERM, f"refused as root: it has {info.st_nlink} links")
        os.set_blocking(descriptor, True)
        return open(descriptor, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
    except BaseException:
        os.close(descriptor)
        raise


def private_directory(path: str) -> int:
    """A descriptor of directory ``path`` (created 0700 with its parents where missing),
    which must be this user's own and closed to others; files go in with :func:`create_in`,
    relative to it, so nothing can swap the directory underneath."""
    refuse_untrusted_directories(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
    info = os.fstat(descriptor)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(descriptor)
        raise PermissionError(errno.EPERM, f"{path} is not this user's own (uid {info.st_uid}, "
                                           f"mode {stat.S_IMODE(info.st_mode):04o})")
    return descriptor


def create_in(directory: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """A new file ``name`` in the directory open as ``directory``: exclusively, never through
    an existing file or symlink."""
    descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, mode, dir_fd=directory)
    with open(descriptor, "wb") as stream:
        stream.write(data)


def replace_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """``path`` replaced atomically by a new file holding ``data``: written under a random
    name, exclusively, then renamed over (a rename replaces a symlink, it never follows it)."""
    refuse_untrusted_directories(path)
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.urandom(6).hex()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, mode)
    try:
        with open(descriptor, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def read_small(path: str, most: int = 64) -> bytes:
    """At most ``most`` bytes of a regular file, never through a symlink, FIFO or device."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _OPEN)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return os.read(descriptor, most)
    finally:
        os.close(descriptor)
