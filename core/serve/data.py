"""The message of an LMTP or SMTP DATA command: dot-unstuffed as it arrives, ended by the
line that holds a single dot.

The bytes come in chunks of any size.  Each chunk's complete lines are unstuffed (a line
that starts with a dot loses that dot, RFC 5321 4.5.2) by one C-level replace and appended
to the message, so the message is built once, in one buffer, and never copied as a whole;
what may still be part of the end -- the line not yet ended -- waits for the next chunk.
Each byte is searched a bounded number of times, however long its line: a line longer
than ``FLUSH`` goes into the message in pieces.  Line ends stay as they came: CR LF.

Only CR LF "." CR LF ends the message (a bare LF before or after the dot does not: that
is how SMTP smuggling starts).  A message longer than ``limit`` is kept to ``limit + 1``
bytes and read to its end, so that the run refuses it as it would a one-shot run's.
"""

from __future__ import annotations

END = b"\r\n.\r\n"
FLUSH = 64 * 1024


class DataReader:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.message = bytearray()
        self.size = 0                   # the whole message's, also past the limit
        self.pending = bytearray()      # not yet in the message: where the end may be
        self.mid_line = False           # pending does not start at the start of a line
        self.ended = False
        self.rest = b""                 # what came after the end (a pipelined command)

    def feed(self, chunk: bytes) -> bool:
        """Takes the next bytes; True once the end has come (``rest`` holds what followed)."""
        start = max(0, len(self.pending) - len(END))
        self.pending += chunk
        if not self.mid_line and self.pending.startswith(b".\r\n"):
            return self._end(0, 3)
        found = self.pending.find(END, start)
        if found >= 0:
            return self._end(found + 2, found + len(END))
        cut = self.pending.rfind(b"\r\n", start)
        if cut >= 0:
            self._take(cut + 2)
            self.mid_line = False
        elif len(self.pending) > FLUSH:         # a long line: in, but for its last bytes
            self._take(len(self.pending) - len(END))
            self.mid_line = True
        return False

    def _end(self, message_end: int, rest_start: int) -> bool:
        self.rest = bytes(self.pending[rest_start:])
        self._take(message_end)
        self.pending = bytearray()
        self.ended = True
        return True

    def _take(self, end: int) -> None:
        """Moves ``pending[:end]`` into the message, unstuffed."""
        piece = self.pending[:end]
        del self.pending[:end]
        if not self.mid_line and piece.startswith(b"."):
            del piece[:1]
        if b"\r\n." in piece:
            piece = piece.replace(b"\r\n.", b"\r\n")
        self.size += len(piece)
        room = self.limit + 1 - len(self.message)
        if room > 0:
            self.message += piece if len(piece) <= room else piece[:room]
