"""Cheap messages that cost much: the shapes of issue 14's findings, built at any size.

Shared by the scaling and budget tests and by ``bench/hostile.py``.  Each builder takes
the size of its construct (lines, words, parts, levels ...), so a test can build the same
construct at n and at 4n and compare what the two cost.
"""

from __future__ import annotations

import base64
import io
import tarfile
import time


def folded_header(lines: int) -> bytes:
    """A Subject folded over ``lines`` continuation lines (finding 1)."""
    return b"From: a@b.example\nSubject: x" + b"\n x" * lines + b"\nMessage-ID: <f@b>\n\nbody\n"


def encoded_subject(words: int) -> bytes:
    """A Subject of ``words`` RFC 2047 encoded words, UTF-8 split across words."""
    word = b"=?utf-8?q?Gr=C3?= =?utf-8?q?=BC=C3=9Fe?= "
    return b"From: a@b.example\nSubject: " + word * (words // 2) + b"\n\nbody\n"


def broken_encoded_words(words: int) -> bytes:
    """``=?`` openers that never close (a regex that looks for ``?=`` rescans the rest)."""
    return b"From: a@b.example\nSubject: " + b"=?utf-8?q?x " * words + b"\n\nbody\n"


def continued_filename(pieces: int) -> bytes:
    """An attachment whose RFC 2231 file name comes in ``pieces`` continuations."""
    params = b"".join(b";\n filename*%d*=%%41%%42" % number for number in range(pieces))
    return (b"Content-Type: multipart/mixed; boundary=z\n\n--z\nContent-Type: application/octet-stream\n"
            b"Content-Disposition: attachment" + params + b"\n\ndata\n--z--\n")


def quoted_semicolons(count: int) -> bytes:
    """A quoted parameter full of semicolons (a parser that recounts quotes per ``;``)."""
    return (b'Content-Type: text/plain; name="' + b"a;" * count + b'"; charset=us-ascii\n\nbody\n')


def many_parameters(count: int) -> bytes:
    return b"Content-Type: text/plain" + b"".join(b"; p%d=v" % n for n in range(count)) + b"\n\nbody\n"


def many_parts(count: int, boundary: bytes = b"z") -> bytes:
    part = b"--" + boundary + b"\nContent-Type: text/plain\n\nx\n"
    return b"Content-Type: multipart/mixed; boundary=" + boundary + b"\n\n" + part * count + b"--" + boundary + b"--\n"


def boundary_lookalikes(lines: int) -> bytes:
    """Lines that start like the boundary and are not it: each must be looked at once."""
    return (b"Content-Type: multipart/mixed; boundary=z\n\n--z\n\n" + b"--zz\n" * lines
            + b"--z x\n" * lines + b"--z--\n")


def html_open_tags(count: int) -> bytes:
    """A text/html part of ``<a `` repeated, no body tag, no closing ``>`` (finding 6)."""
    return (b"From: a@b.example\nSubject: html\nContent-Type: text/html\n\n<html>" + b"<a " * count + b"\n")


def html_document(paragraphs: int) -> bytes:
    """A well-formed HTML part with many tags, comments and a script."""
    body = b"<p class='x'>Hallo <b>Welt</b></p><!-- <body> --><script>var b = '<body>';</script>\n"
    return (b"From: a@b.example\nSubject: html\nContent-Type: text/html\n\n<html><head><title>t</title>"
            b"</head><body>\n" + body * paragraphs + b"</body></html>\n")


def nested_multipart(levels: int, payload: int, *, banner_part: bool = True) -> bytes:
    """``levels`` multiparts inside each other around a base64 attachment of ``payload`` bytes,
    with a text part at the bottom for a banner (finding 2)."""
    data = base64.encodebytes(bytes(range(256)) * (payload // 256 + 1))[:payload // 3 * 4]
    inner = (b"Content-Type: multipart/mixed; boundary=leaf\n\n--leaf\nContent-Type: text/plain\n\nhello\n"
             b"--leaf\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
             + data + b"\n--leaf--\n") if banner_part else data
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(levels))
    tail = b"".join(b"\n--b%d--\n" % i for i in reversed(range(levels)))
    return b"From: a@b.example\nSubject: nested\nMIME-Version: 1.0\n" + head + inner + tail


def nested_rfc822(levels: int, payload: int) -> bytes:
    """``levels`` message/rfc822 parts inside each other around a text part of ``payload`` bytes."""
    line = b"all work and no play makes a long message " * 2 + b"\n"
    data = b"Content-Type: text/plain\n\n" + line * (payload // len(line) + 1)
    for level in range(levels):
        data = (b"Subject: level %d\nContent-Type: multipart/mixed; boundary=m%d\n\n--m%d\n"
                b"Content-Type: text/plain\n\nhello\n--m%d\nContent-Type: message/rfc822\n\n"
                % (level, level, level, level) + data + b"\n--m%d--\n" % level)
    return b"From: a@b.example\nMIME-Version: 1.0\n" + data


def tar_of_empty_files(count: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for number in range(count):
            archive.addfile(tarfile.TarInfo(f"f{number}"))
    return buffer.getvalue()


def nested_tar_gz(levels: int, fan_out: int) -> bytes:
    """``levels`` of tar.gz, each holding ``fan_out`` copies of the level below, empty files
    at the bottom: ``fan_out ** levels`` objects (finding 6: 3 levels of 73, 390k objects)."""
    data = tar_of_empty_files(fan_out)
    for _ in range(levels - 1):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for number in range(fan_out):
                info = tarfile.TarInfo(f"t{number}.tar.gz")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        data = buffer.getvalue()
    return data


def with_attachment(name: str, data: bytes) -> bytes:
    encoded = base64.encodebytes(data)
    return (b"From: a@b.example\nSubject: attachment\nMIME-Version: 1.0\n"
            b"Content-Type: multipart/mixed; boundary=z\n\n--z\nContent-Type: text/plain\n\nsee\n"
            b"--z\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
            b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\"\n\n" + encoded + b"--z--\n")


def base64_messages(messages: int, parts: int) -> bytes:
    """``messages`` base64 message/rfc822 parts, each an inner message of ``parts`` empty
    parts (finding 6: each inner parse had its own 10,000 parts)."""
    inner = (b"Subject: inner\nContent-Type: multipart/mixed; boundary=i\n\n" + b"--i\n\n" * parts + b"--i--\n")
    encoded = base64.encodebytes(inner)
    one = b"--z\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n" + encoded
    return (b"From: a@b.example\nSubject: messages\nMIME-Version: 1.0\n"
            b"Content-Type: multipart/mixed; boundary=z\n\n" + one * messages + b"--z--\n")


def nested_base64_rfc822(levels: int, payload: int) -> bytes:
    """``levels`` base64 message/rfc822 parts inside each other around ``payload`` bytes of text:
    each level is decoded and parsed by virscan, never by the MIME parser itself."""
    line = b"all work and no play makes a long message " * 2 + b"\n"
    data = b"Content-Type: text/plain\n\n" + line * (payload // len(line) + 1)
    for level in range(levels):
        data = (b"Subject: level %d\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=m%d\n\n"
                b"--m%d\nContent-Type: text/plain\n\nhello\n--m%d\nContent-Type: message/rfc822\n"
                b"Content-Transfer-Encoding: base64\n\n" % (level, level, level, level)
                + base64.encodebytes(data) + b"--m%d--\n" % level)
    return b"From: a@b.example\n" + data


def prefix_boundaries(levels: int, lines: int) -> bytes:
    """``levels`` multiparts whose boundaries are prefixes of one another, around lines that
    contain every level's mark in the middle: each level must skip them without Python work
    per mark."""
    marks = b"".join(b"%c" % (97 + level % 26) for level in range(levels))
    head = b"".join(b"Content-Type: multipart/mixed; boundary=%s\n\n--%s\n" % (marks[:i + 1], marks[:i + 1])
                    for i in range(levels))
    tail = b"".join(b"\n--%s--\n" % marks[:i + 1] for i in reversed(range(levels)))
    return b"Subject: prefixes\n" + head + b"Content-Type: text/plain\n\n" + (b"x--" + marks + b"\n") * lines + tail


# -- the parser entry points, each with a construct that grows ---------------------------------

def cpu_seconds(action, data) -> float:
    """The CPU time of ``action(data)``, the best of three runs."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        action(data)
        best = min(best, time.process_time() - started)
    return best


def _message(data: bytes):
    from ispmailgate_filters.mime import Message

    return Message(data, max_parts=10 ** 7, max_depth=64)


def _every_part(data: bytes) -> None:
    for part in _message(data).walk():
        part.content_type, part.filename, part.charset


def _subject(data: bytes) -> None:
    _message(data).headers.decoded("Subject")


def _html(data: bytes) -> None:
    from ispmailgate_filters.banner.markup import insertion_point

    body = data.split(b"\n\n", 1)[1]
    insertion_point(body, "bottom")
    insertion_point(body, "top")


def _archive(data: bytes) -> None:
    from ispmailgate_filters.virscan.archives import Limits, Unpacker

    unpacker = Unpacker(Limits(members=10 ** 7, depth=8, unpacked=1 << 40))
    for _ in unpacker.items("a", data):
        pass


def _fold(value: str) -> None:
    from ispmailgate_filters.mime import fold_field

    fold_field("Subject", value)


def _changed_deep_part(data: bytes) -> None:
    message = _message(data)
    leaf = [part for part in message.walk() if part.content_type == "text/plain"][-1]
    leaf.set_text("changed\n")
    message.to_bytes()


def _damaged_base64(size: int) -> bytes:
    return b"Content-Transfer-Encoding: base64\n\n" + b"QUJD*\n" * size + b"QQ"


def _decoded(data: bytes) -> None:
    _message(data).root.decoded()


# (name, entry point, builder, n): the same construct built at n and 4n must cost about 4x
ENTRY_POINTS = [
    ("folded header, top level", lambda d: _message(d).top_headers(), folded_header, 50_000),
    ("folded header, parsed", lambda d: _message(d).headers.get("Subject"), folded_header, 50_000),
    ("encoded words (Subject)", _subject, encoded_subject, 5_000),
    ("unclosed encoded words", _subject, broken_encoded_words, 4_000),
    ("RFC 2231 continuations", _every_part, continued_filename, 5_000),
    ("quoted semicolons", _every_part, quoted_semicolons, 10_000),
    ("many parameters", _every_part, many_parameters, 10_000),
    ("many MIME parts", _every_part, many_parts, 5_000),
    ("boundary look-alikes", _every_part, boundary_lookalikes, 30_000),
    ("marks mid-line, 60 levels", _every_part, lambda n: prefix_boundaries(60, n), 5_000),
    ("nested multipart, changed", _changed_deep_part, lambda n: nested_multipart(60, n), 1 << 20),
    ("damaged base64", _decoded, _damaged_base64, 200_000),
    ("HTML <a without >", _html, html_open_tags, 4_000),
    ("HTML document", _html, html_document, 2_000),
    ("tar members", _archive, tar_of_empty_files, 2_000),
    ("fold ASCII words", _fold, lambda n: "word " * n, 200_000),
    ("fold non-ASCII", _fold, lambda n: "wörd " * n, 20_000),
]

