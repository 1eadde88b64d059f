"""dkimpy made linear in the message: two of its functions replaced, once, by ones that
return exactly what the originals return (tests/test_dkim_linear.py proves it with
hypothesis) at a cost linear in their input.

- ``dkim.rfc822_parse`` splits the whole message into one bytes object per line and joins
  the body again: about 100 bytes of memory per byte of a message of empty lines, and a
  field of many continuation lines is grown by ``+=`` (quadratic).  Here only the header
  block is split; the body is the rest with its line ends made CRLF in one pass.
- ``dkim.canonicalization.strip_trailing_whitespace`` is ``re.sub(b"[\\t ]+\\r\\n", ...)``,
  which backtracks through a run of blanks at every position of it: one body line of
  200,000 blanks cost 52 s.  Here a run is tried only from its start, and possessively.
- ``dkim.canonicalization.strip_trailing_lines`` walks the empty lines at the end one
  ``endswith`` call each, in Python: 5 s of a body of 10 million.  Here they are counted
  with a few searches in C.

:func:`install` is called wherever the gate is about to import dkimpy for a message
(signing, ARC), and does its work once per process.
"""

from __future__ import annotations

import re

_HEADER_END = re.compile(rb"\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_FIELD = re.compile(rb"([\x21-\x7e]+?):")       # dkimpy's own field-name pattern
# a run of blanks from its first blank, never given back: no backtracking inside a run
_TRAILING_BLANKS = re.compile(rb"(?<![\t ])[\t ]++\r\n")
_installed = False
originals: dict[str, object] = {}       # dkimpy's own, for the tests that compare


def install() -> None:
    """Put the linear versions into dkimpy (once); importing dkimpy is the caller's cost."""
    global _installed
    if _installed:
        return
    import dkim
    import dkim.canonicalization

    originals.update(rfc822_parse=dkim.rfc822_parse,
                     strip_trailing_whitespace=dkim.canonicalization.strip_trailing_whitespace,
                     strip_trailing_lines=dkim.canonicalization.strip_trailing_lines)
    dkim.rfc822_parse = rfc822_parse
    dkim.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
    dkim.canonicalization.strip_trailing_lines = strip_trailing_lines
    _installed = True


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse``: ([name, value] per header field, value with CRLF line
    ends), the body with CRLF line ends), as dkimpy splits it (on ``\\r?\\n``)."""
    from dkim import MessageFormatError

    head, body = _split(message)
    fields: list[list] = []
    for line in _LINE_END.split(head) if head else ():
        if line[0] in (0x09, 0x20):
            fields[-1][1].append(line)          # IndexError on a first line that is one, as dkimpy
            continue
        match = _FIELD.match(line)
        if match is not None:
            fields.append([match.group(1), [line[match.end(0):]]])
        elif not line.startswith(b"From "):
            raise MessageFormatError("Unexpected characters in RFC822 header: %s" % line)
    headers = [[name, b"\r\n".join(pieces) + b"\r\n"] for name, pieces in fields]
    # what joining the lines split at \r?\n gives, in two passes in C and without a list
    return headers, body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _split(message: bytes) -> tuple[bytes, bytes]:
    """The header lines (without the empty line that ends them) and the body: where
    dkimpy's line list has its first empty line, or the whole message as header."""
    if message.startswith((b"\n", b"\r\n")):
        return b"", message[message.index(b"\n") + 1:]
    match = _HEADER_END.search(message)
    if match is not None:
        return _chop(message[:match.start() + 1]), message[match.end():]
    return _chop(message), b""


def _chop(head: bytes) -> bytes:
    """The header lines without the line end of the last (an empty last line ends them)."""
    if head.endswith(b"\r\n"):
        return head[:-2]
    return head[:-1] if head.endswith(b"\n") else head


def strip_trailing_whitespace(content: bytes) -> bytes:
    """dkimpy's ``strip_trailing_whitespace``: blanks before each CRLF removed."""
    if b" \r\n" not in content and b"\t\r\n" not in content:     # the usual body: two scans in C
        return content
    return _TRAILING_BLANKS.sub(b"\r\n", content)


def strip_trailing_lines(content: bytes) -> bytes:
    """dkimpy's ``strip_trailing_lines``: the CRLFs at the end cut to one (one added if
    there is none)."""
    tail = content[len(content.rstrip(b"\r\n")):]        # the CRs and LFs at the end
    # the CRLF pairs at the end alternate CR, LF: they start after the last doubled character
    pairs = tail[max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1:]
    pairs = pairs[1:] if pairs.startswith(b"\n") else pairs
    count = len(pairs) // 2 if pairs.endswith(b"\n") else 0
    return content + b"\r\n" if count == 0 else content[:len(content) - 2 * (count - 1)]
