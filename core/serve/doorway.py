"""Where a worker takes its connections: only once their request head has arrived."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ispmailgate_client import ARGUMENTS, CONTEXT, MAX_FRAME, PROTOCOL_VERSIONS

from ..status import EX_TEMPFAIL, LOCAL_TROUBLE
from .protocol import send_reply

log = logging.getLogger("ispmailgate.serve")


class Doorway:
    """Connections accepted but not yet taken: a worker takes one only when its whole request
    head (version, context, arguments) has arrived, so connections that send nothing, or
    half a head, never hold a worker.  Each waits at most ``head_timeout`` from its accept,
    then gets an error reply and is closed; past ``MAX_WAITING`` the oldest goes first.
    What was read while waiting is handed over with the connection."""

    MAX_WAITING = 64
    MAX_HEAD = 256 * 1024       # a head this long is handed over as it is (read on with timeouts)

    def __init__(self, listener, head_timeout: float) -> None:
        import select

        self.listener, self.head_timeout = listener, head_timeout
        self.waiting: dict[int, tuple[Any, float, bytearray]] = {}     # fd: (socket, deadline, read)
        self.poll = select.poll()
        self.poll.register(listener, select.POLLIN)

    def next(self, wait: float) -> tuple[Any, bytes] | None:
        """A connection whose head is complete, with the bytes read from it; None after ``wait``."""
        now = time.monotonic()
        soonest = min((deadline for _, deadline, _ in self.waiting.values()), default=now + wait)
        for fd, _ in self.poll.poll(max(0.0, min(wait, soonest - now)) * 1000):
            if fd == self.listener.fileno():
                self._accept()
            elif fd in self.waiting and (ready := self._read(fd)) is not None:
                return ready
        self._expire(time.monotonic())
        return None

    def _accept(self) -> None:
        import select

        try:
            connection = self.listener.accept()[0]
        except (BlockingIOError, InterruptedError):     # another worker was quicker
            return
        connection.setblocking(False)
        if len(self.waiting) >= self.MAX_WAITING:
            self._drop(min(self.waiting, key=lambda fd: self.waiting[fd][1]), "too many connections waiting")
        self.waiting[connection.fileno()] = (connection, time.monotonic() + self.head_timeout, bytearray())
        self.poll.register(connection, select.POLLIN)

    def _read(self, fd: int) -> tuple[Any, bytes] | None:
        connection, _, data = self.waiting[fd]
        try:
            chunk = connection.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        if not chunk:
            if data:                        # half a head, then its end: answer it as bad
                self._drop(fd, "the request head ended before it was complete")
            else:                           # hung up before sending anything: nothing to answer
                self._forget(fd).close()
            return None
        data += chunk
        if not head_complete(data) and len(data) < self.MAX_HEAD:
            return None
        self._forget(fd).setblocking(True)
        return connection, bytes(data)

    def _expire(self, now: float) -> None:
        for fd in [fd for fd, (_, deadline, _) in self.waiting.items() if deadline <= now]:
            self._drop(fd, f"the client sent no complete request head within {self.head_timeout:g} s")

    def _drop(self, fd: int, reason: str) -> None:
        """Answer (if the socket takes it at once) and close: a connection no worker took."""
        data = self.waiting[fd][2]
        connection = self._forget(fd)
        version = data[0] if data and data[0] in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
        log.warning("worker %d: connection closed: %s", os.getpid(), reason)
        try:
            send_reply(connection, b"", f"{LOCAL_TROUBLE} ispmailgate serve: bad request: {reason}\n".encode(),
                       EX_TEMPFAIL, version)
        except OSError:
            pass
        connection.close()

    def _forget(self, fd: int):
        connection = self.waiting.pop(fd)[0]
        self.poll.unregister(fd)
        return connection

    def close(self) -> None:
        for fd in list(self.waiting):
            self._forget(fd).close()


def head_complete(data: bytes | bytearray) -> bool:
    """Has the whole request head arrived: the version, the context frame (protocol 2 and
    later) and the argument frame?  A head a worker must refuse counts as complete."""
    if not data or data[0] not in PROTOCOL_VERSIONS:
        return bool(data)
    at = 1
    for kind in (CONTEXT, ARGUMENTS) if data[0] >= 2 else (ARGUMENTS,):
        if len(data) < at + 5:
            return len(data) > at and data[at:at + 1] != kind
        length = int.from_bytes(data[at + 1:at + 5], "big")
        if data[at:at + 1] != kind or length > MAX_FRAME:
            return True
        at += 5 + length
    return len(data) >= at
