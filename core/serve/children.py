"""What the master's children share: who they run as, their heartbeat, how they start.

The master forks two kinds of children: the doorkeeper (:mod:`.doorkeeper`), which holds
the listening sockets and every connection that waits, and the workers (:mod:`.worker`),
which handle one request or transaction at a time.  Each is the leader of a process group
of its own, so that when one dies, or is killed, the master can end whatever it started
(gpg, openssl, 7z, a packer's or sendmail's command) along with it: nothing of a dead child
goes on running.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from ispmailgate_filters.base import ConfigError

from ..rules import Config

BOOT_ERROR = 3          # a child's exit status when it cannot start: the master stops


@dataclass(frozen=True)
class Identity:
    """Who the children run as: resolved in the master, so a bad name is a boot error."""
    uid: int
    gid: int

    @classmethod
    def for_workers(cls, config: Config) -> Identity | None:
        """None when not started as root: the children keep the server's own user.

        The rule file's top-level mail_user/mail_group, as for a one-shot run; unlike a
        one-shot run, a server never lets its children stay root, not even when asked to.
        """
        if os.geteuid() != 0:
            return None
        import grp
        import pwd

        if not config.mail_user:
            raise ConfigError("mail_user", "empty: the server must not run its workers as root")
        try:
            user = pwd.getpwnam(config.mail_user)
        except KeyError:
            raise ConfigError("mail_user", f"no such user: {config.mail_user!r}") from None
        if user.pw_uid == 0:
            raise ConfigError("mail_user", "must not be root: workers read mail from the internet")
        try:
            gid = grp.getgrnam(config.mail_group).gr_gid if config.mail_group else user.pw_gid
        except KeyError:
            raise ConfigError("mail_group", f"no such group: {config.mail_group!r}") from None
        return cls(user.pw_uid, gid)

    def assume(self) -> None:
        """Drop root for good: supplementary groups cleared, then group, then user."""
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            raise OSError("still root after setuid")


def uid_of(identity: Identity | None) -> int:
    """The uid the children run as."""
    return identity.uid if identity is not None else os.getuid()


class Heartbeat:
    """Shared memory: the child writes the time, the master reads its age; and the process
    groups of the commands the child runs (a filter's own group each, see
    ispmailgate_filters.processes), which the master ends if the child dies first."""

    GROUPS = 16

    def __init__(self) -> None:
        import mmap

        self.memory = mmap.mmap(-1, 8 + 4 * self.GROUPS)       # anonymous and shared across fork
        self.beat()

    def beat(self) -> None:
        self.memory[:8] = int(time.monotonic() * 1000).to_bytes(8, "big")

    def age(self) -> float:
        return time.monotonic() - int.from_bytes(self.memory[:8], "big") / 1000

    def record_groups(self, groups: set[int]) -> None:
        """In the child: the groups of its running commands (the first GROUPS of them)."""
        slots = sorted(groups)[:self.GROUPS]
        self.memory[8:] = b"".join(g.to_bytes(4, "big") for g in slots).ljust(4 * self.GROUPS, b"\0")

    def groups(self) -> list[int]:
        raw = self.memory[8:]
        return [g for g in (int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4)) if g]


def start_child(identity: Identity | None, on_stop: Callable, on_handover: Callable | None = None) -> int:
    """The common start of a child, in the child: a process group of its own, the signals,
    stdin from /dev/null, privileges dropped.  Returns a descriptor of the directory it
    started in (taken before privileges go: whoever it becomes can come back to it)."""
    os.setpgid(0, 0)            # the master does too: whoever is first
    for name in ("TERM", "INT", "HUP"):
        signal.signal(getattr(signal, "SIG" + name), on_stop)
    signal.signal(signal.SIGUSR1, on_handover or on_stop)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)       # subprocess.run must reap its own
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    home = os.open(".", os.O_PATH)
    if identity is not None:
        identity.assume()
    return home


def end_group(pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal the process group of the child ``pid`` (what it started, and itself if alive)."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def end_all(pid: int, heartbeat: Heartbeat) -> None:
    """Kill the child ``pid``'s process group and those of the commands it was running."""
    end_group(pid)
    for group in heartbeat.groups():
        end_group(group)
