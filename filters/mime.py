"""The message as filters see it: a MIME tree that keeps every byte nobody changed.

The standard library's parser and generator re-fold headers, rewrite boundaries and
normalise line endings, which breaks DKIM signatures on mail that no filter meant to
touch.  This module splits a message into parts by slicing the original bytes: a part
that nobody modified serialises to exactly the bytes it was cut from, and a changed part
is reassembled from its own (mostly untouched) pieces.

Header values are handed out as ``str`` decoded from UTF-8 with ``surrogateescape``, so
8-bit header bytes survive a round trip.  MIME parameters (RFC 2231) and encoded words
(RFC 2047) are decoded with the standard library, imported only when a filter asks.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator

MAX_DEPTH = 64          # nesting deeper than this is kept as one opaque part
MAX_PARTS = 10_000      # parts beyond this are kept inside an opaque part

# Patterns as strings: re compiles (and caches) them on first use, not at import.
_FIELD_NAME = rb"([!-9;-~]+)[ \t]*:"
_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary", ""})
_UNSAFE_IN_HEADER = r"[\x00-\x08\x0a-\x1f\x7f]"
_TOKEN = r"[!-9;-~]+\Z"


class ParseError(Exception):
    """The parser gave up on a message (the core then applies its on_parse_error policy)."""


class Headers:
    """A header block kept as raw fields: an untouched field goes out byte for byte."""

    __slots__ = ("_fields", "eol", "dirty")

    def __init__(self, fields: list[tuple[str, bytes]], eol: bytes = b"\n") -> None:
        self._fields = fields      # (name as written, raw bytes of the whole field)
        self.eol = eol
        self.dirty = False

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __len__(self) -> int:
        return len(self._fields)

    def names(self) -> list[str]:
        return [name for name, _ in self._fields]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field called ``name``, unfolded, with no RFC 2047 decoding."""
        key = name.lower()
        for field_name, raw in self._fields:
            if field_name.lower() == key:
                return _field_value(raw)
        return default

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [_field_value(raw) for field_name, raw in self._fields if field_name.lower() == key]

    def items(self) -> list[tuple[str, str]]:
        return [(name, _field_value(raw)) for name, raw in self._fields]

    def fields(self) -> list[tuple[str, bytes]]:
        """Every field as (name as written, raw bytes with folding and line end), in order."""
        return list(self._fields)

    def decoded(self, name: str) -> str | None:
        """The first field called ``name`` with RFC 2047 encoded words decoded."""
        value = self.get(name)
        return None if value is None else decode_words(value)

    def raw(self, name: str) -> bytes | None:
        """The raw bytes of the first field called ``name``, folding and line end included."""
        key = name.lower()
        return next((raw for field_name, raw in self._fields if field_name.lower() == key), None)

    def add(self, name: str, value: str, *, top: bool = True) -> None:
        """Add a field; control characters in ``value`` are neutralised, never written."""
        field = (name, fold_field(name, value, self.eol))
        if top:
            self._fields.insert(0, field)
        else:
            if self._fields and not self._fields[-1][1].endswith(b"\n"):
                # the last field of a message that ends without a line end: end it first,
                # or the new field would run on in the same line
                last_name, last_raw = self._fields[-1]
                self._fields[-1] = (last_name, last_raw + self.eol)
            self._fields.append(field)
        self.dirty = True

    def set(self, name: str, value: str) -> None:
        """Replace the first ``name`` field where it stands, drop the others; add if absent."""
        key = name.lower()
        position = next((i for i, (n, _) in enumerate(self._fields) if n.lower() == key), None)
        if position is None:
            self.add(name, value, top=False)
            return
        written = self._fields[position][0]
        self._fields = [f for i, f in enumerate(self._fields) if i == position or f[0].lower() != key]
        position = next(i for i, (n, _) in enumerate(self._fields) if n.lower() == key)
        self._fields[position] = (written, fold_field(written, value, self.eol))
        self.dirty = True

    def remove(self, name: str) -> int:
        key = name.lower()
        kept = [f for f in self._fields if f[0].lower() != key]
        removed = len(self._fields) - len(kept)
        if removed:
            self._fields = kept
            self.dirty = True
        return removed

    def to_bytes(self) -> bytes:
        return b"".join(raw for _, raw in self._fields)


class Part:
    """One MIME entity: its headers and either a body, sub-parts, or an embedded message."""

    __slots__ = ("headers", "separator", "kind", "_body", "children", "preamble", "delimiters",
                 "close_delimiter", "epilogue", "_raw", "_dirty", "_info", "default_type")

    LEAF, MULTIPART, MESSAGE = "leaf", "multipart", "message"

    def __init__(self, headers: Headers, separator: bytes = b"\n", body: bytes = b"", *,
                 raw: bytes | None = None, default_type: str = "text/plain") -> None:
        self.headers = headers
        self.separator = separator          # the blank line, b"" if the header was not ended
        self.kind = Part.LEAF
        self._body = body                   # encoded body of a leaf part
        self.children: list[Part] = []      # sub-parts, or [embedded message] for message/rfc822
        self.preamble = b""
        self.delimiters: list[bytes] = []   # raw "--boundary" line before each child
        self.close_delimiter = b""
        self.epilogue = b""
        self._raw = raw                     # the bytes this part was cut from, None if new
        self._dirty = raw is None
        self._info = None
        self.default_type = default_type

    # -- structure -----------------------------------------------------------------------

    @property
    def is_multipart(self) -> bool:
        return self.kind == Part.MULTIPART

    @property
    def is_message(self) -> bool:
        """An embedded message (message/rfc822), its one child the message itself."""
        return self.kind == Part.MESSAGE

    @property
    def is_leaf(self) -> bool:
        return self.kind == Part.LEAF

    def walk(self) -> Iterator[Part]:
        """This part and every part inside it, depth first, in order."""
        stack = [self]
        while stack:
            part = stack.pop()
            yield part
            stack.extend(reversed(part.children))

    def leaves(self) -> Iterator[Part]:
        return (part for part in self.walk() if part.is_leaf)

    def replace(self, child: Part, new: Part) -> None:
        """Put ``new`` where ``child`` stands; this part is then reassembled when written."""
        self.children[next(i for i, c in enumerate(self.children) if c is child)] = new
        self._dirty = True

    @property
    def changed(self) -> bool:
        return self._dirty or self.headers.dirty or any(child.changed for child in self.children)

    def to_bytes(self) -> bytes:
        if not self.changed and self._raw is not None:
            return self._raw
        body, separator = self.body_bytes(), self.separator
        if not separator and body[:1] in (b" ", b"\t") and len(self.headers):
            # a message with no header at all whose first line starts with white space: a
            # field added on top would take that line as its continuation
            separator = self.headers.eol
        return self.headers.to_bytes() + separator + body

    def body_bytes(self) -> bytes:
        """The body as it goes out: for a container, reassembled from its children."""
        if self.kind == Part.LEAF:
            return self._body
        if self.kind == Part.MESSAGE:
            return self.children[0].to_bytes()
        pieces = [self.preamble]
        for delimiter, child in zip(self.delimiters, self.children):
            pieces += (delimiter, child.to_bytes())
        pieces += (self.close_delimiter, self.epilogue)
        return b"".join(pieces)

    # -- MIME information ------------------------------------------------------------------

    def _mime(self):
        """A header-only stdlib message for RFC 2045/2231 parameter parsing."""
        if self._info is None or self.headers.dirty:
            from email.message import Message as StdMessage   # only parts that get looked at

            info = StdMessage()
            info.set_default_type(self.default_type)
            for name in ("Content-Type", "Content-Disposition"):
                value = self.headers.get(name)
                if value is not None:       # raw 8-bit bytes as text: UTF-8, else U+FFFD
                    info[name] = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            self._info = info
        return self._info

    @property
    def content_type(self) -> str:
        """``maintype/subtype`` in lower case; the default type when missing or invalid."""
        return self._mime().get_content_type()

    def param(self, name: str, header: str = "Content-Type") -> str | None:
        """A parameter of Content-Type (or another header), RFC 2231 continuations joined."""
        from email.utils import collapse_rfc2231_value

        value = self._mime().get_param(name, header=header)
        if value is None or value == "":
            return value
        try:
            return collapse_rfc2231_value(value).strip()
        except ValueError:      # an RFC 2231 charset no codec takes (a NUL in its name ...): UTF-8
            return collapse_rfc2231_value(("utf-8", value[1], value[2])).strip()

    @property
    def charset(self) -> str | None:
        charset = self.param("charset")
        return charset.lower() if charset else None

    @property
    def disposition(self) -> str | None:
        value = self.headers.get("Content-Disposition") or ""
        return value.split(";", 1)[0].strip().lower() or None

    @property
    def is_attachment(self) -> bool:
        return self.disposition == "attachment"

    @property
    def filename(self) -> str | None:
        """The file name from Content-Disposition or Content-Type, RFC 2231 and 2047 decoded."""
        name = self.param("filename", "Content-Disposition") or self.param("name")
        return decode_words(name) if name else None

    @property
    def transfer_encoding(self) -> str:
        value = self.headers.get("Content-Transfer-Encoding") or ""
        return value.strip().lower()

    # -- bodies ----------------------------------------------------------------------------

    @property
    def body(self) -> bytes:
        """The encoded body of a leaf part, exactly as it stands."""
        return self.body_bytes()

    @body.setter
    def body(self, data: bytes) -> None:
        self.kind, self.children, self.delimiters = Part.LEAF, [], []
        self.preamble = self.close_delimiter = self.epilogue = b""
        self._body = data
        self._dirty = True

    def decoded(self) -> bytes:
        """The body with its Content-Transfer-Encoding undone; lenient with damaged input."""
        return decode_body(self.body_bytes(), self.transfer_encoding)

    def set_decoded(self, data: bytes, encoding: str | None = None) -> None:
        """Replace the body; ``encoding`` defaults to one that keeps lines within limits."""
        eol = self.headers.eol
        encoding = (encoding or choose_encoding(data, self.transfer_encoding, self.content_type)).lower()
        self.body = encode_body(data, encoding, eol)
        current = self.transfer_encoding
        if encoding != current and not (encoding == "7bit" and current == ""):
            self.headers.set("Content-Transfer-Encoding", encoding)

    def text(self) -> str:
        """The decoded body as text in its declared charset (undecodable bytes replaced)."""
        return self.decoded().decode(python_codec(self.charset), "replace")

    def set_text(self, text: str) -> None:
        """Store text in the part's charset; where it does not fit, switch the part to UTF-8."""
        charset = self.charset or "us-ascii"
        try:
            data = text.encode(python_codec(charset))
        except UnicodeEncodeError:
            data = text.encode("utf-8")
            self.set_param("charset", "utf-8")
        self.set_decoded(data)

    def set_param(self, name: str, value: str, header: str = "Content-Type") -> None:
        """Set one parameter of a structured header; the others stay as they were written.

        Only the named parameter's text is replaced (RFC 2231 pieces included), so an
        RFC 2231 or RFC 2047 file name beside it survives unchanged.
        """
        current = self.headers.get(header)
        if current is None:
            current = self.content_type if header.lower() == "content-type" else ""
        self.headers.set(header, replace_param(current, name, value))
        self._info = None

    # -- building --------------------------------------------------------------------------

    @classmethod
    def new(cls, fields: list[tuple[str, str]], data: bytes = b"", *, eol: bytes = b"\n",
            encoding: str | None = None) -> Part:
        """A new leaf part from header fields and a decoded body."""
        headers = Headers([], eol)
        for name, value in fields:
            headers.add(name, value, top=False)
        part = cls(headers, eol)
        part.set_decoded(data, encoding)
        return part

    @classmethod
    def new_multipart(cls, subtype: str, children: list[Part], *, eol: bytes = b"\n",
                      fields: list[tuple[str, str]] = (), params: str = "",
                      boundary: str | None = None) -> Part:
        """A new multipart/``subtype`` around ``children``."""
        boundary = boundary or new_boundary()
        headers = Headers([], eol)
        headers.add("Content-Type", f'multipart/{subtype}; boundary="{boundary}"{params}', top=False)
        for name, value in fields:
            headers.add(name, value, top=False)
        mark = b"--" + boundary.encode("ascii")
        part = cls(headers, eol)
        part.kind, part.children = Part.MULTIPART, list(children)
        part.delimiters = [mark + eol] + [eol + mark + eol] * (len(children) - 1)
        part.close_delimiter = eol + mark + b"--" + eol
        return part

    @classmethod
    def new_message(cls, fields: list[tuple[str, str]], inner: Part, *, eol: bytes = b"\n") -> Part:
        """A new message/rfc822 part carrying ``inner`` as it stands."""
        headers = Headers([], eol)
        headers.add("Content-Type", "message/rfc822", top=False)
        for name, value in fields:
            headers.add(name, value, top=False)
        part = cls(headers, eol)
        part.kind, part.children = Part.MESSAGE, [inner]
        return part

    @classmethod
    def from_bytes(cls, data: bytes, *, max_depth: int = MAX_DEPTH) -> Part:
        """Parse one MIME entity (header and body) from bytes."""
        try:
            return _Parser(max_depth, MAX_PARTS).parse(bytes(data), 0, "text/plain")
        except (RecursionError, MemoryError, ValueError, LookupError, TypeError) as error:
            raise ParseError(f"{type(error).__name__}: {error}") from error


class Message:
    """One message: the bytes that came in, parsed into a :class:`Part` tree on first use.

    A filter that only reads leaves ``changed`` false, and :meth:`to_bytes` then returns
    the very object that came in, so the core delivers the input byte for byte.
    """

    def __init__(self, raw: bytes | bytearray, *, max_depth: int = MAX_DEPTH,
                 max_parts: int = MAX_PARTS) -> None:
        self.raw = raw
        self.max_depth = max_depth
        self.max_parts = max_parts
        self._root: Part | None = None
        self._replaced = False
        self._inherited = False         # a fork of a message some filter had changed
        self.defects: list[str] = []

    @property
    def root(self) -> Part:
        if self._root is None:
            parser = _Parser(self.max_depth, self.max_parts)
            try:
                self._root = parser.parse(bytes(self.raw), 0, "text/plain")
            except (RecursionError, MemoryError, ValueError, LookupError, TypeError) as error:
                raise ParseError(f"{type(error).__name__}: {error}") from error
            self.defects = parser.defects
        return self._root

    @root.setter
    def root(self, part: Part) -> None:
        self._root = part
        self._replaced = True

    @property
    def headers(self) -> Headers:
        return self.root.headers

    @property
    def eol(self) -> bytes:
        """The line ending this message uses, for new content to match."""
        end = self.raw.find(b"\n")
        return b"\r\n" if end > 0 and self.raw[end - 1:end] == b"\r" else b"\n"

    @property
    def parsed(self) -> bool:
        return self._root is not None

    @property
    def changed(self) -> bool:
        """True if any filter changed this message (or the one it was forked from)."""
        return self._inherited or self._replaced or (self._root is not None and self._root.changed)

    def to_bytes(self) -> bytes | bytearray:
        if self._root is not None and (self._replaced or self._root.changed):
            return self._root.to_bytes()
        return self.raw

    def walk(self) -> Iterator[Part]:
        return self.root.walk()

    def leaves(self) -> Iterator[Part]:
        return self.root.leaves()

    def fork(self) -> Message:
        """An independent copy for a second chain to change (unchanged input is shared)."""
        copy = Message(self.to_bytes(), max_depth=self.max_depth, max_parts=self.max_parts)
        copy._inherited = self.changed
        return copy

    def top_headers(self) -> Headers:
        """The top-level header block, without parsing the bodies (cheap; read only)."""
        if self._root is not None:
            return self._root.headers
        headers, _, _ = _parse_headers(bytes(self.raw[:_header_end(self.raw)]))
        return headers

    def header_value(self, name: str) -> str | None:
        """One top-level header field's value (see :meth:`top_headers`)."""
        return self.top_headers().get(name)


class _Parser:
    """Cuts bytes into a Part tree; never fails, records what it had to tolerate."""

    def __init__(self, max_depth: int, max_parts: int) -> None:
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.count = 0
        self.defects: list[str] = []

    def parse(self, data: bytes, depth: int, default_type: str) -> Part:
        self.count += 1
        headers, separator, body_start = _parse_headers(data)
        body = data[body_start:]
        part = Part(headers, separator, body, raw=data, default_type=default_type)
        part._dirty = False
        content_type = part.content_type
        if not content_type.startswith(("multipart/", "message/")):
            return part
        if depth >= self.max_depth or self.count >= self.max_parts:
            self.defects.append(f"nesting deeper than {self.max_depth} levels or more than "
                                f"{self.max_parts} parts: the rest is kept as one opaque part")
            return part
        if content_type.startswith("multipart/"):
            self._split_multipart(part, body, depth)
        elif content_type in ("message/rfc822", "message/global") and part.transfer_encoding in _IDENTITY_ENCODINGS:
            part.kind, part.children = Part.MESSAGE, [self.parse(body, depth + 1, "text/plain")]
            part._body = b""
        return part

    def _split_multipart(self, part: Part, body: bytes, depth: int) -> None:
        boundary = part.param("boundary")
        if not boundary:
            self.defects.append("multipart without a boundary: kept as one part")
            return
        token = boundary.encode("utf-8", "surrogateescape")
        child_type = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
        lines, room = [], self.max_parts - self.count
        for line in _boundary_lines(body, b"--" + token):
            lines.append(line)
            if line[2]:
                break
            if len(lines) > room:        # each delimiter opens a part: too many to take apart
                self.defects.append(f"more than {self.max_parts} parts: the rest is kept as one opaque part")
                return
        children, delimiters, start = [], [], None
        for begin, end, closing in lines:
            cut = _eol_start(body, begin)
            if start is None:
                part.preamble = body[:cut]
            else:
                children.append(self.parse(body[start:cut], depth + 1, child_type))
            if closing:
                part.close_delimiter = body[cut:end]
                part.epilogue = body[end:]
                start = None
                break
            delimiters.append(body[cut:end])
            start = end
        if not delimiters:
            self.defects.append(f"no boundary {boundary!r} found in {part.content_type}: kept as one part")
            part.preamble = b""
            return
        if start is not None:
            self.defects.append(f"{part.content_type} ends without its closing boundary")
            children.append(self.parse(body[start:], depth + 1, child_type))
        part.kind, part.children, part.delimiters, part._body = Part.MULTIPART, children, delimiters, b""


def _boundary_lines(body: bytes, mark: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, closing) of each line that is ``--boundary`` or ``--boundary--``,
    followed only by blanks; found with bytes.find, which is fast on large bodies."""
    position = body.find(mark)
    while position >= 0:
        if position == 0 or body[position - 1:position] == b"\n":
            after = position + len(mark)
            closing = body[after:after + 2] == b"--"
            rest = after + 2 if closing else after
            line_end = body.find(b"\n", rest)
            line_end = len(body) if line_end < 0 else line_end + 1
            if not body[rest:line_end].strip(b" \t\r\n"):
                yield position, line_end, closing
        position = body.find(mark, position + 1)


def _eol_start(data: bytes, position: int) -> int:
    """Where the line end before ``position`` starts (it belongs to the boundary line)."""
    if position >= 2 and data[position - 2:position] == b"\r\n":
        return position - 2
    if position >= 1 and data[position - 1:position] == b"\n":
        return position - 1
    return position


def _header_end(data: bytes | bytearray) -> int:
    """A cheap upper bound for where the header block ends."""
    for blank in (b"\n\n", b"\r\n\r\n"):
        end = data.find(blank)
        if end >= 0:
            return end + len(blank)
    return len(data)


def _parse_headers(data: bytes) -> tuple[Headers, bytes, int]:
    """Split the header block off: (headers, blank line, offset of the body)."""
    fields: list[tuple[str, bytes]] = []
    first_end = data.find(b"\n")
    eol = b"\r\n" if first_end > 0 and data[first_end - 1:first_end] == b"\r" else b"\n"
    position, size = 0, len(data)
    while position < size:
        end = data.find(b"\n", position)
        end = size if end < 0 else end + 1
        line = data[position:end]
        if line in (b"\n", b"\r\n"):
            return Headers(fields, eol), line, end
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            match = re.match(_FIELD_NAME, line)
            if not match:
                break       # not a header line: the body starts here without a blank line
            fields.append((match.group(1).decode("ascii"), line))
        position = end
    return Headers(fields, eol), b"", position


def _field_value(raw: bytes) -> str:
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    value = re.sub(rb"\r?\n(?=[ \t])", b"", value).strip(b" \t\r\n")
    return value.decode("utf-8", "surrogateescape")


def fold_field(name: str, value: str, eol: bytes = b"\n") -> bytes:
    """One header field, folded at white space, non-ASCII as RFC 2047 encoded words.

    Control characters (CR, LF, NUL ...) are replaced by spaces: whatever a message
    carried, it cannot inject a header line through a value a filter copies.
    """
    if not re.match(_TOKEN, name):
        raise ValueError(f"invalid header field name {name!r}")
    value = re.sub(_UNSAFE_IN_HEADER, " ", value)
    if not value.isascii():
        if name.lower().startswith("content-"):     # RFC 2047 words are not valid there
            raise ValueError(f"non-ASCII in {name}: set parameters with Part.set_param (RFC 2231)")
        from email.header import Header

        encoded = Header(value, "utf-8", header_name=name).encode(linesep=eol.decode())
        return f"{name}: {encoded}".encode("ascii") + eol
    line, lines = f"{name}:", []
    for word in value.split(" "):
        if len(line) + 1 + len(word) > 78 and line.strip() and len(line) > len(name) + 1:
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return eol.decode().join(lines).encode("utf-8", "surrogateescape") + eol


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; garbage is left as it stands."""
    if "=?" not in value:
        return value
    from email.errors import MessageError
    from email.header import decode_header, make_header

    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError, AssertionError, MessageError):
        return value    # MessageError: bad base64, a charset name that is not ASCII (the fuzzer's)


_UNPRINTABLE = frozenset({"Cc", "Cf", "Co", "Cn", "Zl", "Zp"})


def printable(text: str, limit: int = 200) -> str:
    """A name as logs, reports and headers may show it (file names, archive members, virus
    names): encoded words decoded; bytes that were not UTF-8 (surrogate escapes) become
    U+FFFD; control and format characters (CR, LF, NUL, ESC, bidi overrides), line
    separators and unassigned code points become "?"; at most ``limit`` characters.
    """
    import unicodedata

    shown = []
    for char in decode_words(str(text))[:limit + 1]:
        category = unicodedata.category(char)
        shown.append("\ufffd" if category == "Cs" else "?" if category in _UNPRINTABLE else char)
    cleaned = "".join(shown)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


def replace_param(value: str, name: str, new: str) -> str:
    """A structured header value with parameter ``name`` set to ``new``, the rest as written.

    Raw 8-bit bytes are not valid in a MIME parameter and the header writer would turn
    the whole value into an encoded word: such a parameter is re-written as RFC 2231
    UTF-8, and 8-bit bytes outside any parameter are dropped.
    """
    pieces = _split_params(value)
    key = name.lower()
    kept, at = [_ascii_piece(pieces[0], head=True)], None
    for piece in pieces[1:]:
        written = piece.split("=", 1)[0].strip().lower()
        if written == key or written.startswith(key + "*"):
            at = len(kept) if at is None else at
            continue
        kept.append(_ascii_piece(piece))
    kept.insert(len(kept) if at is None else at, " " + format_param(name, new))
    return ";".join(kept)


def _ascii_piece(piece: str, head: bool = False) -> str:
    if piece.isascii():
        return piece
    key, separator, value = piece.partition("=")
    key = key.strip()
    if head or not separator or not re.match(_TOKEN, key) or "*" in key:
        return "".join(char for char in piece if char.isascii())
    text = value.strip().strip('"').encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " " + format_param(key, text)


def _split_params(value: str) -> list[str]:
    """Split at the semicolons that are not inside a quoted string."""
    pieces, start, quoted, escaped = [], 0, False, False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            pieces.append(value[start:index])
            start = index + 1
    pieces.append(value[start:])
    return pieces


def format_param(name: str, value: str) -> str:
    """``name=value``: a token as it is, else quoted; non-ASCII as RFC 2231 UTF-8."""
    if not value.isascii():
        from email.utils import encode_rfc2231

        return f"{name}*={encode_rfc2231(value, 'utf-8')}"
    if value and re.fullmatch(r"[!#-'*+.0-9A-Z^-~-]+", value):
        return f"{name}={value}"
    return f'{name}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def python_codec(charset: str | None) -> str:
    """The Python codec for a MIME charset; unknown charsets read as Latin-1."""
    import codecs

    name = (charset or "us-ascii").strip().strip('"').lower()
    name = {"us-ascii": "ascii", "unknown-8bit": "latin-1", "x-unknown": "latin-1"}.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):      # unknown, or garbage such as a NUL in the name
        return "latin-1"
    # A MIME charset must name a text encoding, never zlib, base64, rot13 and the like.
    return info.name if getattr(info, "_is_text_encoding", True) else "latin-1"


def decode_body(body: bytes, encoding: str) -> bytes:
    """Undo a Content-Transfer-Encoding, tolerating the damage real mail carries."""
    if encoding == "base64":
        try:        # discards what is not base64, as mail readers do; fast on large bodies
            return binascii.a2b_base64(body)
        except binascii.Error:
            pass    # bad padding or a stray last character: clean up and pad
        data = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
        data = data[: len(data) - len(data) % 4] if len(data) % 4 == 1 else data
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding in ("x-uuencode", "uuencode", "x-uue", "uue"):
        return _decode_uu(body)
    return body


def _decode_uu(body: bytes) -> bytes:
    out, inside = [], False
    for line in body.splitlines():
        if not inside:
            inside = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`"):
            break
        out.append(_uu_line(line))
    return b"".join(out)


def _uu_line(line: bytes) -> bytes:
    """One line of uuencode; a damaged one gives what its length byte promises, characters
    outside uuencode's alphabet read as zero bits (as tolerant uudecoders do)."""
    try:
        return binascii.a2b_uu(line)
    except binascii.Error:
        pass
    length = ((line[0] - 32) & 63) if line else 0
    chars = line[: (length * 4 + 5) // 3 + 1].translate(_UU_CLEAN)
    try:
        return binascii.a2b_uu(chars) if length else b""
    except binascii.Error:
        return b""


_UU_CLEAN = bytes(c if 32 <= c <= 96 else 32 for c in range(256))


def choose_encoding(data: bytes, current: str, content_type: str) -> str:
    """Keep the part's encoding where it still fits; else the lightest one that is safe."""
    if current in ("base64", "quoted-printable"):
        return current
    long_lines = any(len(line) > 998 for line in data.splitlines())
    if data.isascii() and not long_lines and b"\0" not in data:
        return current if current in ("7bit", "8bit") else "7bit"
    if not content_type.startswith("text/"):
        return "base64"
    if current == "8bit" and not long_lines and b"\0" not in data:
        return "8bit"
    return "quoted-printable"


def encode_body(data: bytes, encoding: str, eol: bytes = b"\n") -> bytes:
    """Apply a Content-Transfer-Encoding; lines end with ``eol``."""
    if encoding == "base64":
        lines = [binascii.b2a_base64(data[i:i + 57]) for i in range(0, len(data), 57)]
        encoded = b"".join(lines)
    elif encoding == "quoted-printable":
        encoded = binascii.b2a_qp(data.replace(b"\r\n", b"\n"), istext=True)
    elif encoding == "binary":
        return data                 # no lines to speak of: every byte as it is
    else:
        encoded = data.replace(b"\r\n", b"\n")
    return encoded.replace(b"\n", eol) if eol != b"\n" else encoded


def new_boundary() -> str:
    import os

    return "=_ispmailgate_" + os.urandom(12).hex()
