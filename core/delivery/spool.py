"""Where the results of a run wait for delivery: in memory while they are few and small,
else each in a file of the run's work directory.

A run delivers nothing before every chain has run (a retry must not deliver anything
twice), so every distinct result waits.  Held as parsed messages, a 10 MB message with a
different banner for each of 20 recipients cost 466 MiB (attack review finding 9).  So a
finished result is reduced to its bytes at once (its parsed tree is dropped), the first one
and others up to ``IN_MEMORY`` bytes in all stay in memory, and every later one goes to a
file and is read back only for its own hand-over: memory is bounded by the message size and
``IN_MEMORY``, whatever the number of distinct results; the work directory takes the rest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from ispmailgate_filters.base import TempFail
from ispmailgate_filters.mime import Headers, Message

from ..status import of_error, tempfail

IN_MEMORY = 8 << 20         # bytes of results held in memory besides the first


class Finished:
    """One chain's result as delivery needs it: its bytes (or where they wait), whether a
    filter changed it, its line ending, and a digest that tells equal results apart."""

    size: int | None = None     # of the bytes to hand over, when measured before (Delivery.prepare)
    ascii: bool | None = None

    def __init__(self, data: bytes | bytearray | None, changed: bool, eol: bytes, *,
                 path: Path | None = None, head: bytes = b"") -> None:
        self._data, self.changed, self.eol, self.path, self.head = data, changed, eol, path, head
        self.digest = hashlib.sha256(data).digest() if changed and data is not None else b""

    def to_bytes(self) -> bytes | bytearray:
        """The bytes (read back from the spool file for a spooled result)."""
        if self.path is None:
            return self.head + self._data if self.head else self._data
        try:
            with open(self.path, "rb") as stored:
                return self.head + stored.read()
        except OSError as error:
            raise tempfail(of_error(error), f"cannot read a spooled result: {error}") from None

    def with_head(self, head: bytes) -> Finished:
        """The same result with header fields put on top (an ARC set), without a copy of a
        spooled result's bytes."""
        if self.path is None:
            return Finished(head + bytes(self._data), self.changed, self.eol)
        moved = Finished(None, self.changed, self.eol, path=self.path, head=head + self.head)
        moved.digest = self.digest
        return moved

    def top_headers(self) -> Headers:
        return Message(self.to_bytes()).top_headers()


class Spool:
    """Makes each finished message a :class:`Finished`: in memory or in a file of ``workdir()``."""

    def __init__(self, workdir: Callable[[], Path], in_memory: int | None = None) -> None:
        self.workdir, self.in_memory = workdir, IN_MEMORY if in_memory is None else in_memory
        self.held = 0           # bytes of changed results held in memory, the first excepted
        self.first = True
        self.count = 0

    def __call__(self, message: Message) -> Finished:
        if not message.changed:         # the input's own bytes: shared, never copied
            return Finished(message.raw, False, message.eol)
        data = message.to_bytes()
        if self.first or self.held + len(data) <= self.in_memory:
            self.held += 0 if self.first else len(data)
            self.first = False
            return Finished(data, True, message.eol)
        return self._write(data, message.eol)

    def _write(self, data: bytes | bytearray, eol: bytes) -> Finished:
        self.count += 1
        try:
            path = self.workdir() / f"result-{self.count}.eml"
        except TempFail as failure:     # no work directory: the machine's trouble, a retry
            raise tempfail(failure.status, str(failure)) from None
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with open(descriptor, "wb") as out:
                out.write(data)
        except OSError as error:
            raise tempfail(of_error(error), f"cannot spool a result in {path.parent}: {error.strerror}") from None
        spooled = Finished(None, True, eol, path=path)
        spooled.digest = hashlib.sha256(data).digest()
        return spooled
