"""A plain-socket LMTP/SMTP client for the serve tests: every reply as the server sent it,
per recipient too (smtplib's LMTP class reads one reply after DATA)."""

from __future__ import annotations

import socket
from pathlib import Path


class Talk:
    """One connection to a listener: send lines, read replies (multi-line ones joined)."""

    def __init__(self, address: Path | str | tuple[str, int], timeout: float = 60) -> None:
        family = socket.AF_UNIX if isinstance(address, (str, Path)) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(address) if family == socket.AF_UNIX else address)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """The next reply: "250 2.1.0 ok" (a multi-line one with its lines joined by "|")."""
        lines = []
        while True:
            try:
                line = self.file.readline()
            except ConnectionResetError:      # closed with our bytes unread: also an end
                line = b""
            if not line:
                return "|".join(lines) if lines else ""
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "|".join(lines)

    def replies(self, count: int) -> list[str]:
        return [self.reply() for _ in range(count)]

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def transaction(self, sender: str, recipients: list[str], message: bytes) -> list[str]:
        """MAIL, RCPT..., DATA, the message (dot-stuffed here), pipelined; every reply after
        the 354 (one per recipient for LMTP, one for SMTP: read what comes)."""
        commands = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]
        self.send("".join(c + "\r\n" for c in commands).encode())
        head = self.replies(len(commands))
        assert head[-1].startswith("354"), head
        self.send(stuffed(message) + b".\r\n")
        return head

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Talk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stuffed(message: bytes) -> bytes:
    """The message as DATA carries it: CR LF line ends, leading dots doubled, a final CR LF."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
