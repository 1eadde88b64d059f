"""MIME parameters a filter changes, and names as logs show them."""

from __future__ import annotations

import re

import pytest

from ispmailgate_filters.mime import Part, format_param, printable, replace_param


def test_set_param_keeps_an_rfc2231_name_beside_it_byte_for_byte():
    part = Part.from_bytes(b"Content-Type: text/plain; charset=iso-8859-1;\n"
                           b" name*=utf-8''%C3%9Cbersicht%20M%C3%A4rz.txt\n\nx\n")
    part.set_param("charset", "utf-8")
    assert part.headers.raw("Content-Type") == (b"Content-Type: text/plain; charset=utf-8;\n"
                                                b" name*=utf-8''%C3%9Cbersicht%20M%C3%A4rz.txt\n")
    assert part.filename == "Übersicht März.txt"
    assert part.charset == "utf-8"


@pytest.mark.parametrize("value, name, new, expected", [
    ('text/plain; name="a;b.txt"; format=flowed', "charset", "koi8-r",
     'text/plain; name="a;b.txt"; format=flowed; charset=koi8-r'),
    ("text/plain; CHARSET=us-ascii; format=flowed", "charset", "utf-8", "text/plain; charset=utf-8; format=flowed"),
    ("text/plain; title*0*=us-ascii'en'a; title*1=b", "title", "x y", 'text/plain; title="x y"'),
    ("attachment", "filename", "Übersicht.pdf", "attachment; filename*=utf-8''%C3%9Cbersicht.pdf"),
])
def test_replace_param_changes_only_its_own_parameter(value, name, new, expected):
    assert replace_param(value, name, new) == expected


def test_set_param_adds_a_content_type_when_there_was_none():
    part = Part.from_bytes(b"Subject: x\n\nbody\n")
    part.set_param("charset", "utf-8")
    assert part.headers.get("Content-Type") == "text/plain; charset=utf-8"


def test_format_param_quotes_what_is_not_a_token():
    assert format_param("name", "plain.txt") == "name=plain.txt"
    assert format_param("name", 'a "b"\\c') == 'name="a \\"b\\"\\\\c"'


def test_printable_decodes_and_neutralises_controls_and_bidi_overrides():
    assert printable("=?utf-8?q?=C3=9Cbersicht_M=C3=A4rz.pdf?=") == "Übersicht März.pdf"
    assert printable("evil\x1b[31m\u202efdp.exe\r\nBcc: x") == "evil?[31m?fdp.exe??Bcc: x"
    assert printable("caf\udce9.txt") == "caf\ufffd.txt"


def test_fields_are_a_copy_in_order():
    part = Part.from_bytes(b"B: 1\nA: 2\n folded\n\nx")
    items = part.headers.fields()
    assert items == [("B", b"B: 1\n"), ("A", b"A: 2\n folded\n")]
    items.clear()
    assert len(part.headers) == 2


def test_set_param_rewrites_raw_8bit_parameters_instead_of_failing():
    part = Part.from_bytes(b"Content-Type: text/plain; name=\"caf\xe9.txt\"; \xff\xffjunk; format=flowed\n\nx\n")
    part.set_param("charset", "utf-8")
    assert part.headers.raw("Content-Type").isascii()
    assert part.headers.get("Content-Type") == \
        "text/plain; name*=utf-8''caf%EF%BF%BD.txt; junk; format=flowed; charset=utf-8"
    assert part.filename == "caf\ufffd.txt"
    assert part.charset == "utf-8" and part.content_type == "text/plain"


def test_set_text_survives_what_the_fuzzer_found():
    import base64

    data = base64.b64decode(
        "Q29udGVudC1UeXBlOiB0ZXh0L3BsYWluOyBjaGFyc2V0IGZpbGVuYW1lPT0/a29leHQvcGxhaW47IP//////////////////"
        "////////////////////////////////Y2hhcnNldCBmaWxlAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAABTYWnILXI/Qj84OURKMDgvTExtUnZZdz09Pz0KU81iamVjdDogR3JlZXRpbmdzCgpTYWx1dGF0aW9ucwoKCg==")
    part = Part.from_bytes(data)
    part.set_text(part.text().upper())
    assert part.headers.raw("Content-Type").isascii()
    assert part.charset == "utf-8"
    assert part.decoded() == "S\ufffdBJECT: GREETINGS\n\nSALUTATIONS\n\n\n".encode()


@pytest.mark.parametrize("charset", ["ISO-8859\0\0-1", "idna"])
def test_an_rfc2231_charset_no_codec_takes_falls_back_to_utf8(charset):
    """Found by the fuzzer: a NUL in an RFC 2231 charset made the packer fail."""
    part = Part.from_bytes(b"Content-Type: application/octet-stream\nContent-Disposition: attachment;\n"
                           b" filename*=" + charset.encode() + b"''caf%C3%A9%2Etxt\n\nx\n")
    assert part.filename == "caf\u00e9.txt"


@pytest.mark.parametrize("value", ["=?ko\xdfi8-r?B?89DJ08/=?=", "=?utf-8?b?A?="])
def test_an_encoded_word_email_header_cannot_decode_is_left_as_it_stands(value):
    """Found by the fuzzer: a charset name that is not ASCII, or bad base64 (CharsetError,
    HeaderParseError from email.header), made the banner fail."""
    part = Part.from_bytes(b"Content-Type: text/plain; name=\"" + value.encode("latin-1") + b"\"\n\nx\n")
    assert part.filename == value.encode("latin-1").decode("utf-8", "replace")


def test_comments_and_white_space_in_a_type_are_read_as_a_strict_parser_reads_them():
    """``(c) multipart/mixed`` is the multipart a reader shows: scanners and banners see its parts."""
    part = Part.from_bytes(b'Content-Type: (c) multipart (x)/\n mixed; boundary="(b)"\n\n--(b)\n'
                           b"Content-Type: application/zip\nContent-Transfer-Encoding: base64 (as ever)\n"
                           b'Content-Disposition: (no) attachment; filename="x.zip"\n\nUEsDBA==\n--(b)--\n')
    assert part.content_type == "multipart/mixed" and part.param("boundary") == "(b)"
    [child] = part.children
    assert (child.transfer_encoding, child.decoded()) == ("base64", b"PK\x03\x04")
    assert child.is_attachment and child.filename == "x.zip"
    assert Part.from_bytes(b"Content-Type: (unterminated text/html\n\nx").content_type == "text/plain"


# -- the linear readers decode as the standard library's quadratic ones ---------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

SAME = settings(max_examples=400, deadline=None, derandomize=True)
PARAMETER_PIECES = ["text/plain", "multipart/mixed", ";", " ", '"', "\\", "=", "*", "'", "%41", "%C3%BC", "%",
                    "name", "NAME", "filename", "charset", "boundary", "*0", "*1", "*2*", "*0*", "utf-8''",
                    "iso-8859-1'de'", "a", "b.txt", "ü", "\t", "<x>", "007"]
WORD_PIECES = ["=?", "?=", "?q?", "?Q?", "?b?", "?B?", "utf-8", "iso-8859-1", "x-bogus", "us-ascii", "=C3=BC",
               "=C3", "=BC", "_", "YWJj", "w7w", "=", " ", "\t", "\n", "a", "ü", "?", "(", ")"]


def stdlib_param(value: str, name: str, header: str = "Content-Type"):
    from email.message import Message as StdMessage
    from email.utils import collapse_rfc2231_value

    info = StdMessage()
    info[header] = value
    found = info.get_param(name, header=header)
    if found is None or found == "":
        return found
    try:
        return collapse_rfc2231_value(found).strip()
    except ValueError:
        return collapse_rfc2231_value(("utf-8", found[1], found[2])).strip()


@st.composite
def parameter_values(draw) -> str:
    """A structured header value: a type, then parameters, plain, quoted, continued, extended,
    with junk pieces anywhere."""
    junk = st.lists(st.sampled_from(PARAMETER_PIECES), max_size=3).map("".join)
    value = draw(st.sampled_from(["text/plain", "multipart/mixed", "attachment", "", "a/b/c"])) + draw(junk)
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(["name", "filename", "charset", "boundary", "Name"]))
        name += draw(st.sampled_from(["", "*", "*0", "*1", "*0*", "*1*", "*2", "*x"]))
        text = draw(junk)
        text = draw(st.sampled_from(['"{}"', "{}", '"{}', "{}'en'{}"])).format(text, text)
        value += draw(st.sampled_from([";", "; ", " ;\t"])) + name + draw(st.sampled_from(["=", " = ", ""])) + text
    return value


@SAME
@given(value=st.one_of(parameter_values(), st.lists(st.sampled_from(PARAMETER_PIECES), max_size=14).map("".join)))
def test_parameters_read_as_the_standard_library_reads_them(value):
    from email.message import Message as StdMessage

    part = Part.from_bytes(f"Content-Type: {value}\n\nx".encode("utf-8", "surrogateescape"))
    if "\n" in value or part.headers.get("Content-Type") != value.strip(" \t"):
        return                           # the header line itself did not carry the value
    std = StdMessage()
    std["Content-Type"] = value
    stdlib_type = std.get_content_type()     # RFC 2045 5.2: what is not type/subtype is text/plain
    token = r"[!#$%&'*+\-.^_`|~0-9a-z]+"
    assert part.content_type == (stdlib_type if re.fullmatch(f"{token}/{token}", stdlib_type) else "text/plain")
    for name in ("name", "filename", "charset", "boundary", "Name"):
        try:
            expected = stdlib_param(value, name)
        except (TypeError, ValueError):      # the standard library's own failures: ours reads on
            continue
        assert part.param(name) == expected, name


def test_continuation_numbers_the_standard_library_cannot_sort_or_convert_are_read():
    part = Part.from_bytes(b"Content-Type: text/plain; name*=a; name*0=b; name*" + b"9" * 5000 + b"=c\n\nx")
    assert part.param("name") == "abc"


@st.composite
def header_texts(draw) -> str:
    """Encoded words (good, damaged, unclosed), text and white space, in any order."""
    pieces = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            charset = draw(st.sampled_from(["utf-8", "UTF-8", "iso-8859-1", "x-bogus", "us-ascii", ""]))
            encoding = draw(st.sampled_from(["q", "Q", "b", "B", "x"]))
            text = draw(st.lists(st.sampled_from(["=C3=BC", "=C3", "=BC", "_", "a", "YWJj", "w7w", "=", "?",
                                                  "w7", "=E4", " "]), max_size=4).map("".join))
            pieces.append(f"=?{charset}?{encoding}?{text}" + draw(st.sampled_from(["?=", "?=", ""])))
        else:
            pieces.append(draw(st.sampled_from(WORD_PIECES)))
    return "".join(pieces)


@SAME
@given(value=st.one_of(header_texts(), st.lists(st.sampled_from(WORD_PIECES), max_size=16).map("".join)))
def test_encoded_words_decode_as_the_standard_library_decodes_them(value):
    from email.errors import MessageError
    from email.header import decode_header, make_header

    from ispmailgate_filters.mime import decode_words

    try:
        expected = str(make_header(decode_header(value))) if "=?" in value else value
    except (ValueError, LookupError, UnicodeError, AssertionError, MessageError):
        expected = value
    assert decode_words(value) == expected


def simple_boundary_lines(body: bytes, mark: bytes):
    """The obvious reading of RFC 2046's delimiter lines, one Python step per mark found."""
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


@SAME
@given(body=st.lists(st.sampled_from([b"--b", b"--", b"b", b"\n", b"\r\n", b" ", b"\t", b"\r", b"x", b"--bb"]),
                     max_size=30).map(b"".join),
       start=st.integers(0, 5))
def test_delimiter_lines_are_found_as_the_obvious_reading_finds_them(body, start):
    from ispmailgate_filters.mime import _boundary_lines

    data = b"y" * start + body
    found = [(begin - start, end - start, closing) for begin, end, closing
             in _boundary_lines(data, start, len(data), b"--b")]
    assert found == list(simple_boundary_lines(body, b"--b"))
