"""Hostile messages: hypothesis strategies for malformed MIME, shared by the property tests
and the fuzz target's seed corpus."""

from __future__ import annotations

from hypothesis import strategies as st

# The built-in filters that need no outside service, routed by rules: c@d.example gets the
# default chain, e@f.example (from a@b.example) the first rule's, so every input is also
# routed, split into two groups and written out as an mbox of two results.
BUILT_IN_RULES = """
default_filter = ["decrypt", "disclaimer"]
[[recipients]]
recipient = '^e@f\\.example$'
sender = '^a@b\\.example$'
filters = ["disclaimer", "zip", "unzip"]
[filter.disclaimer]
type = "banner"
text = "-- \\nÄußerst vertraulich"
html = "<p>Äußerst <b>vertraulich</b></p>"
subject_prefix = "[EXTERN] "
position = "top"
[filter.zip]
type = "packer"
direction = "pos"
codec = "gzip"
[filter.unzip]
type = "packer"
direction = "neg"
[filter.decrypt]
type = "pgp"
direction = "neg"
gnupghome = "{directory}/gnupg"
"""
BUILT_IN_RECIPIENTS = ["c@d.example", "e@f.example"]


NASTY_BYTES = [b"\0", b"\r", b"\r\n", b"\n", b"\xff", b"\x1b", b"=", b"--", b"\t", b" "]

header_name = st.sampled_from([b"Subject", b"From", b"To", b"Content-Type", b"Content-Transfer-Encoding",
                               b"Content-Disposition", b"X-Junk", b"DKIM-Signature", b"Message-ID"])
charset = st.sampled_from([b"utf-8", b"iso-8859-1", b"koi8-r", b"us-ascii", b"x-bogus", b"", b"utf-7",
                           b"\"utf-8", b"utf-16", b"unknown-8bit"])
encoding = st.sampled_from([b"7bit", b"8bit", b"binary", b"base64", b"quoted-printable", b"x-uuencode",
                            b"BASE64", b"bogus", b""])
ctype = st.sampled_from([b"text/plain", b"text/html", b"application/octet-stream", b"image/gif",
                         b"message/rfc822", b"multipart/mixed", b"multipart/alternative", b"text",
                         b"multipart/signed", b"/", b"text/plain/extra"])
garbage_words = st.sampled_from([
    b"=?utf-8?B?####?=", b"=?x-bogus?Q?=FF=FE?=", b"=?utf-8?q?broken", b"=??=", b"=?koi8-r?B?8/DJ08/LLmRvYw==?=",
    b"filename*0*=utf-8''%ZZ%", b"filename*=''%E4%F6", b"name=\"unterminated", b"boundary=", b";;;;",
    b"\xc3\x28", b"\xe2\x82", b"%00", b"<script>", b"</body>", b"<body", b"-----BEGIN PGP MESSAGE-----"])


@st.composite
def header_line(draw) -> bytes:
    value = b" ".join(draw(st.lists(st.one_of(garbage_words, st.binary(max_size=30),
                                              st.sampled_from(NASTY_BYTES)), max_size=6)))
    if draw(st.booleans()):
        value += b"; charset=" + draw(charset)
    fold = b"\n " if draw(st.booleans()) else b""
    return draw(header_name) + b": " + fold + value + draw(st.sampled_from([b"\n", b"\r\n", b""]))


@st.composite
def body(draw, depth: int) -> bytes:
    if depth > 0 and draw(st.integers(0, 3)) == 0:
        return draw(multipart(depth - 1))
    data = draw(st.one_of(st.binary(max_size=300), st.lists(garbage_words, max_size=8).map(b"\n".join)))
    if draw(st.booleans()):       # bad base64 / QP shapes
        data += draw(st.sampled_from([b"=\n", b"=X1", b"QUJD\n===\n", b"****", b"=\r\n=\r\n"]))
    return data


@st.composite
def part(draw, depth: int) -> bytes:
    headers = b"".join(draw(st.lists(header_line(), max_size=5)))
    headers += b"Content-Type: " + draw(ctype) + b"; charset=" + draw(charset) + b"\n"
    headers += b"Content-Transfer-Encoding: " + draw(encoding) + b"\n"
    separator = draw(st.sampled_from([b"\n", b"\r\n", b"", b" \n"]))
    return headers + separator + draw(body(depth))


@st.composite
def multipart(draw, depth: int = 3) -> bytes:
    boundary = draw(st.sampled_from([b"b", b"=_x", b"--", b"a b", b"\xff", b"b" * 80, b""]))
    children = draw(st.lists(part(depth), max_size=4))
    text = b"Content-Type: multipart/" + draw(st.sampled_from([b"mixed", b"alternative", b"digest"]))
    text += b'; boundary="' + boundary + b'"\n\n' + draw(st.binary(max_size=20))
    for child in children:
        marker = draw(st.sampled_from([b"--" + boundary, b"--" + boundary + b"  \t", b"--" + boundary + b"x"]))
        text += b"\n" + marker + b"\n" + child
    if draw(st.booleans()):            # a closing boundary, sometimes missing or doubled
        text += b"\n--" + boundary + b"--\n" * draw(st.integers(1, 2)) + draw(st.binary(max_size=20))
    return text


@st.composite
def message(draw) -> bytes:
    """A whole message: real-looking, malformed, truncated, or just bytes."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=500))
    top = b"".join(draw(st.lists(header_line(), max_size=6)))
    data = top + draw(multipart()) if kind < 3 else top + draw(part(3))
    if kind == 4:                      # truncated anywhere
        data = data[: draw(st.integers(0, len(data)))]
    return data
