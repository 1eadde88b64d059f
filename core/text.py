"""Text fit for a log line or a status line, whatever bytes a message brought."""

from __future__ import annotations


def one_line(text: str) -> str:
    """Text fit for one log or status line: white space folded, at most 900 characters."""
    return loggable(" ".join(str(text).split())[:900])[:900]     # cut again: escapes lengthen it


def loggable(text: str) -> str:
    """Text any log sink can take: bytes that were not UTF-8 (surrogate escapes) and NUL
    become backslash escapes, where they would make syslog(3) or a file refuse the line."""
    text = text.replace("\0", "\\0")
    try:        # the bytes a header carried, shown as \xNN
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
