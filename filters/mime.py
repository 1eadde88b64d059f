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
from collections.abc import Callable, Iterator
from typing import Any

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

    def update_each(self, name: str, change: Callable[[str], str | None]) -> bool:
        """Give every ``name`` field, where it stands, the value ``change(value)`` returns
        (None: leave that field as it is); True if any field changed."""
        key, changed = name.lower(), False
        for index, (written, raw) in enumerate(self._fields):
            if written.lower() == key:
                value = change(_field_value(raw))
                if value is not None:
                    self._fields[index] = (written, fold_field(written, value, self.eol))
                    changed = True
        self.dirty = self.dirty or changed
        return changed

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
    """One MIME entity: its headers and either a body, sub-parts, or an embedded message.

    A parsed part keeps no bytes of its own: it names the span of the message buffer it
    was cut from (``_source``, ``_start``, ``_end``), so nesting costs no copy per level
    and a part nobody changed is written out as that very span.
    """

    __slots__ = ("headers", "separator", "kind", "_body", "children", "preamble", "delimiters",
                 "close_delimiter", "epilogue", "_source", "_start", "_end", "_body_start", "_dirty",
                 "_info", "default_type", "depth")

    LEAF, MULTIPART, MESSAGE = "leaf", "multipart", "message"

    def __init__(self, headers: Headers, separator: bytes = b"\n", body: bytes = b"", *,
                 raw: bytes | None = None, default_type: str = "text/plain") -> None:
        self.headers = headers
        self.separator = separator          # the blank line, b"" if the header was not ended
        self.kind = Part.LEAF
        self._body: bytes | None = body     # encoded body of a leaf part; None: still in _source
        self.children: list[Part] = []      # sub-parts, or [embedded message] for message/rfc822
        self.preamble = b""
        self.delimiters: list[bytes] = []   # raw "--boundary" line before each child
        self.close_delimiter = b""
        self.epilogue = b""
        self._source = raw                  # the buffer this part was cut from, None if new
        self._start, self._end = 0, len(raw) if raw is not None else 0
        self._body_start = 0
        self._dirty = raw is None
        self._info: dict[str, tuple[str, list]] = {}
        self.default_type = default_type
        self.depth = 0                      # nesting level in the message it was parsed from

    @classmethod
    def _cut(cls, source: bytes | bytearray, start: int, end: int, headers: Headers, separator: bytes,
             body_start: int, default_type: str, depth: int) -> Part:
        """A part that is the span ``source[start:end]``, its body from ``body_start`` on."""
        part = cls(headers, separator, None, default_type=default_type)
        part._source, part._start, part._end, part._body_start = source, start, end, body_start
        part._dirty = False
        part.depth = depth
        return part

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
        return id(self) in _changed_parts(self)

    def to_bytes(self) -> bytes:
        if self._source is not None and not self.changed:
            return _slice(self._source, self._start, self._end)
        return b"".join(self._pieces(_changed_parts(self)))

    def body_bytes(self) -> bytes:
        """The body as it goes out: for a container, reassembled from its children."""
        if self.kind == Part.LEAF:
            return self._body if self._body is not None else _slice(self._source, self._body_start, self._end)
        changed = _changed_parts(self)
        if id(self) not in changed:
            return _slice(self._source, self._body_start, self._end)
        return b"".join(self._pieces(changed)[2:])

    def _pieces(self, changed: set[int]) -> list:
        """What this part writes, as one list of pieces joined once by the caller: spans of
        the input go in as memoryviews, so nothing is copied per nesting level."""
        out: list = []
        stack: list = [self]
        while stack:
            item = stack.pop()
            if not isinstance(item, Part):
                out.append(item)
            elif item._source is not None and id(item) not in changed:
                out.append(memoryview(item._source)[item._start:item._end])
            else:
                stack += reversed(item._own_pieces())
        return out

    def _own_pieces(self) -> list:
        """Headers, blank line and body of a changed part; children stay parts to expand."""
        head = [self.headers.to_bytes(), self.separator]
        if self.kind == Part.LEAF:
            body = self._body
            body = body if body is not None else memoryview(self._source)[self._body_start:self._end]
            if not self.separator and bytes(body[:1]) in (b" ", b"\t") and len(self.headers):
                # a message with no header at all whose first line starts with white space: a
                # field added on top would take that line as its continuation
                head[1] = self.headers.eol
            return head + [body]
        if self.kind == Part.MESSAGE:
            return head + [self.children[0]]
        pieces, before = head + [self.preamble], None
        for delimiter, child in zip(self.delimiters, self.children):
            pieces += (self._starting_a_line(delimiter, before), child)
            before = child
        return pieces + [self._starting_a_line(self.close_delimiter, before), self.epilogue]

    def _starting_a_line(self, delimiter: bytes, before: Part | None) -> bytes:
        """A delimiter line that followed an empty part directly (the line end before it
        ended the delimiter line above) gets a line end of its own once a filter gave that
        part content: it must still start a line.  While the part is empty, nothing is added."""
        if before is None or not delimiter or delimiter.startswith((b"\n", b"\r\n")):
            return delimiter
        if before._writes_nothing():
            return delimiter
        return self.headers.eol + delimiter

    def _writes_nothing(self) -> bool:
        """True for a part that serialises to no bytes at all (an empty part)."""
        part = self
        while not len(part.headers) and not part.separator:
            if part.kind == Part.LEAF:
                return not (len(part._body) if part._body is not None else part._end > part._body_start)
            if part.kind == Part.MULTIPART:     # its delimiter lines at least
                return False
            part = part.children[0]             # an embedded message without a header of its own
        return False

    # -- MIME information ------------------------------------------------------------------

    def _params(self, header: str) -> list[tuple[str, Any]] | None:
        """The parameters of a structured header as RFC 2045/2231 read them, or None if absent."""
        value = self.headers.get(header)
        if value is None:
            return None
        key = header.lower()
        cached = self._info.get(key)
        if cached is None or cached[0] != value:
            cached = self._info[key] = (value, parse_params(bare_head(_as_text(value))))
        return cached[1]

    @property
    def content_type(self) -> str:
        """``maintype/subtype`` in lower case; the default type when missing, text/plain when invalid."""
        value = self.headers.get("Content-Type")
        if value is None:
            return self.default_type
        content_type = bare_head(_as_text(value)).partition(";")[0].strip().lower()
        return content_type if _TOKEN_TYPE.fullmatch(content_type) else "text/plain"     # RFC 2045 5.2

    def param(self, name: str, header: str = "Content-Type") -> str | None:
        """A parameter of Content-Type (or another header), RFC 2231 continuations joined."""
        key = name.lower()
        value = next((v for k, v in self._params(header) or () if k.lower() == key), None)
        if value is None:
            return None
        value = (value[0], value[1], _unquote(value[2])) if isinstance(value, tuple) else _unquote(value)
        if value == "":
            return value
        return _collapse_rfc2231(value).strip()

    def extended_param(self, name: str, header: str = "Content-Type") -> bool:
        """Was parameter ``name`` written in RFC 2231's extended form (charset'language'text)?"""
        key = name.lower()
        return any(isinstance(v, tuple) for k, v in self._params(header) or () if k.lower() == key)

    @property
    def charset(self) -> str | None:
        charset = self.param("charset")
        return charset.lower() if charset else None

    @property
    def disposition(self) -> str | None:
        value = bare_head(self.headers.get("Content-Disposition") or "")
        return value.split(";", 1)[0].lower() or None

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
        return bare_head(self.headers.get("Content-Transfer-Encoding") or "").lower()

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
        encoding = self.transfer_encoding
        if self.kind == Part.LEAF and self._body is None and encoding in ("base64", "quoted-printable"):
            with memoryview(self._source) as view:      # decoded straight from the input
                return decode_body(view[self._body_start:self._end], encoding)
        return decode_body(self.body_bytes(), encoding)

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
        return decode_text(self.decoded(), self.charset)

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
    def from_bytes(cls, data: bytes, *, max_depth: int = MAX_DEPTH, max_parts: int = MAX_PARTS) -> Part:
        """Parse one MIME entity (header and body) from bytes.  Content found inside a
        message is parsed with :meth:`Message.parse_inner`, within that message's limits,
        and a message's own content parsed again with :meth:`Message.parse_again`."""
        return _Parser(max_depth, max_parts).parse_all(bytes(data), 0)

    @classmethod
    def opaque(cls, data: bytes | bytearray) -> Part:
        """``data`` as one leaf whatever its type: the header parsed (that never fails),
        the body uncut.  What a message the parser gave up on looks like to filters."""
        headers, separator, body_start = _parse_headers(data)
        return cls._cut(data, 0, len(data), headers, separator, body_start, "text/plain", 0)


class Message:
    """One message: the bytes that came in, parsed into a :class:`Part` tree on first use.

    A filter that only reads leaves ``changed`` false, and :meth:`to_bytes` then returns
    the very object that came in, so the core delivers the input byte for byte.
    ``max_depth`` and ``max_parts`` bound the tree and everything parsed inside it
    (:meth:`parse_inner`); past them the rest is kept as one opaque part (see ``defects``).

    Parsing never fails: should the parser give up on a message, ``unparsed`` says why
    and ``root`` is the whole message as one opaque part (:meth:`Part.opaque`) -- its
    header fields can still be read and changed, its body is one blob.  Each filter
    declares what it does with such a message (``Filter.unparsed_mail``).
    """

    def __init__(self, raw: bytes | bytearray, *, max_depth: int = MAX_DEPTH,
                 max_parts: int = MAX_PARTS) -> None:
        self.raw = raw
        self.max_depth = max_depth
        self.max_parts = max_parts
        self._root: Part | None = None
        self._replaced = False
        self._inherited = False         # a fork of a message some filter had changed
        self._parser = _Parser(max_depth, max_parts)
        self.defects = self._parser.defects
        self._gave_up: str | None = None

    @property
    def root(self) -> Part:
        if self._root is None:
            try:
                self._root = self._parser.parse_all(self.raw, 0)    # the buffer itself, no copy
            except ParseError as error:
                self._root = Part.opaque(self.raw)
                self._gave_up = str(error)
                self.defects.append(f"the parser gave up ({error}): the body is kept as one opaque part")
        return self._root

    @property
    def unparsed(self) -> str | None:
        """Why the parser gave up on this message (it is parsed first if need be); None if
        it did not.  A message once unparsed stays so, whatever a filter made of it."""
        return self.root and self._gave_up

    @root.setter
    def root(self, part: Part) -> None:
        self._root = part
        self._replaced = True

    def parse_inner(self, data: bytes, depth: int) -> Part:
        """Parse a message found inside this one (an attached message sent encoded, decrypted
        content) at nesting level ``depth``: its parts count toward this message's
        ``max_parts`` and its levels toward ``max_depth``, so no inner parse starts afresh."""
        return self._parser.parse_all(bytes(data), depth)

    def parse_again(self, data: bytes, depth: int = 0) -> Part:
        """Parse this message's own content again (re-assembled, to be wrapped or signed)
        at nesting level ``depth``: within this message's ``max_depth`` and ``max_parts``,
        counted afresh (these are the same parts, not more of them); where the parser
        gives up, the content as one opaque part."""
        try:
            return _Parser(self.max_depth, self.max_parts).parse_all(bytes(data), depth)
        except ParseError:
            return Part.opaque(bytes(data))

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
        if self._gave_up is not None:       # the copy would fail the same way: opaque at once
            copy._root, copy._gave_up = Part.opaque(copy.raw), self._gave_up
        return copy

    def top_headers(self) -> Headers:
        """The top-level header block, without parsing the bodies (cheap; read only)."""
        if self._root is not None:
            return self._root.headers
        return _parse_headers(self.raw)[0]

    def header_value(self, name: str) -> str | None:
        """One top-level header field's value (see :meth:`top_headers`)."""
        return self.top_headers().get(name)


class _Parser:
    """Cuts a buffer into a Part tree; never fails, records what it had to tolerate.

    Every part is a span of the one buffer (no copies), and each byte is looked at a
    bounded number of times per nesting level: the cost is linear in the message.
    """

    def __init__(self, max_depth: int, max_parts: int) -> None:
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.count = 0
        self.defects: list[str] = []

    def parse_all(self, source: bytes | bytearray, depth: int) -> Part:
        try:
            return self.parse(source, 0, len(source), depth, "text/plain")
        except (RecursionError, ValueError, LookupError, TypeError) as error:
            # never from sender data by design (every codec result is checked): a bug's
            # safety net; MemoryError is the machine's trouble and goes on as it is
            raise ParseError(f"{type(error).__name__}: {error}") from error

    def parse(self, source: bytes | bytearray, start: int, end: int, depth: int, default_type: str) -> Part:
        self.count += 1
        headers, separator, body_start = _parse_headers(source, start, end)
        part = Part._cut(source, start, end, headers, separator, body_start, default_type, depth)
        content_type = part.content_type
        if not content_type.startswith(("multipart/", "message/")):
            return part
        if depth >= self.max_depth or self.count >= self.max_parts:
            self.defects.append(f"nesting deeper than {self.max_depth} levels or more than "
                                f"{self.max_parts} parts: the rest is kept as one opaque part")
            return part
        if content_type.startswith("multipart/"):
            self._split_multipart(part, depth)
        elif content_type in ("message/rfc822", "message/global") and part.transfer_encoding in _IDENTITY_ENCODINGS:
            part.kind, part.children = Part.MESSAGE, [self.parse(source, body_start, end, depth + 1, "text/plain")]
        return part

    def _split_multipart(self, part: Part, depth: int) -> None:
        boundary = part.param("boundary")
        if not boundary:
            self.defects.append("multipart without a boundary: kept as one part")
            return
        mark = _boundary_mark(part, boundary)
        if mark is None:
            self.defects.append("multipart with a boundary no line can match (RFC 2231 decoded to "
                                "other than ASCII): kept as one part")
            return
        lines = self._boundary_lines(part, mark)
        if lines is None:
            return
        source, body_start, end = part._source, part._body_start, part._end
        child_type = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
        children, delimiters, start = [], [], None
        for begin, line_end, closing in lines:
            # a line end before ``start`` ended the previous delimiter line: between two
            # delimiter lines that follow each other is an empty part, not a shared line end
            cut = _eol_start(source, body_start if start is None else start, begin)
            if start is None:
                part.preamble = _slice(source, body_start, cut)
            else:
                children.append(self.parse(source, start, cut, depth + 1, child_type))
            if closing:
                part.close_delimiter, part.epilogue = _slice(source, cut, line_end), _slice(source, line_end, end)
                start = None
                break
            delimiters.append(_slice(source, cut, line_end))
            start = line_end
        if not delimiters:
            self.defects.append(f"no boundary {boundary!r} found in {part.content_type}: kept as one part")
            part.preamble = part.close_delimiter = part.epilogue = b""
            return
        if start is not None:
            self.defects.append(f"{part.content_type} ends without its closing boundary")
            children.append(self.parse(source, start, end, depth + 1, child_type))
        part.kind, part.children, part.delimiters = Part.MULTIPART, children, delimiters

    def _boundary_lines(self, part: Part, mark: bytes) -> list[tuple[int, int, bool]] | None:
        """The delimiter lines up to the closing one; None when they would open too many parts."""
        lines, room = [], self.max_parts - self.count
        for line in _boundary_lines(part._source, part._body_start, part._end, mark):
            lines.append(line)
            if line[2]:
                break
            if len(lines) > room:        # each delimiter opens a part: too many to take apart
                self.defects.append(f"more than {self.max_parts} parts: the rest is kept as one opaque part")
                return None
        return lines


def _boundary_mark(part: Part, boundary: str) -> bytes | None:
    """``--boundary`` as the bytes its delimiter lines start with; None if no line can match.

    A boundary written as it is stands for its own bytes, 8-bit ones included (as for the
    standard library, which reads both lines and header as UTF-8 with surrogate escapes).
    One written in RFC 2231's extended form is text a codec made of sender bytes: it
    matches only if it is ASCII (RFC 2046 allows nothing else), never as the bytes of
    some encoding of it -- a lone surrogate, for one, has none."""
    if part.extended_param("boundary") and not boundary.isascii():
        return None
    try:
        return b"--" + boundary.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def _slice(data: bytes | bytearray, start: int, end: int) -> bytes:
    """``data[start:end]`` as bytes, copied once (a bytearray slice would be copied twice)."""
    if type(data) is bytes:
        return data[start:end]
    with memoryview(data) as view:
        return bytes(view[start:end])


def _changed_parts(root: Part) -> set[int]:
    """The ids of the parts at and under ``root`` that changed or hold one that did."""
    order, stack = [], [root]
    while stack:
        part = stack.pop()
        order.append(part)
        stack += part.children
    changed: set[int] = set()
    for part in reversed(order):        # every part after the parts inside it
        if part._dirty or part.headers.dirty or any(id(child) in changed for child in part.children):
            changed.add(id(part))
    return changed


def _boundary_lines(data: bytes | bytearray, start: int, end: int, mark: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, closing) of each line of ``data[start:end]`` that is ``--boundary`` or
    ``--boundary--`` followed only by blanks.  The regular expression searches for the
    line break and the mark together, in C: a mark in the middle of a line costs no Python
    work, however often an attacker repeats it on every nesting level."""
    line = re.escape(mark) + rb"(--)?[ \t\r]*(?=\n|\Z)"     # its line break begins the next match
    first = re.compile(line).match(data, start, end)
    if first:
        yield start, min(first.end() + 1, end), first.group(1) is not None
    for found in re.compile(b"\n" + line).finditer(data, start, end):
        yield found.start() + 1, min(found.end() + 1, end), found.group(1) is not None


def _eol_start(data: bytes | bytearray, floor: int, position: int) -> int:
    """Where the line end before ``position`` starts (it belongs to the boundary line)."""
    if position - 2 >= floor and data[position - 2] == 13 and data[position - 1] == 10:
        return position - 2
    if position - 1 >= floor and data[position - 1] == 10:
        return position - 1
    return position


def _parse_headers(data: bytes | bytearray, start: int = 0, end: int | None = None) -> tuple[Headers, bytes, int]:
    """Split the header block off ``data[start:end]``: (headers, blank line, offset of the body).

    A field folded over many lines is one span of the input, cut out once at the end:
    the cost is linear in the header, however it is folded.
    """
    end = len(data) if end is None else end
    field_name = re.compile(_FIELD_NAME).match
    spans: list[list] = []      # [name as written, start, end] of each field
    first_end = data.find(b"\n", start, end)
    eol = b"\r\n" if first_end > start and data[first_end - 1] == 13 else b"\n"
    position, separator = start, b""
    while position < end:
        line_end = data.find(b"\n", position, end)
        line_end = end if line_end < 0 else line_end + 1
        if line_end - position <= 2 and _slice(data, position, line_end) in (b"\n", b"\r\n"):
            separator, position = _slice(data, position, line_end), line_end
            break
        if data[position] in (32, 9) and spans:
            spans[-1][2] = line_end
        else:
            match = field_name(data, position, line_end)
            if not match:
                break       # not a header line: the body starts here without a blank line
            spans.append([match.group(1).decode("ascii"), position, line_end])
        position = line_end
    return Headers([(name, _slice(data, a, b)) for name, a, b in spans], eol), separator, position


def bare_head(value: str) -> str:
    """A structured field's value with the token(s) before its parameters read as a strict
    parser reads them: comments (nested, with quoted pairs) count as white space, white
    space around ``/`` goes and other runs of it become one space, so ``(c) multipart
    (x)/ mixed`` is the multipart/mixed a reader sees, and ``text/plain x`` stays two
    words (no valid type).  The parameters after the first ``;`` outside a comment stay
    as written.  One pass, linear."""
    if "(" not in value and not re.search(r"\s", value.split(";", 1)[0].strip()):
        return value.strip()
    head, depth, escaped, rest = [], 0, False, ""
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif depth:
            escaped = char == "\\"
            depth += {"(": 1, ")": -1}.get(char, 0)
        elif char == "(":
            depth = 1
            head.append(" ")
        elif char == ";":
            rest = value[index:]
            break
        else:
            head.append(" " if char.isspace() else char)
    words = re.sub(r" *(/) *", r"\1", re.sub(r" +", " ", "".join(head))).strip()
    return words + rest


_TOKEN_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+/[!#$%&'*+\-.^_`|~0-9a-z]+")


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

        value = without_surrogates(value)       # raw 8-bit bytes cannot go into an encoded word
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


def addresses(values: list[str]) -> list[tuple[str, str]]:
    """``email.utils.getaddresses(values)``, whatever the sender wrote: its comment parser
    recurses once per nesting level, so ``((((...`` past the recursion limit raised
    RecursionError; such a value is read again with its comments taken out (linear)."""
    from email.utils import getaddresses

    found = []
    for value in values:
        try:
            found += getaddresses([value])
        except RecursionError:
            found += getaddresses([_without_comments(value)])
    return found


def _without_comments(value: str) -> str:
    """``value`` with its RFC 5322 comments (nested, with quoted pairs) replaced by a space."""
    kept, depth, quoted, escaped = [], 0, False, False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                kept.append(char)
        elif char == "\\":
            escaped = True
            if depth == 0:
                kept.append(char)
        elif quoted:
            quoted = char != '"'
            kept.append(char)
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
            if depth == 0:
                kept.append(" ")
        elif depth == 0:
            quoted = char == '"'
            kept.append(char)
    return "".join(kept)


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; garbage is left as it stands.

    Decodes as the standard library's ``decode_header`` and ``make_header`` do, with a
    scanner that looks at each character a bounded number of times: theirs rescans the
    rest of a line for every ``=?`` that is never closed and copies lists per word.
    """
    if "=?" not in value:
        return value
    from email.errors import MessageError
    from email.header import make_header

    try:
        words = _decoded_words(value)
        # what a codec made of sender bytes is checked: UTF-7 decodes to lone surrogates
        return value if words is None else without_surrogates(str(make_header(words)))
    except (ValueError, LookupError, UnicodeError, AssertionError, MessageError, TypeError):
        return value    # MessageError: bad base64, a charset name that is not ASCII (the fuzzer's)


def _decoded_words(value: str) -> list[tuple[bytes, str | None]] | None:
    """What ``email.header.decode_header`` returns for ``value``; None without encoded words.

    One pass, word by word, holding back only a blank between two words (the standard
    hides it when both are encoded): no list of every word of a megabyte-long Subject.
    """
    collapsed: list[tuple[list[bytes], str | None]] = []
    encoded, previous, held = False, None, None
    for word in _words(value):
        if held is not None and word[1] is None:
            _collapse_word(collapsed, held)         # the blank stays: no encoded word follows
        held = None
        if previous is not None and previous[1] and word[1] is None and word[0].isspace():
            held, previous = word, word
            continue
        encoded = encoded or word[1] is not None
        _collapse_word(collapsed, word)
        previous = word
    if held is not None:
        _collapse_word(collapsed, held)
    if not encoded:
        return None
    return [(b"".join(pieces), charset) for pieces, charset in collapsed]


def _words(value: str) -> Iterator[tuple[str, str | None, str | None]]:
    """(text, encoding, charset) per word of ``decode_header``'s first pass: encoded words,
    and the text between them (each line's first text stripped on the left)."""
    for line in value.splitlines():
        for index, piece in enumerate(_split_encoded_words(line)):
            if isinstance(piece, tuple):
                yield piece[2], piece[1].lower(), piece[0].lower()
            elif index == 0 and piece.lstrip() or index and piece:
                yield (piece.lstrip() if index == 0 else piece), None, None


def _collapse_word(collapsed: list, word: tuple[str, str | None, str | None]) -> None:
    """Decode one word and add its bytes to the run of words in the same charset."""
    import binascii as _binascii
    from email import base64mime, quoprimime
    from email.errors import HeaderParseError

    text, encoding, charset = word
    if charset is not None and text_codec(charset) is None:
        raise LookupError(charset)      # as for an unknown charset: no escape codec, no zlib
    if encoding == "q":
        text = quoprimime.header_decode(text)
    elif encoding == "b":
        try:
            text = base64mime.decode(text + "==="[:(4 - len(text) % 4) % 4])
        except _binascii.Error:
            raise HeaderParseError("Base64 decoding error") from None
    data = bytes(text, "raw-unicode-escape") if isinstance(text, str) else text
    if collapsed and collapsed[-1][1] == charset:
        collapsed[-1][0].extend((b" ", data) if charset is None else (data,))
    else:
        collapsed.append(([data], charset))


def _split_encoded_words(line: str) -> Iterator:
    """``line`` cut as ``email.header.ecre.split`` cuts it: text, then (charset, encoding,
    encoded text) per encoded word.  Once no ``?=`` follows, no word can: the scan stops
    instead of trying every later ``=?`` against the rest of the line."""
    taken = position = 0
    while True:
        start = line.find("=?", position)
        charset_end = line.find("?", start + 2) if start >= 0 else -1
        if charset_end < 0:
            break
        if line[charset_end + 1:charset_end + 2] not in ("q", "Q", "b", "B") or \
                line[charset_end + 2:charset_end + 3] != "?":
            position = start + 1
            continue
        close = line.find("?=", charset_end + 3)
        if close < 0:
            break
        yield line[taken:start]
        yield line[start + 2:charset_end], line[charset_end + 1], line[charset_end + 3:close]
        taken = position = close + 2
    yield line[taken:]


def parse_params(value: str) -> list[tuple[str, Any]]:
    """The parameters of a structured header value, as ``email.message`` reads them
    (its ``_get_params_preserve``): the first entry is the value before the first ";";
    RFC 2231 continuations are joined, an extended value is (charset, language, text).

    Linear where the standard library rescans the rest of the value for every ";" and
    fails on continuation numbers it cannot sort or convert.
    """
    params = []
    for piece in _split_at_semicolons(value):
        name, separator, text = piece.partition("=")
        params.append((name.strip(), text.strip()) if separator else (piece.strip(), ""))
    return _decode_params(params)


def _split_at_semicolons(value: str) -> list[str]:
    """``email.message._parseparam``: pieces between semicolons outside double quotes
    (a quote preceded by a backslash does not count), each ``name=value`` tidied."""
    pieces, position, size = [], 0, len(value)
    while True:
        end = value.find(";", position)
        counted, quotes = position, 0
        while end > position:
            quotes += value.count('"', counted, end) - value.count('\\"', counted, end)
            if quotes % 2 == 0:
                break
            counted, end = end, value.find(";", end + 1)
        end = size if end < 0 else end
        piece = value[position:end]
        if "=" in piece:
            name, _, text = piece.partition("=")
            piece = name.strip().lower() + "=" + text.strip()
        pieces.append(piece.strip())
        if end >= size:
            return pieces
        position = end + 1


_CONTINUATION = r"^(?P<name>\w+)\*((?P<num>[0-9]+)\*?)?$"


def _decode_params(params: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    """``email.utils.decode_params`` that sorts any continuation numbers and never raises."""
    decoded: list[tuple[str, Any]] = [params[0]]
    continued: dict[str, list[tuple[int, str, bool]]] = {}
    for name, text in params[1:]:
        encoded = name.endswith("*")
        text = _unquote(text)
        match = re.match(_CONTINUATION, name, re.ASCII)
        if match:
            number = match.group("num")
            # no number sorts first; an absurd one (more digits than int() takes) last
            order = -1 if number is None else int(number) if len(number) < 10 else 10 ** 10
            continued.setdefault(match.group("name"), []).append((order, text, encoded))
        else:
            decoded.append((name, '"%s"' % _quote(text)))
    for name, pieces in continued.items():
        pieces.sort()
        extended = any(encoded for _, _, encoded in pieces)
        if extended:
            from urllib.parse import unquote as percent_decoded

            joined = _quote("".join(percent_decoded(text, encoding="latin-1") if encoded else text
                                    for _, text, encoded in pieces))
            fields = joined.split("'", 2)
            charset, language, text = fields if len(fields) == 3 else (None, None, joined)
            decoded.append((name, (charset, language, '"%s"' % text)))
        else:
            decoded.append((name, '"%s"' % _quote("".join(text for _, text, _ in pieces))))
    return decoded


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _unquote(text: str) -> str:
    """``email.utils.unquote``: one pair of double quotes or angle brackets removed."""
    if len(text) > 1:
        if text.startswith('"') and text.endswith('"'):
            return text[1:-1].replace("\\\\", "\\").replace('\\"', '"')
        if text.startswith("<") and text.endswith(">"):
            return text[1:-1]
    return text


def _collapse_rfc2231(value: Any) -> str:
    """``email.utils.collapse_rfc2231_value``: an extended value decoded in its charset.

    Only a character set of mail decodes it, and what it decodes to is checked: a name no
    codec has leaves the text as it stands (as the standard library does), a name no
    codec takes (a NUL in it) or a codec that is no character set (unicode-escape, idna)
    reads as UTF-8, the likeliest; undecodable bytes and lone surrogates become U+FFFD."""
    if not isinstance(value, tuple):
        return _unquote(value)
    charset, _, text = value
    if text_codec(charset) is None and _no_codec(charset):
        return _unquote(text)
    return decode_text(bytes(text, "raw-unicode-escape"), charset if text_codec(charset) else "utf-8")


def _no_codec(charset: str | None) -> bool:
    """Does ``charset`` name no codec at all (unknown, or one that is no text encoding)?"""
    import codecs

    try:
        return not getattr(codecs.lookup(charset or "us-ascii"), "_is_text_encoding", True)
    except LookupError:
        return True
    except (ValueError, TypeError):
        return False


def _as_text(value: str) -> str:
    """A header value's raw 8-bit bytes as text: UTF-8 where valid, else U+FFFD."""
    return value if value.isascii() else value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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


# Python codecs that are no character set of mail, though Python calls them text encodings:
# the escape codecs turn ASCII into any code point (lone surrogates, NUL, CR, LF), idna and
# punycode refuse to replace errors, "undefined" refuses everything.
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined",
                           "unicode_escape", "raw_unicode_escape"})
_SURROGATE = "[\ud800-\udfff]"


def text_codec(charset: str | None) -> str | None:
    """The Python codec that reads MIME charset ``charset`` (None: US-ASCII), or None when
    no codec may: an unknown name, garbage (a NUL in it ...), a codec that is no text
    encoding (zlib, base64, rot13) or no character set of mail (the escape codecs, idna)."""
    import codecs

    name = (charset or "us-ascii").strip().strip('"').lower()
    name = {"us-ascii": "ascii", "unknown-8bit": "latin-1", "x-unknown": "latin-1"}.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        return None
    return info.name


def python_codec(charset: str | None) -> str:
    """The Python codec for a MIME charset; unknown charsets (see :func:`text_codec`) read as Latin-1."""
    return text_codec(charset) or "latin-1"


def decode_text(data: bytes, charset: str | None) -> str:
    """Sender bytes as text in their declared charset, whatever they hold: undecodable bytes
    and lone surrogates (UTF-7 and UTF-16 can decode to them) become U+FFFD, so what comes
    out can be encoded, written in a header or compared again."""
    try:
        text = data.decode(python_codec(charset), "replace")
    except (UnicodeError, LookupError, ValueError, TypeError):     # a codec that cannot replace
        text = data.decode("latin-1")
    return without_surrogates(text)


def without_surrogates(text: str) -> str:
    """``text`` with every surrogate code point (which no UTF-8 encoder takes) as U+FFFD."""
    return re.sub(_SURROGATE, "\ufffd", text) if re.search(_SURROGATE, text) else text


def decode_body(body: bytes | memoryview, encoding: str) -> bytes:
    """Undo a Content-Transfer-Encoding, tolerating the damage real mail carries.

    Damaged input costs no more memory than good input: no list of pieces, no copy of
    the cleaned data to pad it.
    """
    if encoding == "base64":
        try:        # discards what is not base64, as mail readers do; fast on large bodies
            return binascii.a2b_base64(body)
        except binascii.Error:
            pass    # bad padding or a stray last character: clean up and pad
        data = bytes(body).translate(None, _not_base64())
        whole = len(data) - len(data) % 4
        tail = data[whole:]                 # a last quantum of 1 character carries no byte
        with memoryview(data) as view:
            decoded = binascii.a2b_base64(view[:whole]) if whole else b""
        del data
        return decoded + binascii.a2b_base64(tail + b"=" * (4 - len(tail))) if len(tail) > 1 else decoded
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding in ("x-uuencode", "uuencode", "x-uue", "uue"):
        return _decode_uu(body)
    return body


def _not_base64() -> bytes:
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return bytes(byte for byte in range(256) if byte not in alphabet)


def _decode_uu(body: bytes) -> bytes:
    out, inside = bytearray(), False
    for match in re.finditer(rb"([^\r\n]*)(?:\r\n|\r|\n|\Z)", body):    # bytes.splitlines, lazily
        if match.start() == len(body):
            break
        line = match.group(1)
        if not inside:
            inside = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`"):
            break
        out += _uu_line(line)
    return bytes(out)


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


def encode_body(data: bytes, encoding: str, eol: bytes = b"\n", *, final_eol: bool = True) -> bytes:
    """Apply a Content-Transfer-Encoding; lines end with ``eol`` (base64 without the last
    one if ``final_eol`` is false)."""
    if encoding == "base64":
        return _base64(data, eol, final_eol)
    if encoding == "quoted-printable":
        encoded = binascii.b2a_qp(data.replace(b"\r\n", b"\n"), istext=True)
    elif encoding == "binary":
        return data                 # no lines to speak of: every byte as it is
    else:
        encoded = data.replace(b"\r\n", b"\n")
    return encoded.replace(b"\n", eol) if eol != b"\n" else encoded


_BASE64_BLOCK = 57 * 1024


def _base64(data: bytes, eol: bytes, final_eol: bool) -> bytes:
    """Base64 lines, written in blocks to a BytesIO, whose value is then handed over
    without a copy: the output exists once, not as a million small pieces and their join."""
    import io

    out = io.BytesIO()
    for start in range(0, len(data), _BASE64_BLOCK):
        out.write(_base64_block(data, start, eol))
    if data and not final_eol:
        out.truncate(out.tell() - len(eol))
    return out.getvalue()


def _base64_block(data: bytes, start: int, eol: bytes) -> bytes:
    end = min(start + _BASE64_BLOCK, len(data))
    block = b"".join([binascii.b2a_base64(data[i:min(i + 57, end)]) for i in range(start, end, 57)])
    return block.replace(b"\n", eol) if eol != b"\n" else block


def new_boundary() -> str:
    import os

    return "=_ispmailgate_" + os.urandom(12).hex()
