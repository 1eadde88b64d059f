"""banner: adds a disclaimer or a warning to a message's text and subject (the original's Banner).

Which parts: in ``multipart/alternative`` every alternative; in ``multipart/related``
its root (the part its ``start`` parameter names, else the first); in any other
multipart the first text part only; a single-part text message itself.  Never an
attachment (a part with a file name, or a ``Content-Disposition`` other than inline: RFC
2183 makes an unknown one an attachment), never an embedded message, never the content
of ``multipart/signed``, ``multipart/encrypted`` or S/MIME.  Text is added to
``text/plain`` parts, an HTML snippet to ``text/html`` parts, where the document shows it
(never inside an inert or hidden container, see :mod:`.markup`); every other part keeps
its bytes.  The subject prefix goes on every Subject field (readers differ in which of
two they show).  A message that already went through the same banner (its marker header
names this banner and the text is exactly where this configuration puts it) is left byte
for byte as it is.

A filter that says it warned must have warned where the reader looks: where the banner
cannot go in place -- no text part, an alternative it cannot carry, a structure past the
parser's limits, a message the parser gave up on, a charset it cannot write, an HTML
part with no place for it -- the message's body goes, byte for byte, under a new
multipart/mixed beside the banner, and the log says why.  Stateful charsets (ISO-2022-*,
HZ, UTF-7) and wide ones (UTF-16, UTF-32) are decoded and encoded again, never appended
to by byte.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..base import Context, Filter, OptionError, TempFail, choice, option
from ..mime import Message, Part, decode_words, printable, text_codec
from .parts import PROTECTED, chosen_parts, is_wrapped, wrap

MARKER = "X-ispMailGate-Banner"
_KNOWN_ENCODINGS = frozenset({"", "7bit", "8bit", "binary", "quoted-printable", "base64"})
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Texts:
    """What one run adds: the plain text, the HTML snippet, and the marker that names them."""
    plain: str
    html: str
    html_given: bool
    mark: str


@dataclass(frozen=True)
class Banner(Filter):
    """Appends (or prepends) a configured text to the message's text parts."""

    name = "banner"
    description = "add a disclaimer or warning to the message text and subject"
    lazy_modules = ("codecs", "email.header", "hashlib", "html", "html.parser", "unicodedata",
                    "ispmailgate_filters.banner.markup")
    unparsed_mail = "process"       # the whole message goes under the banner

    text: str = option("", "plain text added to text/plain parts (HTML-escaped into text/html "
                           "parts when no html is set)")
    text_file: str = option("", "file holding the plain text (UTF-8), read at each run; instead of text")
    html: str = option("", "HTML snippet inserted into text/html parts (its text, tags removed, "
                           "goes into text/plain parts when no text is set)")
    html_file: str = option("", "file holding the HTML snippet (UTF-8), read at each run; instead of html")
    position: str = option("bottom", "bottom: after a text part's last line; top: before its first line, "
                                     "where the original put its banner (for text/html parts see "
                                     "html_position)", convert=choice("bottom", "top"))
    html_position: str = option("same", "where the snippet goes in text/html parts: same (as position), "
                                        "top (right after <body>, else after </head>, else after <html>) or "
                                        "bottom (before </body>, else before </html>)",
                                convert=choice("same", "top", "bottom"))
    subject_prefix: str = option("", "added to the start of the Subject unless it already starts "
                                     "with it, e.g. \"[EXTERNAL] \"")
    on_dkim_signed: str = option("modify", "modify: change DKIM-signed mail too (its signature breaks: "
                                           "configure [arc]); skip: leave a message that has a "
                                           "DKIM-Signature header untouched and log it",
                                 convert=choice("modify", "skip"))
    on_protected: str = option("skip", "skip | wrap: a multipart/signed, multipart/encrypted or S/MIME "
                                       "message is left untouched (skip), or attached whole as "
                                       "message/rfc822 under a new multipart/mixed carrying the "
                                       "banner (wrap); the subject prefix applies either way",
                               convert=choice("skip", "wrap"))

    def __post_init__(self) -> None:
        for inline, stored in (("text", "text_file"), ("html", "html_file")):
            if getattr(self, inline) and getattr(self, stored):
                raise OptionError(stored, f"set {inline} or {stored}, not both")
        if not (self.text or self.text_file or self.html or self.html_file or self.subject_prefix):
            raise OptionError("text", "nothing to add: set text, text_file, html, html_file or subject_prefix")
        if re.search(r"[\x00-\x1f\x7f]", self.subject_prefix):
            raise OptionError("subject_prefix", "control characters (line breaks, tabs ...) are not allowed")

    def breaks_dkim(self) -> bool:
        return self.on_dkim_signed == "modify"

    def problems(self) -> list[str]:
        found = []
        for key in ("text_file", "html_file"):
            path = getattr(self, key)
            if path:
                try:
                    Path(path).read_text("utf-8")
                except (OSError, UnicodeDecodeError) as error:
                    found.append(f"{key} {path}: {getattr(error, 'strerror', None) or error}")
        return found

    # -- one message ---------------------------------------------------------------------

    def process(self, message: Message, ctx: Context) -> None:
        signature = message.header_value("DKIM-Signature")
        if signature is not None and self.on_dkim_signed == "skip":
            domain = re.search(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", signature)
            ctx.log.info("%s: message has a DKIM-Signature (d=%s): left untouched (on_dkim_signed = skip)",
                         self.title, domain.group(1) if domain else "?")
            return
        texts = self.texts()
        headers = message.headers
        marked = any(texts.mark in value.split() for value in headers.get_all(MARKER))
        changed = self._add_to_body(message, texts, marked, ctx) if texts.plain or texts.html else False
        changed = self._prefix_subject(message) or changed
        if changed and marked:
            ctx.log.warning("%s: marker %s present but the banner was missing: added it "
                            "(a forged or stale marker)", self.title, texts.mark)
        elif changed:
            message.headers.add(MARKER, f"{texts.mark} ({self.title})")

    def texts(self) -> Texts:
        """The banner as configured now (files are read at each run)."""
        import hashlib

        from .markup import html_to_text, text_to_html

        plain = _read(self.text_file, "text_file") if self.text_file else self.text
        html = _read(self.html_file, "html_file") if self.html_file else self.html
        plain, html = _clean(plain).strip("\n"), _clean(html).strip()
        given = bool(html)
        plain = plain or (html_to_text(html) if html else "")
        html = html or (text_to_html(plain) if plain else "")
        seed = "\0".join((self.position, plain, html, self.subject_prefix))
        return Texts(plain, html, given, hashlib.sha256(seed.encode("utf-8")).hexdigest()[:16])

    def _add_to_body(self, message: Message, texts: Texts, marked: bool, ctx: Context) -> bool:
        root = message.root
        if message.unparsed is not None:    # no part can be found in it: the whole goes under
            self._wrap_instead(message, texts, [f"the message cannot be parsed ({message.unparsed})"], ctx)
            return True
        if root.content_type in PROTECTED:
            if self.on_protected == "skip":
                ctx.log.info("%s: %s message: body left untouched (on_protected = skip)",
                             self.title, root.content_type)
                return False
            wrap(message, self._carrier(texts, root.headers.eol), self.position)
            ctx.log.info("%s: %s message attached whole under the banner (on_protected = wrap)",
                         self.title, root.content_type)
            return True
        if marked and is_wrapped(root, self._carrier(texts, root.headers.eol), self.position):
            return False
        parts = chosen_parts(root)
        if ctx.log.isEnabledFor(logging.DEBUG):
            names = [printable(p.filename) for p in root.leaves() if p.filename and p not in parts]
            if names:
                ctx.log.debug("%s: attachments left alone: %s", self.title, ", ".join(names))
        plans = [(part, self._plan(part, texts, marked)) for part in parts]
        refused = [f"{part.content_type} part: {plan}" for part, plan in plans if isinstance(plan, str)]
        if refused or not parts:
            self._wrap_instead(message, texts, refused, ctx)
            return True
        return self._apply(root, [(part, plan) for part, plan in plans if plan is not None], ctx)

    def _wrap_instead(self, message: Message, texts: Texts, refused: list[str], ctx: Context) -> None:
        """Where the banner cannot go in place, the whole body goes under it: a reader sees
        the warning first (or last), never a marker or a subject tag without it."""
        opaque = any("opaque" in defect for defect in message.defects)
        why = "; ".join(refused) or ("MIME structure beyond the parser's limits" if opaque
                                     else "no text part can carry the banner")
        wrap(message, self._carrier(texts, message.root.headers.eol), self.position, whole=False)
        log = ctx.log.info if not refused and not opaque else ctx.log.warning
        log("%s: %s: the body was put under the banner instead (multipart/mixed)", self.title, why)

    def _apply(self, root: Part, changes: list[tuple[Part, Change]], ctx: Context) -> bool:
        mime_fields = ("Content-Type", "Content-Transfer-Encoding")
        before = [root.headers.raw(name) for name in mime_fields]
        for part, change in changes:
            if change.charset:
                ctx.log.info("%s: %s part re-encoded from %s to UTF-8 to carry the banner", self.title,
                             part.content_type, printable(part.charset or "us-ascii"))
                part.set_param("charset", change.charset)
            part.set_decoded(change.data)
        if "MIME-Version" not in root.headers and before != [root.headers.raw(n) for n in mime_fields]:
            root.headers.add("MIME-Version", "1.0", top=False)     # else readers ignore the new fields
        return bool(changes)

    def _plan(self, part: Part, texts: Texts, marked: bool) -> Change | str | None:
        """The part's new decoded body; None if the banner is in place already; else why not."""
        if part.transfer_encoding not in _KNOWN_ENCODINGS:
            return f"Content-Transfer-Encoding {printable(part.transfer_encoding)} left alone"
        raw = part.decoded()
        codec = body_codec(part.charset, raw)
        if codec is None:
            return f"charset {printable(part.charset or '')} unknown: left alone"
        try:
            data = codec.to_working(raw)
        except UnicodeError:
            return f"body is not valid {printable(part.charset or 'us-ascii')}: left alone"
        if part.content_type == "text/html":
            return self._plan_html(part, codec, data, texts.html, marked)
        return self._plan_plain(part, codec, data, texts.plain, marked)

    def _plan_plain(self, part: Part, codec: BodyCodec, data: bytes, text: str,
                    marked: bool) -> Change | str | None:
        eol = line_end(data, part.headers.eol)
        lines = eol.decode().join(text.split("\n"))
        charset = None
        try:
            banner = lines.encode(codec.working)
        except UnicodeEncodeError:      # the banner does not fit: the whole part becomes UTF-8
            try:
                data = data.decode(codec.working).encode("utf-8")
            except UnicodeDecodeError:
                return (f"body is not valid {printable(part.charset or 'us-ascii')} and the banner "
                        "needs UTF-8: left alone")
            banner, charset = lines.encode("utf-8"), "utf-8"
        if marked and has_plain_banner(data, banner, self.position):
            return None
        joined = join_plain(data, banner, eol, self.position)
        if charset:
            return Change(joined, charset)
        try:
            return Change(codec.from_working(joined), None)
        except UnicodeEncodeError:      # a stateful or wide charset that lacks the banner's letters
            return Change(joined, "utf-8")

    def _plan_html(self, part: Part, codec: BodyCodec, data: bytes, html: str,
                   marked: bool) -> Change | str | None:
        from .markup import insertion

        eol = line_end(data, part.headers.eol).decode()
        snippet = eol.join(html.split("\n")).encode(codec.working, "xmlcharrefreplace")
        position = self.position if self.html_position == "same" else self.html_position
        found = insertion(data, position)
        if found is None:
            return "no <body>, </head> or <html> tag"     # where a reader would see the snippet
        at, closers = found
        placed = data[at:at + len(snippet)] if position == "top" else data[max(at - len(snippet), 0):at]
        if marked and placed == snippet and not closers:    # exactly where this banner goes
            return None
        return Change(codec.from_working(data[:at] + closers + snippet + data[at:], "xmlcharrefreplace"), None)

    def _carrier(self, texts: Texts, eol: bytes) -> Part:
        """The part that carries the banner beside a wrapped message."""
        plain = eol.decode().join(texts.plain.split("\n")).encode("utf-8") + eol
        part = Part.new([("Content-Type", "text/plain; charset=utf-8")], plain, eol=eol)
        if not texts.html_given:
            return part
        document = f"<html><body>{texts.html}</body></html>\n".replace("\n", eol.decode())
        html = Part.new([("Content-Type", "text/html; charset=utf-8")], document.encode("utf-8"), eol=eol)
        return Part.new_multipart("alternative", [part, html], eol=eol)

    def _prefix_subject(self, message: Message) -> bool:
        prefix = self.subject_prefix
        if not prefix:
            return False
        headers = message.headers
        if not headers.get_all("Subject"):
            headers.add("Subject", prefix.strip(), top=False)
            return True
        # every Subject field: with two, one reader shows the first and another the last
        return headers.update_each("Subject", lambda value: None if readable(value).lstrip().lower()
                                   .startswith(prefix.strip().lower()) else prefixed(prefix, value))


# -- text ------------------------------------------------------------------------------------

def join_plain(data: bytes, banner: bytes, eol: bytes, position: str) -> bytes:
    """The body with the banner before it (top) or after it (bottom), an empty line between."""
    if not data:
        return banner + eol
    if position == "top":
        return banner + eol + eol + data
    ending = eol if data.endswith(b"\n") else b""
    return data + (b"" if ending else eol) + eol + banner + ending


def has_plain_banner(data: bytes, banner: bytes, position: str) -> bool:
    if position == "top":
        return data.startswith(banner)
    return data.rstrip(b" \t\r\n").endswith(banner.rstrip(b" \t\r\n"))


def line_end(data: bytes, default: bytes) -> bytes:
    """The line ending a decoded body uses (a base64 body may differ from its message)."""
    if b"\r\n" in data:
        return b"\r\n"
    return b"\n" if b"\n" in data else default


class Change(NamedTuple):
    """A part's new decoded body, and its new charset if it had to change (None: kept)."""
    data: bytes
    charset: str | None


@dataclass(frozen=True)
class BodyCodec:
    """How to add text to a body in a MIME charset.

    In a stateless ASCII-compatible charset the banner's bytes go in by byte offset
    (``working`` is the charset itself).  A stateful charset (ISO-2022-*, HZ, UTF-7: bytes
    appended after a shift into two-byte mode would read as garbage), a wide one
    (UTF-16, UTF-32) or one that is not ASCII-compatible (EBCDIC) is decoded, worked on as
    UTF-8 and encoded again, shift sequences ended properly, a byte order mark kept.
    """
    name: str
    working: str
    bom: bytes = b""

    def to_working(self, data: bytes) -> bytes:
        if self.working == self.name:
            return data
        if not data.startswith(self.bom):
            raise UnicodeError("byte order mark changed")
        return data[len(self.bom):].decode(self.name).encode("utf-8")

    def from_working(self, data: bytes, errors: str = "strict") -> bytes:
        if self.working == self.name:
            return data
        text = data.decode("utf-8")
        encoded = text.encode(self.name, errors)
        if errors == "strict" and encoded.decode(self.name) != text:
            raise UnicodeEncodeError(self.name, text, 0, len(text), "does not read back the same")
        return self.bom + encoded


_STATEFUL = ("iso2022", "hz", "utf-7")
_WIDE = {"utf-16": ("utf-16-be", "utf-16-le"), "utf-32": ("utf-32-be", "utf-32-le")}


def body_codec(charset: str | None, data: bytes = b"") -> BodyCodec | None:
    """The codec for a part's charset (``data``: its body, for a byte order mark), or None
    when the charset is unknown or not a text encoding."""
    import codecs

    name = (charset or "us-ascii").strip().strip('"')
    try:
        info = codecs.lookup(name)
        if text_codec(name) is None:        # never zlib, base64, rot13, the escape codecs ...
            return None
        probe = "<body>\r\n =?;"
        stateless_ascii = not info.name.startswith(_STATEFUL) and probe.encode(info.name) == probe.encode("ascii")
    except (LookupError, UnicodeError, TypeError, ValueError):
        return None
    if stateless_ascii:
        return BodyCodec(info.name, info.name)
    if info.name in _WIDE:     # the byte order its mark says, else big-endian (RFC 2781)
        marks = ((codecs.BOM_UTF16_BE, codecs.BOM_UTF16_LE) if info.name == "utf-16"
                 else (codecs.BOM_UTF32_BE, codecs.BOM_UTF32_LE))
        for variant, mark in zip(_WIDE[info.name], marks):
            if data.startswith(mark):
                return BodyCodec(variant, "utf-8", mark)
        return BodyCodec(_WIDE[info.name][0], "utf-8")
    return BodyCodec(info.name, "utf-8")


def _clean(text: str) -> str:
    """Banner text with line ends as LF and no other control characters (no bare CR on the wire)."""
    return _CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _read(path: str, key: str) -> str:
    try:
        return Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:      # not the message's fault: retry later
        raise TempFail(f"banner {key} {path}: {getattr(error, 'strerror', None) or error}") from None


# -- subject ---------------------------------------------------------------------------------

def readable(value: str) -> str:
    """A Subject as a reader sees it: encoded words decoded, raw 8-bit as UTF-8 or Latin-1."""
    return decode_words(_raw_text(value))


def prefixed(prefix: str, value: str) -> str:
    """``value`` with ``prefix`` in front, as an unfolded header value that decodes right.

    Raw 8-bit subjects are decoded and the whole value re-encoded (RFC 2047, by the
    header writer).  ASCII subjects keep their bytes: an ASCII prefix goes in front as
    it is; a non-ASCII one, or one that would touch an encoded word, becomes an encoded
    word of its own (white space between two encoded words is not displayed, so the
    prefix's own trailing space goes inside it).
    """
    if not value.isascii():
        return prefix + readable(value)
    starts_encoded = bool(_ENCODED_WORD.match(value))
    if prefix.isascii() and (prefix[-1:].isspace() or not starts_encoded):
        return (prefix.rstrip() + " " + value) if prefix[-1:].isspace() else prefix + value
    from email.header import Header

    word = Header(prefix if starts_encoded else prefix.rstrip(), "utf-8").encode()
    return word + " " + value


def _raw_text(value: str) -> str:
    """Header text with bytes that were not UTF-8 (surrogate escapes) read as Latin-1."""
    if value.isascii():
        return value
    raw = value.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
