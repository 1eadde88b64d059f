"""Where the banner's HTML snippet goes: the tokenizer finds tags only where a browser would."""

from __future__ import annotations

import pytest

from ispmailgate_filters.banner.markup import insertion_point


def at(document: bytes, position: str) -> bytes | None:
    """The document with a marker where the snippet would go."""
    where = insertion_point(document, position)
    return None if where is None else document[:where] + b"|" + document[where:]


@pytest.mark.parametrize("document, top, bottom", [
    (b"<html><head></head><body class=x><p>a</p></body></html>",
     b"<html><head></head><body class=x>|<p>a</p></body></html>",
     b"<html><head></head><body class=x><p>a</p>|</body></html>"),
    (b"<HTML><BODY\n style='a'>x</BODY ></HTML>", b"<HTML><BODY\n style='a'>|x</BODY ></HTML>",
     b"<HTML><BODY\n style='a'>x|</BODY ></HTML>"),
    (b"<!-- <body> --><html><body>x</body></html>", b"<!-- <body> --><html><body>|x</body></html>",
     b"<!-- <body> --><html><body>x|</body></html>"),
    (b"<html><script>if (a<b) s='<body>'; s='</body>';</script><body>x</body></html>",
     b"<html><script>if (a<b) s='<body>'; s='</body>';</script><body>|x</body></html>",
     b"<html><script>if (a<b) s='<body>'; s='</body>';</script><body>x|</body></html>"),
    (b"<html><title>a <body> b</title><textarea></body></textarea><body>x</body>",
     b"<html><title>a <body> b</title><textarea></body></textarea><body>|x</body>",
     b"<html><title>a <body> b</title><textarea></body></textarea><body>x|</body>"),
    (b'<html><a title="<body>" href=\'</body>\'>l</a><body>x</body></html>',
     b'<html><a title="<body>" href=\'</body>\'>l</a><body>|x</body></html>',
     b'<html><a title="<body>" href=\'</body>\'>l</a><body>x|</body></html>'),
    (b"<html><!--><body>x</body>", b"<html><!--><body>|x</body>", b"<html><!--><body>x|</body>"),
    (b"<html><![foo[ <body> ]]><body>x</body>", b"<html><![foo[ <body> ]]><body>|x</body>",
     b"<html><![foo[ <body> ]]><body>x|</body>"),     # a bogus comment, up to the first ">"
    (b"<!DOCTYPE html><html><head><style>p{}</style></head><p>x", b"<!DOCTYPE html><html><head><style>p{}"
     b"</style></head>|<p>x", b"<!DOCTYPE html><html><head><style>p{}</style></head><p>x|"),
])
def test_tags_inside_comments_scripts_raw_text_and_attribute_values_are_no_anchors(document, top, bottom):
    assert at(document, "top") == top
    assert at(document, "bottom") == bottom


def test_a_fragment_without_document_tags_is_left_alone():
    assert insertion_point(b"<p>just a <b>fragment</b></p>", "top") is None
    assert insertion_point(b"<p>just a <b>fragment</b></p>", "bottom") is None


@pytest.mark.parametrize("document", [
    b'<html><a href="x><body>never closed',     # the rest is one attribute value
    b"<html><a <a <a <a <body",                  # a tag that runs to the end is no tag
    b"<html><!-- <body> never closed",
    b"<html><script> <body> never closed",
])
def test_what_runs_to_the_end_of_the_document_hides_what_is_inside_it(document):
    assert at(document, "top") == b"<html>|" + document[6:]
    assert at(document, "bottom") == document + b"|"


def test_the_first_body_and_the_last_closing_body_win():
    document = b"<html><body>a</body><body>b</body></html>"
    assert at(document, "top") == b"<html><body>|a</body><body>b</body></html>"
    assert at(document, "bottom") == b"<html><body>a</body><body>b|</body></html>"
