"""Text for an administrator: lines on stdout, nothing a message or a rule file brought
that a terminal would act on."""

from __future__ import annotations

from typing import BinaryIO

from ispmailgate_filters import mime


def printable(text: str) -> str:
    """No control characters from a message or a rule file reach the administrator's terminal."""
    return mime.printable(text, limit=len(text) + 1)


class Output:
    """Lines of text for an administrator, on the run's stdout."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def line(self, text: str = "") -> None:
        self.stream.write(printable(text).encode("utf-8", "replace") + b"\n")

    def close(self) -> None:
        self.stream.flush()


def addresses(recipients) -> str:
    return ", ".join(f"<{r}>" for r in recipients)
