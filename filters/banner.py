"""banner: adds a disclaimer or a warning to a message's text and subject (the original's Banner).

Which parts: in ``multipart/alternative`` every alternative; in any other multipart the
first text part only; a single-part text message itself.  Never an attachment (a part
with ``Content-Disposition: attachment`` or a file name), never an embedded message,
never the content of ``multipart/signed``, ``multipart/encrypted`` or S/MIME.  Text is
added to ``text/plain`` parts, an HTML snippet to ``text/html`` parts; every other part
keeps its bytes.  A message that already went through the same banner (its marker
header names this banner and the text is in place) is left byte for byte as it is.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .base import Context, Filter, OptionError, TempFail, choice, option
from .mime import Message, Part, decode_words, printable

MARKER = "X-ispMailGate-Banner"
PROTECTED = frozenset({"multipart/signed", "multipart/encrypted",
                       "application/pkcs7-mime", "application/x-pkcs7-mime"})
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
                    "ispmailgate_filters.markup")

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
        if root.content_type in PROTECTED:
            if self.on_protected == "skip":
                ctx.log.info("%s: %s message: body left untouched (on_protected = skip)",
                             self.title, root.content_type)
                return False
            wrap(message, self._carrier(texts, root.headers.eol), self.position)
            ctx.log.info("%s: %s message attached whole under the banner (on_protected = wrap)",
                         self.title, root.content_type)
            return True
        parts = chosen_parts(root)
        if not parts:
            ctx.log.info("%s: no text part can carry the banner", self.title)
        if ctx.log.isEnabledFor(logging.DEBUG):
            names = [printable(p.filename) for p in root.leaves() if p.filename and p not in parts]
            if names:
                ctx.log.debug("%s: attachments left alone: %s", self.title, ", ".join(names))
        mime_fields = ("Content-Type", "Content-Transfer-Encoding")
        before = [root.headers.raw(name) for name in mime_fields]
        changed = False
        for part in parts:
            changed = self._add_to_part(part, texts, marked, ctx) or changed
        if "MIME-Version" not in root.headers and before != [root.headers.raw(n) for n in mime_fields]:
            root.headers.add("MIME-Version", "1.0", top=False)     # else readers ignore the new fields
        return changed

    def _add_to_part(self, part: Part, texts: Texts, marked: bool, ctx: Context) -> bool:
        where = f"{self.title}: {part.content_type} part"
        if part.transfer_encoding not in _KNOWN_ENCODINGS:
            ctx.log.info("%s in Content-Transfer-Encoding %s: left alone", where, part.transfer_encoding)
            return False
        codec = ascii_codec(part.charset)
        if codec is None:
            ctx.log.warning("%s in charset %s (unknown or not ASCII-compatible): left alone",
                            where, printable(part.charset or ""))
            return False
        if part.content_type == "text/html":
            return self._add_html(part, codec, texts.html, marked, ctx, where)
        return self._add_plain(part, codec, texts.plain, marked, ctx, where)

    def _add_plain(self, part: Part, codec: str, text: str, marked: bool, ctx: Context, where: str) -> bool:
        data = part.decoded()
        eol = line_end(data, part.headers.eol)
        lines = eol.decode().join(text.split("\n"))
        charset = None
        try:
            banner = lines.encode(codec)
        except UnicodeEncodeError:      # the banner does not fit: the whole part becomes UTF-8
            try:
                data = data.decode(codec).encode("utf-8")
            except UnicodeDecodeError:
                ctx.log.warning("%s: body is not valid %s and the banner needs UTF-8: left alone",
                                where, printable(part.charset or "us-ascii"))
                return False
            banner, charset = lines.encode("utf-8"), "utf-8"
        if marked and has_plain_banner(data, banner, self.position):
            return False
        if charset:
            ctx.log.info("%s re-encoded from %s to UTF-8 to carry the banner", where,
                         printable(part.charset or "us-ascii"))
            part.set_param("charset", charset)
        part.set_decoded(join_plain(data, banner, eol, self.position))
        return True

    def _add_html(self, part: Part, codec: str, html: str, marked: bool, ctx: Context, where: str) -> bool:
        from .markup import insertion_point

        data = part.decoded()
        eol = line_end(data, part.headers.eol).decode()
        snippet = eol.join(html.split("\n")).encode(codec, "xmlcharrefreplace")
        if marked and snippet in data:
            return False
        at = insertion_point(data, self.position if self.html_position == "same" else self.html_position)
        if at is None:
            ctx.log.info("%s: no <body>, </head> or <html> tag: left alone", where)
            return False
        part.set_decoded(data[:at] + snippet + data[at:])
        return True

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
        value = headers.get("Subject")
        if value is None:
            headers.add("Subject", prefix.strip(), top=False)
            return True
        if readable(value).lstrip().lower().startswith(prefix.strip().lower()):
            return False
        headers.set("Subject", prefixed(prefix, value))
        return True


# -- which parts ----------------------------------------------------------------------------

def chosen_parts(part: Part) -> list[Part]:
    """The parts that get the banner, in order (see the module's docstring)."""
    if part.content_type in PROTECTED:
        return []
    if part.is_leaf:
        takes = part.content_type in ("text/plain", "text/html") and not part.is_attachment
        return [part] if takes and part.filename is None else []
    if not part.is_multipart:           # an embedded message: somebody else's text
        return []
    if part.content_type == "multipart/alternative":
        return [chosen for child in part.children for chosen in chosen_parts(child)]
    for child in part.children:
        chosen = chosen_parts(child)
        if chosen:
            return chosen
    return []


def wrap(message: Message, carrier: Part, position: str) -> None:
    """Attach the whole message as message/rfc822 under a new multipart/mixed with ``carrier``.

    The attached message keeps every byte (its signature stays valid); the new top part
    keeps the original's header fields except the Content-* ones.
    """
    root = message.root
    eol = root.headers.eol
    attached = Part.new_message([("Content-Description", "original message")],
                                Part.from_bytes(bytes(root.to_bytes())), eol=eol)
    children = [carrier, attached] if position == "top" else [attached, carrier]
    outer = Part.new_multipart("mixed", children, eol=eol)
    headers = root.headers
    for name in {n for n in headers.names() if n.lower().startswith("content-")}:
        headers.remove(name)
    if "MIME-Version" not in headers:
        headers.add("MIME-Version", "1.0", top=False)
    headers.add("Content-Type", outer.headers.get("Content-Type") or "", top=False)
    outer.headers = headers
    message.root = outer


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


def ascii_codec(charset: str | None) -> str | None:
    """Python's codec for a MIME charset, or None when unknown or not ASCII-compatible.

    Only an ASCII-compatible charset lets bytes be appended and markup be found by byte
    offset; UTF-16 and the like are left alone.
    """
    import codecs

    name = (charset or "us-ascii").strip().strip('"')
    try:
        info = codecs.lookup(name)
        probe = "<body>\r\n =?;"
        text = getattr(info, "_is_text_encoding", True)     # never zlib, base64, rot13 ...
        return info.name if text and probe.encode(info.name) == probe.encode("ascii") else None
    except (LookupError, UnicodeError, TypeError, ValueError):
        return None


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
