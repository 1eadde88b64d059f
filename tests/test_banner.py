"""banner: disclaimers and warnings on the corpus messages, through the real CLI."""

from __future__ import annotations

import base64
import codecs
import email
import email.policy
import re
import subprocess

import pytest

from conftest import (CORPUS, assert_documented, config_error, corpus_messages, crlf,
                      run_gate, run_inline, without_from_line)

GERMAN = "Diese Nachricht ist vertraulich. Grüße aus München"
SIMPLE = without_from_line((CORPUS / "plain.eml").read_bytes())


def rules(options: str, name: str = "b") -> str:
    return f'default_filter = ["{name}"]\n[filter.{name}]\ntype = "banner"\n{options}\n'


def gate(config_file, options: str, data: bytes, *flags: str):
    config = config_file(rules(options))
    return run_inline(["-c", str(config), "--stdout", *flags, "-f", "a@example.org", "b@example.com"], data)


def parsed(data: bytes):
    from ispmailgate_filters.mime import Message

    return Message(without_from_line(data))


def text_of(part) -> str:
    return part.decoded().decode(part.charset or "ascii")


def message(headers: str, body: bytes, eol: bytes = b"\n") -> bytes:
    head = headers.strip("\n").replace("\n", "\r\n" if eol == b"\r\n" else "\n").encode()
    return head + eol + eol + body


def alternative(plain: bytes, html: bytes, *, charset: str = "utf-8", encoding: str = "8bit") -> bytes:
    return (b"From: a@example.org\nTo: b@example.com\nSubject: hi\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/alternative; boundary="alt"\n\n--alt\n'
            + f"Content-Type: text/plain; charset={charset}\nContent-Transfer-Encoding: {encoding}\n\n".encode()
            + plain + b"\n--alt\n"
            + f"Content-Type: text/html; charset={charset}\nContent-Transfer-Encoding: {encoding}\n\n".encode()
            + html + b"\n--alt--\n")


def wrapped(data: bytes, position: str = "bottom"):
    """(the original MIME entity, the banner's part) of a message the banner put under itself."""
    root = parsed(data).root
    assert root.content_type == "multipart/mixed" and len(root.children) == 2
    entity, carrier = root.children if position == "bottom" else reversed(root.children)
    return entity, carrier


def entity_of(data: bytes) -> bytes:
    """A message's own MIME entity: its Content-* fields, the blank line, its body."""
    root = parsed(data).root
    content = b"".join(raw for name, raw in root.headers.fields() if name.lower().startswith("content-"))
    return content + (root.separator or root.headers.eol) + root.body_bytes()


# -- options ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, key, words", [
    ('text = "x"\ntext_file = "/etc/hostname"', "filter.b.text_file", "not both"),
    ('html = "x"\nhtml_file = "/etc/hostname"', "filter.b.html_file", "not both"),
    ("", "filter.b.text", "nothing to add"),
    ('text = "x"\nposition = "middle"', "filter.b.position", "bottom, top"),
    ('text = "x"\nhtml_position = "middle"', "filter.b.html_position", "same, top, bottom"),
    ('text = "x"\non_dkim_signed = "strip"', "filter.b.on_dkim_signed", "modify, skip"),
    ('text = "x"\non_protected = "open"', "filter.b.on_protected", "skip, wrap"),
    ('subject_prefix = "[X]\\r\\nBcc: victim@example.net"', "filter.b.subject_prefix", "control characters"),
    ('text = 5', "filter.b.text", "expected a string"),
    ('text = "x"\ncolour = "red"', "filter.b.colour", "unknown option"),
])
def test_options_are_checked_at_load_and_name_their_key(tmp_path, options, key, words):
    error = config_error(rules(options), tmp_path)
    assert error.path == key
    assert words in error.message


def test_a_broken_rule_file_defers_the_mail(config_file):
    config = config_file(rules('position = "sideways"\ntext = "x"'))
    run = run_gate(["-c", str(config), "-f", "a@example.org", "b@example.com"], SIMPLE)
    assert run.code == 75
    assert "filter.b.position" in run.first_line


def test_problems_name_missing_or_unreadable_files(tmp_path):
    from ispmailgate_filters.banner import Banner

    good = tmp_path / "banner.txt"
    good.write_text(GERMAN)
    latin = tmp_path / "latin.html"
    latin.write_bytes("<p>Grüße</p>".encode("latin-1"))
    assert Banner(text_file=str(good)).problems() == []
    found = Banner(text_file=str(tmp_path / "gone.txt"), html_file=str(latin)).problems()
    assert len(found) == 2
    assert found[0].startswith("text_file ") and "No such file" in found[0]
    assert found[1].startswith("html_file ") and "utf-8" in found[1]


def test_every_option_is_documented_in_one_line_and_in_the_man_page():
    from ispmailgate_filters.banner import Banner

    assert_documented(Banner)


def test_a_missing_banner_file_at_delivery_time_defers(config_file, tmp_path):
    run = gate(config_file, f'text_file = "{tmp_path / "gone.txt"}"', SIMPLE)
    assert run.code == 75
    assert "gone.txt" in run.stderr


# -- which parts ----------------------------------------------------------------------------

def test_single_part_text_gets_the_banner_at_the_bottom(config_file, tmp_path):
    (tmp_path / "banner.txt").write_text(GERMAN + "\n")
    run = gate(config_file, f'text_file = "{tmp_path / "banner.txt"}"', SIMPLE)
    assert run.code == 0, run.stderr
    out = parsed(run.stdout)
    body = text_of(out.root)
    original = parsed(SIMPLE).root.decoded().decode("ascii")
    assert body == original + "\n" + GERMAN + "\n"
    assert out.root.charset == "utf-8"
    assert out.headers.get("MIME-Version") == "1.0"          # simple.msg had none: now readers decode it
    assert email.message_from_bytes(run.stdout, policy=email.policy.default).get_content() == body
    assert out.headers.get("X-ispMailGate-Banner").endswith("(b)")
    before = dict(parsed(SIMPLE).headers.items())
    assert all(out.headers.get(name) == value for name, value in before.items())


def test_top_position_goes_before_the_first_line(config_file):
    run = gate(config_file, 'text = "CAUTION: external sender"\nposition = "top"', SIMPLE)
    body = text_of(parsed(run.stdout).root)
    assert body.startswith("CAUTION: external sender\n\n")
    assert body.endswith(parsed(SIMPLE).root.decoded().decode())


def test_every_alternative_gets_it_and_html_after_body_or_before_its_end(config_file):
    html = (b"<html><head><title>&lt;body&gt;</title></head>\n<!-- <body> in a comment -->\n"
            b"<BODY class=\"x\"\n style=\"y\"><script>var s = '<body>';</script><p>Hallo</p>\n</body>\n</html>")
    data = alternative(b"Hallo", html)
    for position, expected in (("top", b'style="y"><div>CAUTION</div><script>'),
                               ("bottom", b"<p>Hallo</p>\n<div>CAUTION</div></body>")):
        run = gate(config_file, f'text = "CAUTION"\nposition = "{position}"', data)
        plain, markup = parsed(run.stdout).leaves()
        assert b"CAUTION" in plain.decoded()
        assert expected in markup.decoded()
        assert markup.decoded().count(b"CAUTION") == 1


@pytest.mark.parametrize("position, html_position", [("bottom", "top"), ("top", "bottom")])
def test_html_position_places_the_html_apart_from_the_text(config_file, position, html_position):
    """bottom + top is the original's banner: text appended, HTML right after <body>."""
    data = alternative(b"Hallo", b"<html><head></head><body class=x><p>Hallo</p></body></html>")
    options = f'text = "CAUTION"\nposition = "{position}"\nhtml_position = "{html_position}"'
    run = gate(config_file, options, data)
    plain, markup = parsed(run.stdout).leaves()
    expected_plain = "Hallo\n\nCAUTION" if position == "bottom" else "CAUTION\n\nHallo"
    assert text_of(plain) == expected_plain
    expected_html = b"<body class=x><div>CAUTION</div><p>Hallo</p>" if html_position == "top" else \
        b"<p>Hallo</p><div>CAUTION</div></body>"
    assert expected_html in markup.decoded()
    assert gate(config_file, options, run.stdout).stdout == run.stdout       # once only


def test_html_falls_back_to_head_then_html_and_a_fragment_goes_under_the_banner(config_file, tmp_path):
    cases = [(b"<html><head></head><p>x</p>", b"<html><head></head><b>!</b><p>x</p>"),
             (b"<HTML lang=de><p>x</p>", b"<HTML lang=de><b>!</b><p>x</p>")]
    options = 'text = "!"\nhtml = "<b>!</b>"\nposition = "top"'
    for html, expected in cases:
        run = gate(config_file, options, alternative(b"x", html))
        assert parsed(run.stdout).root.children[1].decoded() == expected
    fragment = alternative(b"x", b"<p>just a fragment</p>")      # no place for it: the reader of
    run = gate(config_file, options, fragment)                   # the HTML would see no banner
    entity, carrier = wrapped(run.stdout, "top")
    assert entity.to_bytes() == entity_of(fragment)
    assert [p.decoded() for p in carrier.children] == [b"!\n", b"<html><body><b>!</b></body></html>\n"]
    log = (tmp_path / "gate.log").read_text()
    assert "text/html part: no <body>, </head> or <html> tag: the body was put under the banner" in log
    assert gate(config_file, options, run.stdout).stdout == run.stdout      # once only


def test_an_invitation_beside_the_alternatives_keeps_its_bytes(config_file):
    data = alternative(b"Hallo", b"<html><body><p>Hallo</p></body></html>")
    data = data.replace(b'\n--alt--\n', b'\n--alt\nContent-Type: text/calendar; method=REQUEST\n\n'
                        b'BEGIN:VCALENDAR\nEND:VCALENDAR\n--alt--\n')
    run = gate(config_file, 'text = "CAUTION"', data)
    before, after = list(parsed(data).leaves()), list(parsed(run.stdout).leaves())
    assert [p.to_bytes() == q.to_bytes() for p, q in zip(before, after)] == [False, False, True]
    assert after[0].decoded().endswith(b"\n\nCAUTION")


def test_postcard_text_alternative_changes_and_everything_else_keeps_its_bytes(config_file):
    data = (CORPUS / "alternative-related.eml").read_bytes()       # its HTML given a <body>
    data = data.replace(b"<p>Someone sent", b"<html><body><p>Someone sent").replace(
        b"thank you.</p>\n", b"thank you.</p></body></html>\n")
    run = gate(config_file, 'text = "CAUTION"', data)
    before, after = list(parsed(data).leaves()), list(parsed(run.stdout).leaves())
    assert [p.to_bytes() == q.to_bytes() for p, q in zip(before, after)] == [False, False, True]
    assert after[0].decoded().endswith(b"\n\nCAUTION\n")


def test_mixed_gets_only_its_first_text_part_never_attachments(config_file):
    for name in ("boundary-with-space.eml", "attachments-base64.eml", "filename-rfc2231-utf8.eml"):
        data = (CORPUS / name).read_bytes()
        run = gate(config_file, 'text = "CAUTION"', data)
        before, after = list(parsed(data).leaves()), list(parsed(run.stdout).leaves())
        changed = [i for i, (p, q) in enumerate(zip(before, after)) if p.to_bytes() != q.to_bytes()]
        assert changed == [0], name
        assert len(before) == len(after) > 1


WITHOUT_TEXT = {
    "image": b"Content-Type: image/png\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo=\n",
    "forwarded": b"Content-Type: message/rfc822\n\nFrom: ceo@example.com\nSubject: pay now\n\nPay.\n",
    "attachment only": (b'Content-Type: multipart/mixed; boundary="m"\n\n--m\nContent-Type: text/plain\n'
                        b'Content-Disposition: attachment; filename="invoice.txt"\n\nPay.\n--m--\n'),
    "AMP alternative": (b'Content-Type: multipart/alternative; boundary="a"\n\n--a\nContent-Type: text/plain\n\n'
                        b'Hi\n--a\nContent-Type: text/x-amp-html\n\n<html amp4email><body>Pay</body></html>\n--a--\n'),
}


@pytest.mark.parametrize("kind", WITHOUT_TEXT)
def test_a_message_without_a_place_for_the_banner_goes_under_it(config_file, tmp_path, kind):
    """An image, a forwarded message, attachments only, an alternative a reader may prefer
    (AMP) that takes no banner: the reader still sees the warning, and the tag is not alone."""
    data = b"From: a@example.org\nSubject: x\nMIME-Version: 1.0\n" + WITHOUT_TEXT[kind]
    options = 'text = "CAUTION"\nsubject_prefix = "[EXT] "'
    run = gate(config_file, options, data)
    assert run.code == 0
    entity, carrier = wrapped(run.stdout)
    assert entity.to_bytes() == entity_of(data)                 # the body byte for byte, inline
    assert (carrier.content_type, carrier.decoded()) == ("text/plain", b"CAUTION\n")
    assert parsed(run.stdout).headers.decoded("Subject") == "[EXT] x"
    assert "the body was put under the banner" in (tmp_path / "gate.log").read_text()
    assert gate(config_file, options, run.stdout).stdout == run.stdout        # once only


def test_only_html_configured_gives_text_parts_its_words(config_file):
    run = gate(config_file, 'html = "<p><b>Vertraulich</b> &amp; geheim</p><p>Zweite Zeile</p>"',
               alternative(b"Hallo", b"<html><body>Hallo</body></html>"))
    plain, markup = parsed(run.stdout).leaves()
    assert text_of(plain) == "Hallo\n\nVertraulich & geheim\nZweite Zeile"
    assert markup.decoded() == b"<html><body>Hallo<p><b>Vertraulich</b> &amp; geheim</p><p>Zweite Zeile</p></body></html>"


def test_html_file_goes_into_html_parts_and_its_words_into_text_parts(config_file, tmp_path):
    (tmp_path / "banner.html").write_text("<p><b>Vertraulich</b> &amp; geheim</p>\n", "utf-8")
    run = gate(config_file, f'html_file = "{tmp_path / "banner.html"}"',
               alternative(b"Hallo", b"<html><body>Hallo</body></html>"))
    plain, markup = parsed(run.stdout).leaves()
    assert markup.decoded() == b"<html><body>Hallo<p><b>Vertraulich</b> &amp; geheim</p></body></html>"
    assert text_of(plain) == "Hallo\n\nVertraulich & geheim"


def test_only_text_configured_goes_into_html_escaped(config_file):
    run = gate(config_file, "text = '''Vertraulich <intern>\nZweite & letzte Zeile'''",
               alternative(b"Hallo", b"<html><body>Hallo</body></html>"))
    markup = parsed(run.stdout).root.children[1]
    assert b"Hallo<div>Vertraulich &lt;intern&gt;<br>\nZweite &amp; letzte Zeile</div></body>" in markup.decoded()


# -- charsets and transfer encodings ------------------------------------------------------

def test_latin1_part_stays_latin1_when_the_banner_fits(config_file):
    data = (CORPUS / "latin1-qp.eml").read_bytes()
    run = gate(config_file, f'text = "{GERMAN}"', data)
    out = parsed(run.stdout).root
    assert out.charset == "iso-8859-1"
    assert out.transfer_encoding == "quoted-printable"
    assert text_of(out) == text_of(parsed(data).root) + "\n" + GERMAN + "\n"


def test_koi8r_part_is_reencoded_as_utf8_when_the_banner_does_not_fit(config_file, tmp_path):
    russian = "Привет, это тестовое письмо.\nВторая строка.\n"
    data = message("From: a@example.org\nSubject: test\nMIME-Version: 1.0\n"
                   "Content-Type: text/plain; charset=koi8-r; format=flowed\nContent-Transfer-Encoding: 8bit",
                   russian.encode("koi8-r"))
    run = gate(config_file, f'text = "{GERMAN}"', data)
    out = parsed(run.stdout).root
    assert out.headers.get("Content-Type") == "text/plain; charset=utf-8; format=flowed"
    assert text_of(out) == russian + "\n" + GERMAN + "\n"
    assert "re-encoded from koi8-r to UTF-8" in (tmp_path / "gate.log").read_text()
    run = gate(config_file, 'text = "Конфиденциально"', data)        # fits KOI8-R: stays
    out = parsed(run.stdout).root
    assert out.charset == "koi8-r" and out.transfer_encoding == "8bit"
    assert text_of(out) == russian + "\nКонфиденциально\n"


def test_html_in_a_charset_that_lacks_the_banners_letters_gets_character_references(config_file):
    russian = "<html><body><p>Привет</p></body></html>"
    data = alternative("Привет".encode("koi8-r"), russian.encode("koi8-r"), charset="koi8-r")
    run = gate(config_file, 'html = "<p>Grüße aus der Straße</p>"', data)
    markup = parsed(run.stdout).root.children[1]
    assert markup.charset == "koi8-r" and markup.transfer_encoding == "8bit"     # not re-encoded
    assert markup.decoded().decode("koi8-r") == \
        "<html><body><p>Привет</p><p>Gr&#252;&#223;e aus der Stra&#223;e</p></body></html>"


def test_undeclared_8bit_body_is_not_guessed_but_put_under_the_banner(config_file, tmp_path):
    data = message("From: a@example.org\nSubject: alt", "Grüße von früher\n".encode("latin-1"))
    run = gate(config_file, f'text = "{GERMAN}"', data)
    entity, carrier = wrapped(run.stdout)
    assert run.code == 0 and entity.to_bytes() == entity_of(data)
    assert carrier.decoded() == GERMAN.encode() + b"\n"
    assert "body is not valid us-ascii and the banner needs UTF-8" in (tmp_path / "gate.log").read_text()
    run = gate(config_file, 'text = "ASCII only"', data)      # bytes appended, nothing re-read
    assert parsed(run.stdout).root.decoded() == "Grüße von früher\n\nASCII only\n".encode("latin-1")


def test_hostile_or_unknown_charsets_leave_the_part_alone_under_the_banner(config_file, tmp_path):
    for charset in ("rot13", "zlib_codec", "base64", "utf-16", "x-made-up", "utf-8\\0"):
        data = message(f"From: a@example.org\nSubject: x\nContent-Type: text/plain; charset={charset}", b"body\n")
        run = gate(config_file, 'text = "CAUTION"', data)
        entity, carrier = wrapped(run.stdout)
        assert run.code == 0 and entity.to_bytes() == entity_of(data), charset
        assert carrier.decoded() == b"CAUTION\n"
    log = (tmp_path / "gate.log").read_text()
    assert "charset x-made-up unknown: left alone" in log and "body is not valid utf-16" in log


def plain_in(charset: str, body: bytes, kind: str = "plain") -> bytes:
    return message(f"From: a@example.org\nSubject: x\nMIME-Version: 1.0\n"
                   f"Content-Type: text/{kind}; charset={charset}\nContent-Transfer-Encoding: 8bit", body)


@pytest.mark.parametrize("charset, codec", [("iso-2022-jp", "iso2022_jp"), ("ISO-2022-KR", "iso2022_kr"),
                                            ("hz-gb-2312", "hz"), ("utf-7", "utf-7")])
def test_a_stateful_charset_is_shifted_back_before_the_banner(config_file, charset, codec):
    """A body that ends in its two-byte mode: raw ASCII appended there would read as garbage."""
    text = {"iso2022_jp": "お世話になっております", "iso2022_kr": "안녕하세요",
            "hz": "你好世界", "utf-7": "Grüße €"}[codec]
    shift_back = {"iso2022_jp": b"\x1b(B", "iso2022_kr": b"\x0f", "hz": b"~}", "utf-7": b"-"}[codec]
    body = text.encode(codec)
    assert body.endswith(shift_back)
    body = body.removesuffix(shift_back)         # a body that ends in its shifted mode
    for banner in ("CAUTION: external", "Ελληνικά: Achtung"):
        run = gate(config_file, f'text = "{banner}"', plain_in(charset, body))
        out = parsed(run.stdout).root
        fits = codec == "utf-7" or banner.isascii()         # else the part becomes UTF-8
        assert out.charset == (charset.lower() if fits else "utf-8"), banner
        assert out.decoded().decode(codec if fits else "utf-8") == text + "\n\n" + banner
        if fits and codec != "utf-7":
            assert out.decoded().endswith(shift_back + b"\n\n" + banner.encode("ascii"))
    html = f"<html><body><p>{text}</p></body></html>".encode(codec)
    run = gate(config_file, 'html = "<p>Ελληνικά</p>"', plain_in(charset, html, "html"))
    out = parsed(run.stdout).root
    snippet = "<p>Ελληνικά</p>".encode(codec, "xmlcharrefreplace").decode(codec)
    assert out.charset == charset.lower()
    assert out.decoded().decode(codec) == f"<html><body><p>{text}</p>{snippet}</body></html>"


@pytest.mark.parametrize("charset, variant, mark", [
    ("utf-16", "utf-16-le", codecs.BOM_UTF16_LE), ("utf-16", "utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-16", "utf-16-be", b""), ("utf-16le", "utf-16-le", b""),
    ("UTF-32", "utf-32-le", codecs.BOM_UTF32_LE), ("utf-32be", "utf-32-be", b""),
])
def test_wide_charsets_get_the_banner_in_their_own_encoding(config_file, charset, variant, mark):
    """UTF-16 and UTF-32 in the byte order the part has (its mark kept; none: big-endian)."""
    body = base64.encodebytes(mark + "Hallo Welt\n".encode(variant))
    original = message(f"From: a@example.org\nSubject: x\nMIME-Version: 1.0\n"
                       f"Content-Type: text/plain; charset={charset}\nContent-Transfer-Encoding: base64", body)
    run = gate(config_file, f'text = "{GERMAN}"', original)
    out = parsed(run.stdout).root
    assert out.charset == charset.lower() and out.transfer_encoding == "base64"
    data = out.decoded()
    assert data.startswith(mark) and data[len(mark):].decode(variant) == "Hallo Welt\n\n" + GERMAN + "\n"
    assert gate(config_file, f'text = "{GERMAN}"', run.stdout).stdout == run.stdout


def test_transfer_encoding_keeps_lines_within_limits(config_file):
    seven_bit = message("From: a@example.org\nSubject: x\nContent-Transfer-Encoding: 7bit", b"plain ascii\n")
    run = gate(config_file, f'text = "{GERMAN}"', seven_bit)
    assert parsed(run.stdout).root.transfer_encoding == "quoted-printable"
    long_line = "x" * 1500
    run = gate(config_file, f'text = "{long_line}"', seven_bit)
    out = parsed(run.stdout).root
    assert out.transfer_encoding == "quoted-printable"
    assert max(len(line) for line in run.stdout.splitlines()) <= 78
    assert text_of(out).endswith(long_line + "\n")
    base64_part = message("From: a@example.org\nSubject: x\nContent-Type: text/plain; charset=utf-8\n"
                          "Content-Transfer-Encoding: base64", b"SGFsbG8gV2VsdA0K\n")
    run = gate(config_file, f'text = "{GERMAN}"', base64_part)
    out = parsed(run.stdout).root
    assert out.transfer_encoding == "base64"
    assert out.decoded() == f"Hallo Welt\r\n\r\n{GERMAN}\r\n".encode()      # the body's own CRLF kept


def test_crlf_messages_stay_crlf_and_sealable(config_file):
    data = crlf((CORPUS / "alternative-related.eml").read_bytes())
    run = gate(config_file, f'text = "{GERMAN}"\nhtml = "<p>{GERMAN}</p>"\nsubject_prefix = "[EXTERN] "', data)
    assert re.search(rb"(?<!\r)\n", run.stdout) is None
    assert max(len(line) for line in run.stdout.split(b"\r\n")) <= 998


# -- the subject --------------------------------------------------------------------------

@pytest.mark.parametrize("subject, prefix, shown", [
    ("Quarterly report", "[EXTERNAL] ", "[EXTERNAL] Quarterly report"),
    ("[EXTERNAL] Quarterly report", "[EXTERNAL] ", "[EXTERNAL] Quarterly report"),
    ("=?iso-8859-1?q?Gr=FC=DFe_aus_K=F6ln?=", "[EXTERNAL] ", "[EXTERNAL] Grüße aus Köln"),
    ("=?utf-8?b?R3LDvMOfZQ==?= und mehr", "[EXTERN – Vorsicht] ", "[EXTERN – Vorsicht] Grüße und mehr"),
    ("Plain words", "[ÄUSSERE] ", "[ÄUSSERE] Plain words"),
    ("=?utf-8?q?=5BEXTERNAL=5D_schon_da?=", "[EXTERNAL] ", "[EXTERNAL] schon da"),
    ("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "[EXT]", "[EXT]Grüße"),
])
def test_subject_prefix_is_added_once_and_decodes_right(config_file, subject, prefix, shown):
    data = message(f"From: a@example.org\nSubject: {subject}", b"body\n")
    run = gate(config_file, f'subject_prefix = "{prefix}"', data)
    parsed_subject = email.message_from_bytes(run.stdout, policy=email.policy.default)["Subject"]
    assert str(parsed_subject) == shown
    if "EXTERNAL" in subject:                   # already there: not one byte changes
        assert run.stdout == data


def test_a_subject_already_starting_with_the_prefix_is_left_byte_for_byte(config_file):
    data = message("From: a@example.org\nSubject: [EXTERNAL] hello", b"body\n")
    run = gate(config_file, 'subject_prefix = "[EXTERNAL] "', data)
    assert run.stdout == data


def test_raw_8bit_utf8_subject_is_prefixed_and_encoded(config_file):
    data = message("From: a@example.org", b"body\n").replace(b"\n\n", "\nSubject: Grüße\n\n".encode(), 1)
    run = gate(config_file, 'subject_prefix = "[EXTERNAL] "', data)
    subject_line = [line for line in run.stdout.splitlines() if line.startswith(b"Subject:")][0]
    assert subject_line.isascii()
    assert str(email.message_from_bytes(run.stdout, policy=email.policy.default)["Subject"]) == \
        "[EXTERNAL] Grüße"


def test_a_missing_subject_gets_the_prefix_alone(config_file):
    run = gate(config_file, 'subject_prefix = "[EXTERNAL] "', message("From: a@example.org", b"x\n"))
    assert parsed(run.stdout).headers.get("Subject") == "[EXTERNAL]"


def test_a_field_added_below_a_last_line_without_line_end_gets_a_line_of_its_own(config_file):
    run = gate(config_file, 'subject_prefix = "[EXTERNAL] "', b"From: a@example.org\nTo: b@example.com")
    assert run.stdout.endswith(b"\nFrom: a@example.org\nTo: b@example.com\nSubject: [EXTERNAL]\n")


# -- twice through the gate ---------------------------------------------------------------

def test_a_second_pass_adds_nothing_and_is_byte_identical_over_the_corpus(config_file):
    config = config_file(rules(f'text = "{GERMAN}"\nhtml = "<p>{GERMAN}</p>"\nsubject_prefix = "[EXTERN] "'
                               '\nposition = "top"'))
    args = ["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.com"]
    changed = 0
    for path in corpus_messages():
        first = run_inline(args, path.read_bytes())
        second = run_inline(args, first.stdout)
        assert first.code == second.code == 0, path.name
        assert second.stdout == first.stdout, path.name
        changed += GERMAN.encode() in first.stdout or b"=" in first.stdout
    assert changed >= 25


def test_second_pass_through_the_installed_program(config_file):
    config = config_file(rules(f'text = "{GERMAN}"\nsubject_prefix = "[EXTERN] "'))
    args = ["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.com"]
    first = run_gate(args, (CORPUS / "latin1-qp.eml").read_bytes())
    second = run_gate(args, first.stdout)
    assert first.code == second.code == 0
    assert second.stdout == first.stdout
    assert first.stdout.count(b"X-ispMailGate-Banner:") == 1


def test_two_different_banners_both_apply_once(config_file):
    config = config_file('default_filter = ["warn", "legal"]\n'
                         '[filter.warn]\ntype = "banner"\ntext = "CAUTION: external"\nposition = "top"\n'
                         '[filter.legal]\ntype = "banner"\ntext = "Legal footer"\n')
    args = ["-c", str(config), "--stdout", "-f", "a@example.org", "b@example.com"]
    first = run_inline(args, SIMPLE)
    second = run_inline(args, first.stdout)
    assert second.stdout == first.stdout
    body = parsed(first.stdout).root.decoded()
    assert body.startswith(b"CAUTION: external\n\n") and body.endswith(b"\n\nLegal footer\n")
    assert first.stdout.count(b"X-ispMailGate-Banner:") == 2


def test_a_forged_marker_does_not_suppress_the_banner(config_file, tmp_path):
    run = gate(config_file, 'text = "CAUTION"', SIMPLE)
    marker = parsed(run.stdout).headers.get("X-ispMailGate-Banner")
    forged = f"X-ispMailGate-Banner: {marker}\n".encode() + SIMPLE
    run = gate(config_file, 'text = "CAUTION"', forged)
    assert parsed(run.stdout).root.decoded().endswith(b"\n\nCAUTION\n")
    assert run.stdout.count(b"X-ispMailGate-Banner:") == 1
    assert "forged or stale marker" in (tmp_path / "gate.log").read_text()


@pytest.mark.parametrize("position", ["bottom", "top"])
def test_a_forged_marker_and_the_snippet_elsewhere_do_not_suppress_the_html_banner(config_file, tmp_path,
                                                                                  position):
    """The snippet inside a comment, or at the other end: not where this banner goes."""
    options = f'html = "<p>CAUTION</p>"\nposition = "{position}"'
    clean = alternative(b"Hallo", b"<html><body><p>Hallo</p></body></html>")
    marker = parsed(gate(config_file, options, clean).stdout).headers.get("X-ispMailGate-Banner")
    elsewhere = b"<p>CAUTION</p>"
    html = (b"<html><!-- <p>CAUTION</p> --><body><p>Hallo</p></body></html>" if position == "bottom" else
            b"<html><body><p>Hallo</p>" + elsewhere + b"</body></html>")
    forged = f"X-ispMailGate-Banner: {marker}\n".encode() + alternative(b"Hallo\n\nCAUTION", html)
    run = gate(config_file, options, forged)
    markup = parsed(run.stdout).root.children[1].decoded()
    expected = (b"<p>Hallo</p><p>CAUTION</p></body>" if position == "bottom"
                else b"<body><p>CAUTION</p><p>Hallo</p>")
    assert expected in markup and run.stdout != forged
    assert "forged or stale marker" in (tmp_path / "gate.log").read_text()
    assert gate(config_file, options, run.stdout).stdout == run.stdout


def many_parts(count: int) -> bytes:
    """One text part, then ``count`` empty parts."""
    return (b'From: a@example.org\nSubject: hi\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="m"\n'
            b"\n--m\nContent-Type: text/plain\n\nPay the invoice.\n" + b"--m\n\n" * count + b"--m--\n")


def test_ten_thousand_empty_parts_cannot_switch_the_banner_off(config_file, tmp_path):
    """Past the parser's part limit the structure is opaque: the banner goes on top of it all,
    never a marker and a subject tag alone.  Below the limit it goes in place."""
    options = 'text = "CAUTION"\nsubject_prefix = "[EXTERNAL] "'
    data = many_parts(10_000)
    run = gate(config_file, options, data)
    entity, carrier = wrapped(run.stdout)
    assert carrier.decoded() == b"CAUTION\n" and entity.to_bytes() == entity_of(data)
    assert parsed(run.stdout).headers.decoded("Subject") == "[EXTERNAL] hi"
    assert "MIME structure beyond the parser's limits" in (tmp_path / "gate.log").read_text()
    assert gate(config_file, options, run.stdout).stdout == run.stdout
    run = gate(config_file, options, many_parts(9_990))
    assert parsed(run.stdout).root.children[0].decoded() == b"Pay the invoice.\n\nCAUTION"


def test_a_reply_quoting_the_banner_still_gets_one(config_file):
    reply = message("From: a@example.org\nSubject: Re: x", b"Thanks!\n\n> earlier text\n>\n> CAUTION\n")
    run = gate(config_file, 'text = "CAUTION"', reply)
    assert parsed(run.stdout).root.decoded().endswith(b"> CAUTION\n\nCAUTION\n")


# -- names ----------------------------------------------------------------------------------

def with_attachment(disposition: str) -> bytes:
    return (b"From: a@example.org\nTo: b@example.com\nSubject: Bericht\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain; charset=utf-8\n\n'
            b"Anbei der Bericht.\n--b\nContent-Type: application/pdf; name=\"=?utf-8?q?=C3=9Cbersicht_M=C3=A4rz.pdf?=\"\n"
            b"Content-Transfer-Encoding: base64\n" + disposition.encode() + b"\n\nJVBERi0xLjQKJcOkw7zDtsOfCg==\n--b--\n")


@pytest.mark.parametrize("disposition", [
    "Content-Disposition: attachment;\n filename*=utf-8''%C3%9Cbersicht%20M%C3%A4rz.pdf",
    "Content-Disposition: attachment;\n filename*0*=utf-8''%C3%9Cbersicht;\n filename*1*=%20M%C3%A4rz.pdf",
    'Content-Disposition: inline; filename="=?iso-8859-1?q?=DCbersicht_M=E4rz.pdf?="',
])
def test_attachment_named_in_rfc2231_or_2047_survives_and_logs_decoded(config_file, tmp_path, disposition):
    data = with_attachment(disposition)
    run = gate(config_file, f'text = "{GERMAN}"\nsubject_prefix = "[EXTERN] "', data, "-d")
    before, after = list(parsed(data).leaves()), list(parsed(run.stdout).leaves())
    assert after[1].to_bytes() == before[1].to_bytes()
    assert after[1].filename == "Übersicht März.pdf"
    stdlib = email.message_from_bytes(run.stdout, policy=email.policy.default)
    assert [p.get_filename() for p in stdlib.iter_attachments()] == ["Übersicht März.pdf"]
    assert "attachments left alone: Übersicht März.pdf" in (tmp_path / "gate.log").read_text()


def test_names_in_logs_lose_control_characters(config_file, tmp_path):
    hostile = "Content-Disposition: attachment; filename*=utf-8''evil%1B%5B31m%E2%80%AEfdp.exe%0Ax"
    run = gate(config_file, 'text = "CAUTION"', with_attachment(hostile), "-d")
    assert run.code == 0
    line = next(x for x in (tmp_path / "gate.log").read_text().splitlines() if "attachments left alone" in x)
    assert line.endswith("attachments left alone: evil?[31m?fdp.exe?x")
    assert not re.search(r"[\x00-\x1f\x7f\u202e]", line)


# -- DKIM -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory):
    """An RSA key made by openssl, and the DNS TXT record that publishes it."""
    import base64

    folder = tmp_path_factory.mktemp("dkim")
    private = folder / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True, capture_output=True)
    public = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    return private.read_bytes(), record


def dkim_sign(data: bytes, key: bytes, canon: bytes = b"relaxed") -> bytes:
    import dkim

    signature = dkim.sign(data, b"sel", b"example.org", key, canonicalize=(canon, canon),
                          include_headers=[b"from", b"to", b"subject"])
    return signature + data


def dkim_ok(data: bytes, record: bytes) -> bool:
    import dkim

    return dkim.verify(data, dnsfunc=lambda name, timeout=5: record)


def test_skip_leaves_dkim_signed_mail_untouched_and_verifiable(config_file, tmp_path, smtp_sink, dkim_key):
    key, record = dkim_key
    signed = dkim_sign(crlf(SIMPLE), key)
    assert dkim_ok(signed, record)
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n'
                         + rules('text = "CAUTION"\nsubject_prefix = "[EXT] "\non_dkim_signed = "skip"'))
    run = run_inline(["-c", str(config), "-f", "a@example.org", "b@example.com"], signed)
    assert run.code == 0, run.stderr
    assert smtp_sink.messages[0].content == signed
    assert dkim_ok(smtp_sink.messages[0].content, record)
    assert "DKIM-Signature (d=example.org): left untouched (on_dkim_signed = skip)" in \
        (tmp_path / "gate.log").read_text()
    run = run_inline(["-c", str(config), "-f", "a@example.org", "b@example.com"], SIMPLE)
    assert b"CAUTION" in smtp_sink.messages[1].content           # unsigned mail still gets it


def test_modify_breaks_the_old_signature_but_leaves_wire_bytes_a_new_one_verifies(
        config_file, smtp_sink, dkim_key):
    key, record = dkim_key
    data = crlf((CORPUS / "alternative-related.eml").read_bytes())
    signed = dkim_sign(data, key, b"simple")
    config = config_file(f'mail_host = "{smtp_sink.address}"\nloop_suffix = ""\n'
                         + rules(f'text = "{GERMAN}"\nsubject_prefix = "[EXTERN] "\nposition = "top"'))
    run = run_inline(["-c", str(config), "-f", "a@example.org", "b@example.com"], signed)
    assert run.code == 0, run.stderr
    wire = smtp_sink.messages[0].content
    assert not dkim_ok(wire, record)
    assert dkim_ok(dkim_sign(wire, key, b"simple"), record)    # what the core seals verifies


# -- signed and encrypted -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpg():
    import shutil
    import tempfile

    import gnupg

    home = tempfile.mkdtemp(dir="/tmp", prefix="gpgb")
    try:
        handle = gnupg.GPG(gnupghome=home, options=["--pinentry-mode", "loopback"])
        key = handle.gen_key(handle.gen_key_input(key_type="EDDSA", key_curve="ed25519", no_protection=True,
                                                  subkey_type="ECDH", subkey_curve="cv25519",
                                                  name_email="sender@example.org", expire_date=0))
        assert key.fingerprint, key.stderr
        yield handle, key.fingerprint
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env={"GNUPGHOME": home}, check=False)
        shutil.rmtree(home, ignore_errors=True)


def pgp_signed(gpg) -> tuple[bytes, bytes]:
    handle, fingerprint = gpg
    entity = ("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
              f"{GERMAN}\r\n").encode()
    signature = handle.sign(entity, keyid=fingerprint, detach=True)
    assert signature.data, signature.stderr
    data = (b"From: sender@example.org\r\nTo: b@example.com\r\nSubject: signed\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/signed; micalg=pgp-sha512; protocol="application/pgp-signature";'
            b' boundary="sig"\r\n\r\n--sig\r\n' + entity + b"\r\n--sig\r\nContent-Type: application/pgp-signature\r\n\r\n"
            + signature.data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n--sig--\r\n")
    return data, signature.data


def gpg_verifies(gpg, entity: bytes, signature: bytes, tmp_path) -> bool:
    path = tmp_path / "sig.asc"
    path.write_bytes(signature)
    return bool(gpg[0].verify_data(str(path), entity).valid)


def pgp_encrypted(gpg) -> bytes:
    """PGP/MIME (RFC 3156) encrypted by a real gpg."""
    handle, fingerprint = gpg
    entity = f"Content-Type: text/plain; charset=utf-8\r\n\r\n{GERMAN}\r\n".encode()
    armor = handle.encrypt(entity, fingerprint, always_trust=True)
    assert armor.ok, armor.stderr
    return (b"From: sender@example.org\nTo: b@example.com\nSubject: encrypted\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="enc"\n\n'
            b"--enc\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n\n"
            b"--enc\nContent-Type: application/octet-stream\n\n" + armor.data + b"\n--enc--\n")


PROTECTED = {"multipart/signed": lambda gpg: pgp_signed(gpg)[0], "multipart/encrypted": pgp_encrypted}


@pytest.mark.parametrize("kind", PROTECTED)
def test_signed_or_encrypted_mail_is_skipped_by_default_subject_tag_aside(config_file, gpg, tmp_path, kind):
    data = PROTECTED[kind](gpg)
    run = gate(config_file, 'text = "CAUTION"\nhtml = "<p>CAUTION</p>"', data)
    assert run.code == 0 and run.stdout == data
    assert f"{kind} message: body left untouched (on_protected = skip)" in (tmp_path / "gate.log").read_text()
    run = gate(config_file, 'text = "CAUTION"\nsubject_prefix = "[EXT] "', data)
    assert parsed(run.stdout).root.body_bytes() == parsed(data).root.body_bytes()


@pytest.mark.parametrize("position", ["bottom", "top"])
def test_wrap_attaches_the_signed_message_whole_under_the_banner(config_file, gpg, tmp_path, position):
    data, signature = pgp_signed(gpg)
    options = f'text = "{GERMAN}"\nhtml = "<p>{GERMAN}</p>"\non_protected = "wrap"\nposition = "{position}"'
    run = gate(config_file, options + '\nsubject_prefix = "[EXT] "', data)
    out = parsed(run.stdout)
    assert out.root.content_type == "multipart/mixed"
    carrier, attached = out.root.children if position == "top" else reversed(out.root.children)
    assert carrier.content_type == "multipart/alternative"
    assert [text_of(p).strip() for p in carrier.children] == [GERMAN, f"<html><body><p>{GERMAN}</p></body></html>"]
    assert attached.content_type == "message/rfc822"
    assert attached.children[0].to_bytes() == data             # every byte of the original
    signed_entity = attached.children[0].children[0].to_bytes()
    assert gpg_verifies(gpg, signed_entity, signature, tmp_path)
    assert out.headers.get("From") == "sender@example.org"
    assert str(email.message_from_bytes(run.stdout, policy=email.policy.default)["Subject"]) == "[EXT] signed"
    assert re.search(rb"(?<!\r)\n", run.stdout) is None       # the message's CRLF throughout
    second = gate(config_file, options + '\nsubject_prefix = "[EXT] "', run.stdout)
    assert second.stdout == run.stdout


def in_a_list(data: bytes) -> bytes:
    """``data``'s MIME entity as the first part of a multipart/mixed, a list footer after it."""
    eol = b"\r\n" if b"\r\n" in data else b"\n"
    head, body = data.split(eol + eol, 1)
    inner = head.split(b"MIME-Version: 1.0" + eol)[1] + eol + eol + body
    lines = [b"From: a@example.org", b"Subject: list", b"MIME-Version: 1.0",
             b'Content-Type: multipart/mixed; boundary="outer"', b"", b"--outer", inner,
             b"--outer", b"Content-Type: text/plain", b"", b"list footer", b"--outer--", b""]
    return eol.join(lines)


@pytest.mark.parametrize("kind", PROTECTED)
def test_signed_or_encrypted_part_inside_a_mixed_message_is_never_touched(config_file, gpg, kind):
    data = PROTECTED[kind](gpg)
    eol = b"\r\n" if b"\r\n" in data else b"\n"
    outer = in_a_list(data)
    run = gate(config_file, 'text = "CAUTION"', outer)
    before, after = parsed(outer).root.children, parsed(run.stdout).root.children
    assert after[0].to_bytes() == before[0].to_bytes()
    assert after[1].decoded() == b"list footer" + eol + eol + b"CAUTION"


def test_banner_files_with_cr_or_control_characters_put_no_bare_cr_on_the_wire(config_file, tmp_path):
    (tmp_path / "banner.txt").write_bytes(b"line one\r\nline two\rline three\x1b[31m\x00\n")
    run = gate(config_file, f'text_file = "{tmp_path / "banner.txt"}"', SIMPLE)
    assert parsed(run.stdout).root.decoded().endswith(b"\n\nline one\nline two\nline three[31m\n")
    assert b"\r" not in run.stdout and b"\x1b" not in run.stdout


# -- where the reader looks (attack review 1, finding 7) -----------------------------------------

def test_a_first_text_part_with_an_unknown_disposition_is_an_attachment(config_file):
    """RFC 2183: an unknown disposition is an attachment; the banner goes on the shown part."""
    data = (b'From: a@example.org\nSubject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="m"\n\n'
            b"--m\nContent-Type: text/plain\nContent-Disposition: x-decoy\n\ndecoy\n"
            b"--m\nContent-Type: text/plain\n\nPay now.\n--m--\n")
    run = gate(config_file, 'text = "CAUTION"', data)
    decoy, shown = parsed(run.stdout).leaves()
    assert decoy.decoded() == b"decoy" and b"CAUTION" in shown.decoded()


RELATED = (b'From: a@example.org\nSubject: x\nMIME-Version: 1.0\n'
           b'Content-Type: multipart/related; boundary="r"; start="<%s>"\n\n'
           b"--r\nContent-Type: text/html\nContent-ID: <decoy@x>\n\n<html><body>decoy</body></html>\n"
           b"--r\nContent-Type: text/html\nContent-ID: <main@x>\n\n<html><body>Pay now</body></html>\n--r--\n")


def test_the_root_of_a_related_is_the_part_its_start_names(config_file):
    run = gate(config_file, 'text = "CAUTION"', RELATED % b"main@x")
    decoy, main = parsed(run.stdout).leaves()
    assert b"CAUTION" not in decoy.decoded() and b"CAUTION" in main.decoded()


def test_a_related_whose_start_names_no_part_goes_under_the_banner(config_file):
    run = gate(config_file, 'text = "CAUTION"', RELATED % b"nowhere@x")
    entity, carrier = wrapped(run.stdout)
    assert carrier.decoded() == b"CAUTION\n" and entity.to_bytes() == entity_of(RELATED % b"nowhere@x")


def test_every_subject_field_gets_the_prefix(config_file):
    """Two Subject fields, the first tagged already: a reader showing the last saw no tag."""
    data = b"From: a@example.org\nSubject: [EXT] old\nSubject: Pay now\n\nbody\n"
    run = gate(config_file, 'text = "CAUTION"\nsubject_prefix = "[EXT] "', data)
    assert parsed(run.stdout).headers.get_all("Subject") == ["[EXT] old", "[EXT] Pay now"]


def test_a_template_in_the_head_does_not_take_the_snippet(config_file):
    html = b"<html><head><template><body></template></head><body><p>Pay now</p></body></html>"
    data = b"From: a@example.org\nSubject: x\nMIME-Version: 1.0\nContent-Type: text/html\n\n" + html + b"\n"
    run = gate(config_file, 'html = "<p>CAUTION</p>"\nposition = "top"', data)
    assert b"<template><body></template></head><body><p>CAUTION</p><p>Pay now" in run.stdout
