"""HTML for the banner filter: where a snippet goes, found with a real tokenizer.

A regular expression on raw markup finds ``<body>`` inside comments, scripts and
attribute values; ``html.parser`` does not.  The document is read as Latin-1, one
character per byte, so the offsets the tokenizer reports are byte offsets into the
part's decoded body in any ASCII-compatible charset, and nothing is re-encoded.
"""

from __future__ import annotations

import re

_CHUNK = 1 << 14
_BLOCK_ENDS = frozenset({"p", "div", "li", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6",
                         "blockquote", "pre", "ul", "ol"})


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

    With ``stop_at_body`` the tokenizer stops at the opening body tag: the top position
    needs nothing after it, and a large HTML part is not read to its end for nothing.
    """
    from html.parser import HTMLParser

    line_starts = [0] + [match.end() for match in re.finditer("\n", text)]
    found: dict[str, int] = {}

    class Anchors(HTMLParser):
        def where(self) -> int:
            line, column = self.getpos()
            return line_starts[line - 1] + column

        def handle_starttag(self, tag, attrs):
            if tag in ("body", "html"):
                found.setdefault(f"{tag}_open", self.where() + len(self.get_starttag_text() or ""))

        def handle_endtag(self, tag):
            start = self.where()
            if tag == "head":
                found.setdefault("head_close", text.find(">", start) + 1 or len(text))
            elif tag in ("body", "html"):
                found[f"{tag}_close"] = start        # the last one wins

    parser = Anchors(convert_charrefs=False)
    for start in range(0, len(text), _CHUNK):
        parser.feed(text[start:start + _CHUNK])
        if stop_at_body and "body_open" in found:
            return found
    parser.close()
    return found


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
