"""HTML for the banner filter: where a snippet goes, found with a linear tokenizer.

A regular expression on raw markup finds ``<body>`` inside comments, scripts and
attribute values; a tokenizer does not.  ``html.parser`` is one, but it rescans the rest
of the document for every tag that never closes (``<a <a <a ...`` costs seconds per 60
KB), so the anchors are found by a small tokenizer of its own that follows the HTML
standard's tokenization (WHATWG HTML, section 13.2.5) as far as tags, comments and raw
text go, and looks at every character a bounded number of times.  The document is read
as Latin-1, one character per byte, so the offsets are byte offsets into the part's
decoded body in any ASCII-compatible charset, and nothing is re-encoded.
"""

from __future__ import annotations

import re

_BLOCK_ENDS = frozenset({"p", "div", "li", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6",
                         "blockquote", "pre", "ul", "ol"})
# Elements whose content is text up to their own end tag (RAWTEXT and RCDATA).
# noscript too: a reader that runs scripts takes its content as text.
_RAW_TEXT = frozenset({"script", "style", "xmp", "iframe", "noembed", "noframes", "textarea", "title", "noscript"})
_SPACE = "\t\n\f\r "
_TAG_NAME = f"[^{_SPACE}/>]*"
# Blanks and slashes, then an attribute name, then "=" if a value follows.
_ATTRIBUTE = f"[{_SPACE}/]*(?:[^{_SPACE}/>][^{_SPACE}/>=]*[{_SPACE}]*(=[{_SPACE}]*)?)?"
_UNQUOTED = f"[^{_SPACE}>]*"
_COMMENT_END = "--!?>"


def insertion_point(document: bytes, position: str) -> int | None:
    """The byte offset where a banner goes, or None to leave the document alone (see
    :func:`insertion`, which says what must precede the snippet there as well)."""
    found = insertion(document, position)
    return None if found is None else found[0]


def insertion(document: bytes, position: str) -> tuple[int, bytes] | None:
    """(the byte offset where a banner goes, end tags to write before it), or None to
    leave the document alone.

    top: where the body starts -- right after the opening ``<body ...>`` tag when nothing
    a reader shows comes before it; else right before the first thing that opens the body
    without one (text, or a tag that has no place in the head: ``<html><div hidden><body>``
    opens the body at the ``<div>``, and the ``<body>`` inside it is ignored); else after
    ``</head>``, else after ``<html>`` (the original's order).  bottom: right before the
    last ``</body>``; else before the last ``</html>``; else, in a document that has one
    of those tags, at its end -- unless the document ends inside a comment, raw text or a
    tag, where the snippet would not show.  At the bottom, elements the sender left open
    there (``<div style="display:none">`` never closed) are closed before the snippet, or
    it would be inside them.  Tags inside inert or hidden containers
    (``<template>``, ``<select>``, raw text such as ``<noscript>`` and ``<title>``) are no
    anchors.  A fragment with none of the document's tags is left alone in both positions.
    """
    tokens = _Tokens(document.decode("latin-1"))
    if position == "top":
        at = _top(tokens)
        return None if at is None else (at, b"")
    return _bottom(tokens)


def _top(tokens: _Tokens) -> int | None:
    anchors: dict[str, int] = {}
    opened = None           # where the body opened without a <body> tag
    for name, closing, start, end in tokens:
        if name in ("html", "head", "body") and opened is not None:
            return opened   # a document, not a fragment
        if name == "body" and not closing:
            return end
        if name in ("html", "head") and not closing or closing and name == "head":
            anchors.setdefault(f"{name}_{'close' if closing else 'open'}", end)
        elif opened is None and _opens_the_body(name, closing):
            opened = start
            if anchors:
                return opened
    return anchors.get("head_close", anchors.get("html_open"))


def _bottom(tokens: _Tokens) -> tuple[int, bytes] | None:
    anchors: dict[str, tuple[int, tuple[str, ...]]] = {}
    open_elements: list[str] = []
    for name, closing, start, _ in tokens:
        if closing and name in ("body", "html"):
            anchors[f"{name}_close"] = (start, tuple(open_elements))    # the last one wins
        elif name in ("body", "html"):
            anchors[f"{name}_open"] = (start, ())
        elif name != "#text":
            _follow(open_elements, name, closing)
    for name in ("body_close", "html_close"):
        if name in anchors:
            return _closing(*anchors[name])
    if anchors and tokens.complete:
        return _closing(len(tokens.text.rstrip()), tuple(open_elements))
    return None


# Elements without an end tag, or whose end tag may be left out (closed by what follows):
# not followed, and so never closed by the banner (WHATWG 13.1.2 and 13.1.2.4).
_NO_END_TAG = frozenset({"area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr",
                         "image", "img", "input", "keygen", "link", "meta", "param", "source", "track",
                         "wbr", "p", "li", "dt", "dd", "option", "optgroup", "rb", "rp", "rt", "rtc",
                         "tr", "td", "th", "thead", "tbody", "tfoot", "colgroup", "caption", "head"})
_MOST_OPEN = 256
_ELEMENT_NAME = re.compile(r"[a-z][a-z0-9-]*")


def _follow(open_elements: list[str], name: str, closing: bool) -> None:
    """The elements left open, as far as end tags say (a parser ignores an end tag
    without its element, so closing one that a parser closed already costs nothing)."""
    if name in _NO_END_TAG or name in _INERT or not _ELEMENT_NAME.fullmatch(name):
        return
    if not closing:
        if len(open_elements) <= _MOST_OPEN:
            open_elements.append(name)
    elif name in open_elements:
        while open_elements.pop() != name:
            pass


def _closing(at: int, open_elements: tuple[str, ...]) -> tuple[int, bytes] | None:
    if len(open_elements) > _MOST_OPEN:
        return None         # too deep to close: the banner goes beside the part instead
    return at, "".join(f"</{name}>" for name in reversed(open_elements)).encode("latin-1")


# Elements the parser keeps in the head (WHATWG 13.2.6.4.4); any other start tag, and text
# that is not white space, opens the body.
_HEAD = frozenset({"html", "head", "title", "base", "basefont", "bgsound", "link", "meta", "noframes",
                   "script", "style", "template", "noscript"})


def _opens_the_body(name: str, closing: bool) -> bool:
    if closing:
        return name in ("body", "br")       # end tags the head's modes treat as content
    return name not in _HEAD


class _Tokens:
    """(name, closing, start, end) of every start and end tag a reader would render, and
    ("#text", False, start, end) of each run of text that is not white space, outside
    comments, declarations, raw text and inert containers (``<template>``, ``<select>``).
    A tag or quoted value that reaches the end of the document is no tag (the standard
    drops it); every search that fails ends the scan, so nothing is rescanned.
    ``complete`` says, after the scan, whether the document ended where text shows."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.complete = False
        self.inert: list[str] = []

    def __iter__(self):
        text, position, size = self.text, 0, len(self.text)
        tag_name = re.compile(_TAG_NAME).match
        while True:
            start = text.find("<", position)
            if not self.inert and text[position:size if start < 0 else start].strip(_SPACE):
                yield "#text", False, position, size if start < 0 else start
            if start < 0 or start + 1 >= size:
                self.complete = not self.inert
                return
            after = text[start + 1]
            if after == "!":
                position = _declaration_end(text, start)
            elif after == "?":
                position = _after(text, ">", start + 2)
            elif after == "/" and _letter(text, start + 2):
                name_end = tag_name(text, start + 3).end()
                end = _tag_end(text, name_end)
                if end is None:
                    return
                name = text[start + 2:name_end].lower()
                if self._visible(name, True):
                    yield name, True, start, end
                position = end
            elif after == "/":
                position = start + 3 if text.startswith("</>", start) else _after(text, ">", start + 2)
            elif _letter(text, start + 1):
                name_end = tag_name(text, start + 2).end()
                end = _tag_end(text, name_end)
                if end is None:
                    return
                name = text[start + 1:name_end].lower()
                if self._visible(name, False):
                    yield name, False, start, end
                if name == "plaintext":
                    return
                position = _raw_text_end(text, name, end) if name in _RAW_TEXT else end
            else:
                position = start + 1
            if position >= size:
                return      # a comment, declaration or raw text that ran to the end

    def _visible(self, name: str, closing: bool) -> bool:
        """Track the inert containers; True for a tag outside all of them."""
        inert = self.inert
        if inert and inert[-1] == "select" and not closing and name in _LEAVE_SELECT:
            inert.pop()     # these start tags end a select (13.2.6.4.16)
            return not inert and name != "select"
        if name in _INERT:
            shown = not inert and not closing and name == "select"    # a select opens the body
            if not closing:
                inert.append(name)
            elif name in inert:
                while inert.pop() != name:
                    pass
            return shown
        return not inert


_INERT = frozenset({"template", "select"})      # content not rendered as the page
_LEAVE_SELECT = frozenset({"select", "input", "keygen", "textarea"})


def _letter(text: str, index: int) -> bool:
    return index < len(text) and text[index].isascii() and text[index].isalpha()


def _after(text: str, mark: str, start: int) -> int:
    """Just after the next ``mark``; the end of the document without one."""
    found = text.find(mark, start)
    return len(text) if found < 0 else found + len(mark)


def _declaration_end(text: str, start: int) -> int:
    """After a comment (``<!-- ... -->``, ``<!-->`` and ``<!--->`` are empty ones) or any
    other ``<!...>`` (a doctype, CDATA, a bogus comment)."""
    if not text.startswith("<!--", start):
        return _after(text, ">", start + 2)
    body = start + 4
    for empty in (">", "->"):
        if text.startswith(empty, body):
            return body + len(empty)
    found = re.compile(_COMMENT_END).search(text, body)
    return len(text) if found is None else found.end()


def _tag_end(text: str, position: int) -> int | None:
    """Just after the ``>`` that ends a tag whose attributes start at ``position``; None if
    the document ends first.  Quoted values may hold ``>`` and ``<body>``."""
    attribute, unquoted, size = re.compile(_ATTRIBUTE).match, re.compile(_UNQUOTED).match, len(text)
    while True:
        match = attribute(text, position)
        position = match.end()
        if position >= size:
            return None
        char = text[position]
        if char == ">":
            return position + 1
        if match.group(1) is None:
            continue
        if char in "\"'":
            close = text.find(char, position + 1)
            if close < 0:
                return None
            position = close + 1
        else:
            position = unquoted(text, position).end()


def _raw_text_end(text: str, name: str, position: int) -> int:
    """Where tokenizing goes on after a raw text element's content: at its end tag."""
    found = re.compile(f"</{name}(?=[{_SPACE}/>])", re.IGNORECASE).search(text, position)
    return len(text) if found is None else found.start()


def text_to_html(text: str) -> str:
    """Plain banner text as an HTML snippet: escaped, its line breaks kept."""
    from html import escape

    lines = text.replace("\r\n", "\n").split("\n")
    return "<div>" + "<br>\n".join(escape(line) for line in lines) + "</div>"


def html_to_text(html: str) -> str:
    """An HTML snippet's text for text/plain parts: tags dropped, blocks and <br> as line breaks."""
    from html.parser import HTMLParser

    pieces: list[str] = []
    skipping = []

    class Text(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "br":
                pieces.append("\n")
            elif tag in ("script", "style"):
                skipping.append(tag)

        def handle_endtag(self, tag):
            if skipping and tag == skipping[-1]:
                skipping.pop()
            elif tag in _BLOCK_ENDS:
                pieces.append("\n")

        def handle_data(self, data):
            if not skipping:
                pieces.append(re.sub(r"\s+", " ", data))

    parser = Text(convert_charrefs=True)
    parser.feed(html)
    parser.close()
    lines = [line.strip() for line in "".join(pieces).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
