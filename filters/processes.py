"""Child processes a filter starts: each in a process group of its own, killed and reaped
on every way out.

A command that outlives its message is a leak in a one-shot run (it keeps running after
the gate exited 75) and a zombie or worse in a served one.  So a command starts as the
leader of a new process group (``start_new_session``: whatever it forks stays in the
group unless it daemonises on purpose), and :func:`end` -- called on the normal way out
and from ``finally``, so also when the time limit, a signal or an exception ends the run
-- kills what is left of the group and reaps the child, holding back an exception that
arrives meanwhile until the child is reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


# The process groups of the commands still running, and who wants to know (a served
# worker: its master ends these groups if the worker is killed before it could).
running: set[int] = set()
on_change: Callable[[set[int]], None] | None = None


def start(argv: list[str], **options) -> subprocess.Popen:
    """``subprocess.Popen`` as the leader of a new process group (never a shell)."""
    process = subprocess.Popen(argv, start_new_session=True, **options)
    _note(running.add, process.pid)
    return process


def _note(change: Callable[[int], None], group: int) -> None:
    change(group)
    if on_change is not None:
        on_change(running)


def end(process: subprocess.Popen, *, kill: bool, timeout: float | None = None) -> int:
    """The child's exit status, once it and the rest of its group are gone.

    ``kill``: kill it now (the way out is a failure, a limit, an exception); else wait for
    it, at most ``timeout`` seconds, then kill it and raise ``subprocess.TimeoutExpired``.
    Either way what it left running in its group is killed while the child is still a
    zombie (seen with WNOWAIT), so the group's number cannot have been reused by then.
    """
    pending: BaseException | None = None
    if kill:
        _kill_group(process.pid)
    try:
        expired = _zombie(process.pid, timeout)
    except BaseException as error:      # the time limit, a signal: reap first, then raise it
        pending, expired = error, False
        _kill_group(process.pid)
        _zombie(process.pid, None)
    if expired:
        _kill_group(process.pid)
        _zombie(process.pid, None)
    _kill_group(process.pid)
    while True:
        try:
            status = process.wait()
            break
        except BaseException as error:
            pending = pending or error
    _note(running.discard, process.pid)
    if pending is not None:
        raise pending
    if expired:
        raise subprocess.TimeoutExpired(process.args, timeout or 0)
    return status


def kill(process: subprocess.Popen) -> None:
    """Kill the command and its group now, unless it was reaped already (for a timer: a
    child it started may hold its output open, so killing the child alone is not enough)."""
    if process.returncode is None:
        _kill_group(process.pid)


def _zombie(pid: int, timeout: float | None) -> bool:
    """Wait until the child has exited, without reaping it; True if ``timeout`` ran out."""
    flags = os.WEXITED | os.WNOWAIT
    try:
        if timeout is None:
            os.waitid(os.P_PID, pid, flags)
            return False
        deadline, pause = time.monotonic() + timeout, 0.001
        while os.waitid(os.P_PID, pid, flags | os.WNOHANG) is None:
            if time.monotonic() >= deadline:
                return True
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
    except ChildProcessError:       # reaped already
        pass
    return False


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
