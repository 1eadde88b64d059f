"""The run's standard streams as the caller left them, including closed ones.

A caller may start the gate with stdin, stdout or stderr closed (``2>&-`` in a shell, a
daemon that closed them).  Python then sets ``sys.stdin`` and the others to None; and the
first file the gate opens would take the free descriptor, so that output meant for stdout or
stderr would land in a spool file or the log.  So each closed descriptor gets /dev/null
first, and the run gets streams that say they are closed: reading the message or writing it
to stdout is then the run's own trouble (75, nothing delivered, the MTA retries), and a
closed stderr only means nobody reads the status line (the exit status still tells).
"""

from __future__ import annotations

import errno
import io
import os
import sys

from .run import Streams


class Closed(io.RawIOBase):
    """A standard stream the caller closed: every read and write fails with EBADF."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise OSError(errno.EBADF, f"standard {self.name} is closed")

    def write(self, data) -> int:
        raise OSError(errno.EBADF, f"standard {self.name} is closed")


def standard_streams() -> Streams:
    """stdin, stdout and stderr of this process, each closed one replaced as said above."""
    for descriptor in (0, 1, 2):
        try:
            os.fstat(descriptor)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != descriptor:
                os.dup2(null, descriptor)
                os.close(null)
    if sys.stderr is None:      # what writes to sys.stderr (warnings, logging's last resort) may
        sys.stderr = open(os.devnull, "w", encoding="utf-8", errors="backslashreplace")
    stdin = sys.stdin.buffer if sys.stdin is not None else Closed("input")
    stdout = sys.stdout.buffer if sys.stdout is not None else Closed("output")
    return Streams(stdin, stdout, sys.stderr)
