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
    (b"<html><title>a <body> b</title><body>x</body>",
     b"<html><title>a <body> b</title><body>|x</body>",
     b"<html><title>a <body> b</title><body>x|</body>"),
    (b"<html><title>a <body> b</title><textarea></body></textarea><body>x</body>",     # textarea
     b"<html><title>a <body> b</title>|<textarea></body></textarea><body>x</body>",   # opens the body
     b"<html><title>a <body> b</title><textarea></body></textarea><body>x|</body>"),
    (b'<html><a title="<body>" href=\'</body>\'>l</a><body>x</body></html>',
     b'<html>|<a title="<body>" href=\'</body>\'>l</a><body>x</body></html>',
     b'<html><a title="<body>" href=\'</body>\'>l</a><body>x|</body></html>'),
    (b"<html><!--><body>x</body>", b"<html><!--><body>|x</body>", b"<html><!--><body>x|</body>"),
    (b"<html><![foo[ <body> ]]><body>x</body>", b"<html><![foo[ <body>| ]]><body>x</body>",
     b"<html><![foo[ <body> ]]><body>x|</body>"),     # a bogus comment, up to the first ">": the
                                                     # text after it opens the body
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
    """Top goes before it; at the bottom there is no place a reader would see (the banner
    then goes beside the part)."""
    assert at(document, "top") == b"<html>|" + document[6:]
    assert at(document, "bottom") is None


def test_the_first_body_and_the_last_closing_body_win():
    document = b"<html><body>a</body><body>b</body></html>"
    assert at(document, "top") == b"<html><body>|a</body><body>b</body></html>"
    assert at(document, "bottom") == b"<html><body>a</body><body>b|</body></html>"


# -- inert and hidden containers (attack review 1, finding 7) ---------------------------------

@pytest.mark.parametrize("document, top", [
    # the review's case: a <body> inside an inert <template> in the head
    (b"<html><head><template><body></template></head><body><p>Pay now</p></body></html>",
     b"<html><head><template><body></template></head><body>|<p>Pay now</p></body></html>"),
    (b"<html><head><noscript><body></noscript></head><body><p>Pay</p>",
     b"<html><head><noscript><body></noscript></head><body>|<p>Pay</p>"),
    (b"<html><select><option><body></select><body>x", b"<html>|<select><option><body></select><body>x"),
    # content before <body> opens the body there: a <body> inside a hidden <div> is ignored
    (b'<html><head></head><div style="display:none"><body><p>Pay</p>',
     b'<html><head></head>|<div style="display:none"><body><p>Pay</p>'),
    (b'<html>Pay now<body>x', b'<html>|Pay now<body>x'),
    (b'<div hidden><body>x</body></html>', b'|<div hidden><body>x</body></html>'),
    (b"<html><head><title>t</title><style>p{}</style></head>\n<body>x",
     b"<html><head><title>t</title><style>p{}</style></head>\n<body>|x"),
])
def test_top_is_where_the_body_starts_never_inside_an_inert_or_hidden_container(document, top):
    assert at(document, "top") == top


@pytest.mark.parametrize("document, bottom", [
    (b"<html><body>Pay<template></body></html>", None),        # the end is inert: beside the part
    (b"<html><body>Pay<select><option>x</body></html>", None),
    (b"<html><body>Pay<template>t</template></body></html>", b"<html><body>Pay<template>t</template>|</body></html>"),
    (b"<html><body>Pay now<!-- ", None),                       # the end is inside a comment
    (b"<html><body>Pay<noscript>", None),
])
def test_bottom_is_never_inside_an_inert_container_or_a_comment(document, bottom):
    assert at(document, "bottom") == bottom


def test_elements_left_open_at_the_bottom_are_closed_before_the_banner():
    from ispmailgate_filters.banner.markup import insertion

    document = b'<html><body><p>Pay now</p><div style="display:none"><span>x</body></html>'
    at_, closers = insertion(document, "bottom")
    assert document[at_:] == b"</body></html>" and closers == b"</span></div>"
    closed = b'<html><body><div><p>x</p></div><table><tr><td>y</table><br></body>'
    assert insertion(closed, "bottom") == (closed.rindex(b"</body>"), b"")   # nothing left open
