"""MIME parameters a filter changes, and names as logs show them."""

from __future__ import annotations

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
