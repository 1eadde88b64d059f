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
_RAW_TEXT = frozenset({"script", "style", "xmp", "iframe", "noembed", "noframes", "textarea", "title"})
_SPACE = "\t\n\f\r "
_TAG_NAME = f"[^{_SPACE}/>]*"
# Blanks and slashes, then an attribute name, then "=" if a value follows.
_ATTRIBUTE = f"[{_SPACE}/]*(?:[^{_SPACE}/>][^{_SPACE}/>=]*[{_SPACE}]*(=[{_SPACE}]*)?)?"
_UNQUOTED = f"[^{_SPACE}>]*"
_COMMENT_END = "--!?>"


def insertion_point(document: bytes, position: str) -> int | None:
    """The byte offset where a banner goes, or None to leave the document alone.

    top: right after the opening ``<body ...>`` tag; else after ``</head>``; else after
    ``<html ...>`` (the original's order).  bottom: right before the last ``</body>``;
    else before the last ``</html>``; else, in a document that has one of those tags, at
    its end.  A fragment with none of them is left alone in both positions.
    """
    text = document.decode("latin-1")
    anchors = _anchors(text, stop_at_body=position == "top")
    if position == "top":
        order = ("body_open", "head_close", "html_open")
    else:
        order = ("body_close", "html_close")
    for name in order:
        if name in anchors:
            return anchors[name]
    if position == "bottom" and anchors:
        return len(text.rstrip())
    return None


def _anchors(text: str, *, stop_at_body: bool = False) -> dict[str, int]:
    """Offsets just after ``<body>``, ``</head>``, ``<html>`` and just before ``</body>``, ``</html>``.

    With ``stop_at_body`` the scan stops at the opening body tag: the top position needs
    nothing after it, and a large HTML part is not read to its end for nothing.
    """
    found: dict[str, int] = {}
    for name, closing, start, end in _tags(text):
        if closing and name == "head":
            found.setdefault("head_close", end)
        elif closing and name in ("body", "html"):
            found[f"{name}_close"] = start      # the last one wins
        elif not closing and name in ("body", "html"):
            found.setdefault(f"{name}_open", end)
            if stop_at_body and name == "body":
                break
    return found


def _tags(text: str):
    """(name, closing, start, end) of every start and end tag outside comments, declarations
    and raw text.  A tag or quoted value that reaches the end of the document is no tag
    (the standard drops it); every search that fails ends the scan, so nothing is rescanned."""
    position, size = 0, len(text)
    tag_name = re.compile(_TAG_NAME).match
    while (start := text.find("<", position)) >= 0 and start + 1 < size:
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
            yield text[start + 2:name_end].lower(), True, start, end
            position = end
        elif after == "/":
            position = start + 3 if text.startswith("</>", start) else _after(text, ">", start + 2)
        elif _letter(text, start + 1):
            name_end = tag_name(text, start + 2).end()
            end = _tag_end(text, name_end)
            if end is None:
                return
            name = text[start + 1:name_end].lower()
            yield name, False, start, end
            if name == "plaintext":
                return
            position = _raw_text_end(text, name, end) if name in _RAW_TEXT else end
        else:
            position = start + 1


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
