"""What every next hop shares: the reply it gives per recipient, and a message's bytes as
a hop sends them (line ends, addresses)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from ..outcome import Result


class Reply(NamedTuple):
    """One SMTP reply (or the equivalent from another next hop)."""
    code: int
    text: str
    lines: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def status(self) -> str:
        match = re.match(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}\b", self.text)
        if match and match.group(1) == str(self.code)[0]:   # the class is the code's, never the text's
            return match.group(0)
        return f"{str(self.code)[0]}.0.0"

    def result(self) -> Result:
        state = {2: "sent", 4: "deferred", 5: "rejected"}.get(self.code // 100, "deferred")
        status = self.status
        text = self.text[len(status):].strip() if self.text.startswith(status) else self.text
        return Result(state, status, text)


class Payload(NamedTuple):
    """A message as a hop needs it before DATA: its size and whether it is ASCII (for MAIL
    FROM's parameters), and how to get its bytes, called only at DATA time (a spooled
    result is read back then, for its own hand-over, and dropped after)."""
    size: int
    ascii: bool
    load: Callable[[], bytes | bytearray]

    @classmethod
    def of(cls, data: bytes | bytearray) -> Payload:
        return cls(len(data), data.isascii(), lambda: data)


_BARE_LF = re.compile(rb"(?<!\r)\n")


def wire_chunks(data: bytes | bytearray, eol: bytes, size: int = 1 << 20):
    """``data`` in chunks of whole lines with every line ending as ``eol``; ends with one."""
    position, total = 0, len(data)
    while position < total:
        end = min(position + size, total)
        if end < total:
            newline = data.find(b"\n", end)
            end = total if newline < 0 else newline + 1
        chunk = bytes(data[position:end])
        if eol == b"\n":
            yield chunk.replace(b"\r\n", b"\n")
        elif b"\r" not in chunk:           # the usual case: LF only, converted in C
            yield chunk.replace(b"\n", b"\r\n")
        else:
            yield _BARE_LF.sub(b"\r\n", chunk)
        position = end
    if not data.endswith(b"\n"):
        yield eol


def wire_address(address: str) -> bytes:
    """An address as SMTP carries it (the core lets only valid UTF-8 this far)."""
    return address.encode("utf-8")
