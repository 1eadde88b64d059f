"""Connections passed between the server's processes (SCM_RIGHTS), with what goes with them.

Two channels, both made by the master before it forks anything, so that every process it
forks later, a replacement worker or doorkeeper too, finds them: the **queue**, on which
the doorkeeper puts connections that are ready for a worker (a complete request head, an
LMTP or SMTP transaction at its DATA), and from which only an idle worker takes; and the
**returns**, on which workers give back LMTP and SMTP sessions after a transaction, tell
the doorkeeper what they took, and a doorkeeper that is being replaced passes on what it
holds.  Each is a SOCK_SEQPACKET socket pair: one message is one parcel, taken whole by
exactly one reader, however many processes read that end.

A parcel is a kind, a small state (JSON) and some bytes (what was read from the connection
and not yet used): up to ``INLINE`` bytes travel in the message itself, more in a memfd
passed beside the connection, so a parcel never depends on the size of a socket buffer.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, NamedTuple

INLINE = 32 * 1024
MAX_PARCEL = INLINE + 16 * 1024         # the state and the inline bytes: what a reader takes at once

# What a parcel is about.  With a connection: "client" (the ispmailgate-client protocol),
# "lmtp", "smtp".  Without: "taken" (a worker took one from the queue), "gone" (a worker
# closed a session it was given instead of returning it).
WITH_CONNECTION = ("client", "lmtp", "smtp")


class Parcel(NamedTuple):
    kind: str
    connection: socket.socket | None = None
    state: dict[str, Any] = {}
    data: bytes = b""


class Channel:
    """One end of a channel, shared by every process that reads (or writes) it.

    The end stays non-blocking for good: its O_NONBLOCK is shared with every process that
    holds it, and one that made it blocking would leave another hanging in a read that a
    third process's read emptied first.  A timeout is a poll on our side only."""

    def __init__(self, end: socket.socket) -> None:
        end.setblocking(False)
        self.end = end

    def fileno(self) -> int:
        return self.end.fileno()

    def send(self, parcel: Parcel, timeout: float = 0.0) -> bool:
        """Puts the parcel on the channel; False when it is full (``timeout`` 0: at once)."""
        head = json.dumps({"kind": parcel.kind, "state": parcel.state, "size": len(parcel.data)},
                          separators=(",", ":")).encode()
        fds = [parcel.connection.fileno()] if parcel.connection is not None else []
        body, memfd = parcel.data, None
        if len(body) > INLINE:
            memfd, body = _memfd(body), b""
            fds.append(memfd)
        try:
            self.end.settimeout(timeout)
            socket.send_fds(self.end, [len(head).to_bytes(4, "big"), head, body], fds)
            return True
        except (BlockingIOError, TimeoutError, InterruptedError):
            return False
        finally:
            if memfd is not None:
                os.close(memfd)

    def receive(self, timeout: float = 0.0) -> Parcel | None:
        """The next parcel; None when there is none (another reader was quicker)."""
        try:
            self.end.settimeout(timeout)
            message, fds, flags, _ = socket.recv_fds(self.end, MAX_PARCEL, 2)
        except (BlockingIOError, TimeoutError, InterruptedError):
            return None
        try:
            return _unpack(message, fds, flags)
        except (ValueError, KeyError, TypeError, OSError):
            for fd in fds:          # never leak what came with a parcel we cannot read
                os.close(fd)
            raise OSError("a malformed parcel on the channel") from None


def _unpack(message: bytes, fds: list[int], flags: int) -> Parcel:
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(message) < 4:
        raise ValueError("truncated parcel")
    size = int.from_bytes(message[:4], "big")
    head = json.loads(message[4:4 + size])
    kind, data = head["kind"], message[4 + size:]
    connection = None
    if kind in WITH_CONNECTION:
        if not fds:
            raise ValueError("a parcel without its connection")
        connection = socket.socket(fileno=fds.pop(0))
    if fds:                             # the bytes did not fit into the message
        with os.fdopen(fds.pop(0), "rb") as memfd:
            data = memfd.read()
    if len(data) != head["size"] or fds:
        raise ValueError("a parcel of the wrong size")
    return Parcel(kind, connection, head["state"], data)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("ispmailgate-parcel", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def channel() -> tuple[Channel, Channel]:
    """A new channel: (the end to write, the end to read)."""
    write, read = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Channel(write), Channel(read)
