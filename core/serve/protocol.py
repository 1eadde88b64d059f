"""The wire protocol, server side (docs/protocol.md): requests in, replies out."""

from __future__ import annotations

import os
import re
import time
from typing import Any, NamedTuple

from ispmailgate_client import (ARGUMENTS, CONFIG_VARIABLE, CONTEXT, DATA, DECLINED, END, EXIT, MAX_FRAME,
                                PROTOCOL_VERSIONS, STDERR, STDOUT, frame)

from .section import ServeSettings


class RequestError(OSError):
    """A request that breaks the protocol, is too large or too slow (an OSError, so the
    core's message reader turns it into a tempfail like any other read error)."""


class ClientContext(NamedTuple):
    """Where the client runs (protocol 2): its working directory and that directory's
    (device, inode) -- "" and None when the client cannot tell -- and its
    $ISPMAILGATE_CONFIG (None when unset).  Nothing else of its environment."""
    cwd: str
    dev_ino: tuple[int, int] | None
    config: str | None

    @classmethod
    def decode(cls, payload: bytes) -> ClientContext:
        """Read strictly: every way a frame can be wrong is a RequestError (a bad request),
        never an exception of the parser's own; numbers are ASCII digits of sane length."""
        raw = payload.split(b"\0")[:-1]
        if not payload.endswith(b"\0") or not 2 <= len(raw) <= 8:     # only 3 are ever right
            raise RequestError("malformed context frame")
        if any(len(item) > MAX_CONTEXT_ITEM for item in raw):
            raise RequestError(f"a context item longer than {MAX_CONTEXT_ITEM} bytes")
        cwd, dev_ino, *variables = [os.fsdecode(item) for item in raw]
        numbers = _DEV_INO.fullmatch(raw[1])
        known = cwd.startswith("/") and numbers is not None
        if not known and (cwd or dev_ino):
            raise RequestError(f"the context frame's working directory is not an absolute path "
                               f"and a device:inode: {cwd[:100]!r} {dev_ino[:50]!r}")
        names = [variable.partition("=")[0] for variable in variables]
        if names not in ([], [CONFIG_VARIABLE]):
            raise RequestError(f"the context frame carries {', '.join(names)[:100]} "
                               f"(only {CONFIG_VARIABLE}, once)")
        config = variables[0].partition("=")[2] if variables else ""
        return cls(cwd, (int(numbers.group(1)), int(numbers.group(2))) if known else None,
                   config or None)      # empty is unset, as for the command line parser


MAX_CONTEXT_ITEM = 4096     # PATH_MAX: a working directory, a rule file's path
MAX_ARGUMENT = 128 * 1024   # MAX_ARG_STRLEN: no one-shot run gets a longer argument
_DEV_INO = re.compile(rb"([0-9]{1,20}):([0-9]{1,20})")      # 2**64 has 20 digits


class Request:
    """One client's request: its context and arguments, then its message as a readable stream."""

    def __init__(self, connection, settings: ServeSettings) -> None:
        self.connection = connection
        self.read_timeout = settings.read_timeout
        self.deadline = time.monotonic() + settings.request_timeout
        self.limit = settings.max_request_size
        self.received = 0
        self.pending = b""
        self.ended = False
        self.version = PROTOCOL_VERSIONS[0]         # the reply's, until the client says
        self.context: ClientContext | None = None   # protocol 1 sends none

    def arguments(self) -> list[str]:
        """The head of the request: the version, the context (protocol 2), the arguments."""
        version = self._exactly(1)[0]
        if version not in PROTOCOL_VERSIONS:
            raise RequestError(f"unsupported protocol version {version} (this server speaks "
                               f"{' and '.join(map(str, PROTOCOL_VERSIONS))})")
        self.version = version
        if version >= 2:
            kind, payload = self._frame()
            if kind != CONTEXT:
                raise RequestError("expected the context frame first")
            self.context = ClientContext.decode(payload)
        kind, payload = self._frame()
        if kind != ARGUMENTS or (payload and not payload.endswith(b"\0")):
            raise RequestError("expected the argument frame " + ("first" if version == 1 else "next"))
        arguments = payload.split(b"\0")[:-1]
        if any(len(argument) > MAX_ARGUMENT for argument in arguments):
            raise RequestError(f"an argument longer than {MAX_ARGUMENT} bytes")
        return [os.fsdecode(argument) for argument in arguments]

    def read(self, size: int = -1) -> bytes:
        """The next piece of the message; b"" at its end (what ``read_message`` expects)."""
        while not self.pending and not self.ended:
            kind, payload = self._frame()
            if kind == END:
                self.ended = True
            elif kind == DATA:
                self.pending = payload
            else:
                raise RequestError(f"unexpected frame {kind!r} in the message")
        size = len(self.pending) if size is None or size < 0 else size
        chunk, self.pending = self.pending[:size], self.pending[size:]
        return chunk

    def _frame(self) -> tuple[bytes, bytes]:
        head = self._exactly(5)
        length = int.from_bytes(head[1:], "big")
        if head[:1] not in (CONTEXT, ARGUMENTS, DATA, END):
            raise RequestError(f"unexpected frame {head[:1]!r}")
        if length > MAX_FRAME:
            raise RequestError(f"frame of {length} bytes (at most {MAX_FRAME})")
        if self.received + length > self.limit:
            raise RequestError(f"request larger than serve.max_request_size ({self.limit} bytes)")
        return head[:1], self._exactly(length)

    def _exactly(self, size: int) -> bytes:
        import socket

        data = bytearray()
        while len(data) < size:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestError("the client took longer than serve.request_timeout")
            self.connection.settimeout(min(self.read_timeout, left))
            try:
                chunk = self.connection.recv(min(size - len(data), 1 << 20))
            except socket.timeout:
                raise RequestError(f"the client sent nothing for {self.read_timeout:g} s") from None
            if not chunk:
                raise RequestError("the client closed the connection in mid-request")
            data += chunk
        self.received += size
        return bytes(data)


class Prefixed:
    """A connection whose first bytes were read while it waited in the doorway."""

    def __init__(self, connection, data: bytes) -> None:
        self.connection, self.data = connection, data

    def recv(self, size: int) -> bytes:
        if not self.data:
            return self.connection.recv(size)
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


def acknowledge(connection, version: int, timeout: float) -> bool:
    """Protocol 3: tell the client a worker took its request, so that from now on it waits
    for the result instead of falling back (that would deliver twice)."""
    if version < 3:
        return False
    connection.settimeout(timeout)
    try:
        connection.sendall(bytes([version]))
    except OSError as error:            # gone (it gave up waiting): its request is not run
        raise RequestError(f"the client left before its request was taken ({error.strerror or error})") from None
    return True


def decline(connection, version: int, reason: str, timeout: float) -> bool:
    """Protocol 4: tell the client that this server will not run its request, and why (a
    choice of rule file or options the server does not run for this user): it follows its
    fallback, which runs the one-shot ispmailgate with the user's own rights.  False for an
    older client, which cannot be told so: it gets an error reply instead."""
    if version < 4:
        return False
    connection.settimeout(timeout)
    try:
        connection.sendall(bytes([DECLINED]) + frame(STDERR, reason.encode("utf-8", "backslashreplace")[:4096]))
    except OSError:
        pass                # gone: nothing was run, and nothing will be
    return True


def send_reply(connection, stdout: bytes, stderr: bytes, status: int, version: int, *,
               acknowledged: bool = False) -> None:
    """The reply; its version byte went ahead already when the request was ``acknowledged``."""
    frames = [] if acknowledged else [bytes([version])]
    for kind, data in ((STDOUT, stdout), (STDERR, stderr)):
        frames += [frame(kind, data[i:i + MAX_FRAME]) for i in range(0, len(data), MAX_FRAME)]
    frames.append(frame(EXIT, bytes([status & 0xFF])))
    for piece in frames:
        connection.sendall(piece)


def linger(connection, timeout: float) -> None:
    """Read what the client still sends until it hangs up (briefly): closing a Unix socket
    with unread data resets the connection, and the client would lose the reply."""
    import socket

    connection.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        connection.settimeout(left)
        if not connection.recv(1 << 16):
            return


def peer_credentials(connection) -> tuple[int, int, int]:
    """(pid, uid, gid) of the client, from the kernel (SO_PEERCRED), not from the client."""
    import socket
    import struct

    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


MAX_CONTEXT = 64 * 1024     # a context frame holds three items of at most MAX_CONTEXT_ITEM


def head_complete(data: bytes | bytearray) -> bool:
    """Has the whole request head arrived: the version, the context frame (protocol 2 and
    later) and the argument frame?  A head a worker must refuse counts as complete, and so
    does one that claims more than a head may hold: nobody waits for it."""
    if not data or data[0] not in PROTOCOL_VERSIONS:
        return bool(data)
    at = 1
    for kind, most in ((CONTEXT, MAX_CONTEXT), (ARGUMENTS, MAX_FRAME)) if data[0] >= 2 else ((ARGUMENTS, MAX_FRAME),):
        if len(data) < at + 5:
            return len(data) > at and data[at:at + 1] != kind
        length = int.from_bytes(data[at + 1:at + 5], "big")
        if data[at:at + 1] != kind or length > most:
            return True
        at += 5 + length
    return len(data) >= at
